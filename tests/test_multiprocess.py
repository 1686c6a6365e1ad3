"""Two CPU processes (gloo) train the same weights as one process with the same global batch, and
checkpoint and resume."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from cogpipe import checkpoint

from helpers import launch


def launch_two(clips, out, cache, **extra):
    """configs/accelerate/ddp.yaml with 2 gloo processes on the CPU (ACCELERATE_USE_CPU=1)."""
    return launch("ddp", clips, out, cache, **extra)


def _weights(out, step=4):
    return load_file(str(out / "checkpoints" / f"checkpoint-{step:06d}" / checkpoint.TRAINABLE))


@pytest.fixture(scope="module")
def two(clips, trained, tmp_path_factory):
    base = tmp_path_factory.mktemp("two")
    r = launch_two(clips, base / "out", trained[2])
    return base / "out", r


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(two, trained):
    out, r = two
    one = _weights(trained[0])  # 1 process, batch 2, same seed and steps
    both = _weights(out)  # 2 processes, batch 1 each
    assert set(one) == set(both)
    for k in one:
        torch.testing.assert_close(both[k], one[k], rtol=1e-5, atol=1e-6)
    assert any(v.abs().max() > 0 for k, v in both.items() if "lora_B" in k)
    assert (out / "export" / "model_index.json").is_file() and (out / "lora").is_dir()


@pytest.mark.slow
def test_two_processes_checkpoint_and_resume(two, clips, trained, tmp_path):
    out, _ = two
    part = tmp_path / "part"
    shutil.copytree(out / "checkpoints" / "checkpoint-000002", part / "checkpoints" / "checkpoint-000002")
    (part / "checkpoints" / "latest").write_text("checkpoint-000002")
    r = launch_two(clips, part, trained[2], **{"train.resume_from": "latest"})
    assert "resumed from" in r.stdout + r.stderr
    a, b = _weights(out), _weights(part)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
