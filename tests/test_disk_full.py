"""A disk that fills during a checkpoint, an export or a cache write, on a real small filesystem (a 4 MiB tmpfs; the
tests skip where mounting one is not allowed): the write fails with an error naming the folder and what failed, the
partial write is removed, and the previous checkpoint stays intact and loadable."""

import os
import subprocess

import pytest
import torch

from cogpipe import atomic, checkpoint, models
from cogpipe.config import load_config

from helpers import REPO, tiny_overrides

RECIPE = REPO / "configs" / "tiny_lora.yaml"


@pytest.fixture
def disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder, leave: int = 4096):
    """Take all but `leave` bytes of the filesystem's free space."""
    st = os.statvfs(folder)
    filler = folder / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(clips, tmp_path, disk, monkeypatch):
    from cogpipe import training
    from cogpipe.lora import add_lora

    out = disk / "out"
    real_save = checkpoint.save

    def save_on_a_filling_disk(accelerator, output_dir, step, *args, **kwargs):
        if step == 2:
            fill(disk)
        return real_save(accelerator, output_dir, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", save_on_a_filling_disk)
    cfg = load_config(RECIPE, tiny_overrides(clips, out, tmp_path / "cache", **{
        "train.max_steps": 3, "train.checkpoint_every": 1, "validation.prompts": "[]"}))
    with pytest.raises(atomic.WriteFailed) as e:
        training.train(cfg)
    message = str(e.value)
    assert f"writing checkpoint {out / 'checkpoints' / 'checkpoint-000002'} failed" in message, message
    assert "No space left on device" in message and str(out / "checkpoints") in message
    assert "the previous checkpoint (checkpoint-000001) is intact" in message
    (disk / "filler").unlink()
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-000001", "latest"]  # no partial one left
    assert (root / "latest").read_text() == "checkpoint-000001" and checkpoint.read_state(root / "checkpoint-000001")[
        "step"] == 1
    transformer = models.build_transformer(cfg.model, torch.float32)
    add_lora(transformer, cfg.lora)
    checkpoint.load_trainable(transformer, root / "checkpoint-000001")  # loadable: every trainable weight there
    assert checkpoint.resolve(out, "latest") == root / "checkpoint-000001"


def test_a_full_disk_during_an_export_or_a_cache_write(trained, tmp_path, disk):
    from cogpipe.export import export

    out = disk / "run"
    (out / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(trained[0] / "checkpoints" / "checkpoint-000004", out / "checkpoints" / "checkpoint-000004")
    (out / "checkpoints" / "latest").write_text("checkpoint-000004")
    fill(disk, leave=64 * 1024)  # the LoRA fits, the pipeline folder does not
    with pytest.raises(atomic.WriteFailed) as e:
        export(out)
    message = str(e.value)
    assert "No space left on device" in message and f"in {out}" in message, message
    assert "the partial write was removed" in message
    assert not atomic.temps(out) and not (out / "export").exists()
    assert checkpoint.read_state(out / "checkpoints" / "checkpoint-000004")["step"] == 4
    # a cache entry (safetensors hides the cause in its own error type)
    with pytest.raises(atomic.WriteFailed, match=f"writing file {disk / 'entry.safetensors'} failed: No space left"):
        atomic.save_safetensors(disk / "entry.safetensors", {"x": torch.zeros(1 << 20)})
    assert not atomic.temps(disk) and not (disk / "entry.safetensors").exists()
