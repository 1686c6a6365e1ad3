"""One home for atomic writes (cogpipe.atomic): one temporary name that names its owner, a start-up sweep that
removes only what dead owners left, and for each kind of write a process SIGKILLed between writing its temp
and renaming it (COGPIPE_FAILPOINT=atomic-write:<name>) leaves the destination as it was; the next start
removes the temp and the write completes."""

import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from cogpipe import atomic, checkpoint

from helpers import REPO, SPECS, child_env, make_clips, tiny_overrides

RECIPE = REPO / "configs" / "tiny_lora.yaml"
VAE_RECIPE = REPO / "configs" / "world" / "tiny_world_vae.yaml"


def _killed(code: str, point: str) -> None:
    """Run `code` in a fresh python with COGPIPE_FAILPOINT=atomic-write:<point>; it must die by SIGKILL there."""
    env = child_env(REPO / "tests", COGPIPE_FAILPOINT=f"atomic-write:{point}")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]


# ---- the name and the sweep ---------------------------------------------------------------------------------


def test_temp_name_is_a_hidden_sibling_that_names_its_owner(tmp_path):
    dst = tmp_path / "sub" / "config.yaml"
    tmp = atomic.temp_path(dst)
    assert tmp.parent == dst.parent and tmp.name.startswith(".config.yaml.cogpipe-tmp-")
    t = atomic.parse(tmp)
    assert t.name == "config.yaml" and t.pid == os.getpid()
    assert t.host.split(".ns")[0] == re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:64]
    assert atomic.owner_alive(t) is True
    for other in ("config.yaml", ".config.yaml.tmp", ".x.partial-123", "x.cogpipe-tmp-h-1-2"):
        assert atomic.parse(tmp_path / other) is None
    assert atomic.temp_path(tmp_path / "checkpoint-000003").name.startswith(".checkpoint-000003.cogpipe-tmp-")


def test_failed_write_leaves_nothing_and_the_old_content(tmp_path):
    dst = atomic.write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic.file(dst) as tmp:
            tmp.write_text("new")
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        with atomic.folder(tmp_path / "d") as tmp:
            (tmp / "x").write_text("1")
            raise RuntimeError("disk full")
    assert dst.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    for content in ("1", "2"):  # a folder replaces the previous one whole
        with atomic.folder(tmp_path / "d") as tmp:
            (tmp / content).write_text(content)
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["2"] and not atomic.temps(tmp_path)
    atomic.save_safetensors(tmp_path / "t.safetensors", {"x": torch.ones(2)}, {"k": "v"})
    atomic.write_json(tmp_path / "j.json", {"a": 1})
    assert load_file(tmp_path / "t.safetensors")["x"].sum() == 2 and json.loads((tmp_path / "j.json").read_text())


def test_sweep_removes_dead_owners_temps_and_keeps_live_ones(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "from cogpipe import atomic; print(atomic.temp_path('x'))"],
                              env=child_env(), capture_output=True, text=True, check=True)
    dead_name = finished.stdout.strip()[1:].split(".", 1)[1]  # "cogpipe-tmp-<host>-<pid>-<start>"
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    dead_file = tmp_path / f".entry.safetensors.{dead_name}"
    dead_file.write_bytes(b"partial")
    dead_folder = deep / f".checkpoint-000003.{dead_name}"
    (dead_folder / "inner").mkdir(parents=True)
    live_file = atomic.temp_path(tmp_path / "latest")
    live_file.write_text("checkpoint-000004")
    live_folder = atomic.temp_path(deep / "export")
    live_folder.mkdir()
    t = atomic.parse(live_file)
    other_fresh = tmp_path / f".c.yaml.{atomic.TAG}-elsewhere-{t.pid}-{t.start}"
    other_old = deep / f".d.yaml.{atomic.TAG}-elsewhere-{t.pid}-{t.start}"
    for p in (other_fresh, other_old):
        p.write_text("x")
    os.utime(other_old, (time.time() - 2 * atomic.DAY,) * 2)
    (tmp_path / "keep.txt").write_text("not a temp")
    removed = atomic.sweep(tmp_path)
    assert sorted(removed) == sorted([dead_file, dead_folder, other_old])
    assert atomic.temps(tmp_path) == sorted([live_file, live_folder, other_fresh])
    assert (tmp_path / "keep.txt").exists()
    if t.start:  # Linux: the current pid with another start time is a finished process whose pid was reused
        reused = tmp_path / f".e.yaml.{atomic.TAG}-{t.host}-{t.pid}-{t.start + 1}"
        reused.write_text("x")
        assert atomic.sweep(tmp_path, "e.yaml") == [reused]
    assert checkpoint.remove_partial(tmp_path) == [] and len(atomic.temps(tmp_path)) == 3


# ---- each kind of write, killed between its temp and the rename --------------------------------------------


def test_config_yaml(tmp_path):
    from cogpipe.config import load_config, save_config, to_yaml

    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("old: 1\n")
    cfg = load_config(RECIPE, tiny_overrides(tmp_path, out, tmp_path / "cache"), validate_model=False)
    (tmp_path / "cfg.pickle").write_bytes(pickle.dumps(cfg))  # the child skips the schema's imports (diffusers)
    _killed(f"import pickle\nfrom cogpipe.config import save_config\n"
            f"save_config(pickle.loads(open({str(tmp_path / 'cfg.pickle')!r}, 'rb').read()), "
            f"{str(out / 'config.yaml')!r})", "config.yaml")
    assert (out / "config.yaml").read_text() == "old: 1\n" and len(atomic.temps(out, "config.yaml")) == 1
    assert len(checkpoint.remove_partial(out)) == 1 and not atomic.temps(out)  # what training does first
    save_config(cfg, out / "config.yaml")
    assert (out / "config.yaml").read_text() == to_yaml(cfg)


SOLO = """
from types import SimpleNamespace
from pathlib import Path
from cogpipe import checkpoint
solo = SimpleNamespace(is_main_process=True, num_processes=1, wait_for_everyone=lambda: None,
                       save_state=lambda d: (Path(d) / "random_states_0.pkl").write_bytes(b"rng"))
"""


def _save(out, step):
    exec(SOLO + f"checkpoint.save(solo, {str(out)!r}, {step}, {{'step': {step}}}, 'a: 1')", {})


def test_checkpoint_folder_and_latest(tmp_path):
    out = tmp_path / "out"
    root = checkpoint.checkpoints_dir(out)
    _save(out, 2)
    save3 = SOLO + f"checkpoint.save(solo, {str(out)!r}, 3, {{'step': 3}}, 'a: 1')"
    _killed(save3, "checkpoint-000003")
    assert (root / "latest").read_text() == "checkpoint-000002" and not (root / "checkpoint-000003").exists()
    [tmp] = atomic.temps(root, "checkpoint-000003")
    assert checkpoint.read_state(tmp)["step"] == 3  # complete, but never renamed
    assert checkpoint.remove_partial(out) == [tmp] and not atomic.temps(out)

    _killed(save3, "latest")
    assert (root / "latest").read_text() == "checkpoint-000002"  # the new folder is in place, not yet named
    assert checkpoint.read_state(root / "checkpoint-000003")["step"] == 3
    [tmp] = atomic.temps(root, "latest")
    assert checkpoint.remove_partial(out) == [tmp]
    _save(out, 3)  # the run resumes from checkpoint-000002 and saves step 3 again, over the one there
    assert (root / "latest").read_text() == "checkpoint-000003" and not atomic.temps(out)
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-000002", "checkpoint-000003", "latest"]


def test_cache_entry(tmp_path):
    from cogpipe.config import load_config
    from cogpipe.data.cache import build_cache
    from cogpipe.data.folders import discover

    clips = make_clips(tmp_path / "clips", SPECS[:1])
    cache = tmp_path / "cache"
    overrides = tiny_overrides(clips, tmp_path / "out", cache)
    _killed(f"from cogpipe.data.cache import build_cache\nfrom cogpipe.config import load_config\n"
            f"from cogpipe.data.folders import discover\n"
            f"build_cache(load_config({str(RECIPE)!r}, {overrides!r}), discover({str(clips)!r}), 'cpu')",
            "*.safetensors")
    assert not [p for p in cache.rglob("*.safetensors") if not atomic.parse(p)]
    [tmp] = atomic.temps(cache)
    assert tmp.parent.parent.name == "latents" and load_file(tmp)["mean"].shape == (16, 5, 8, 8)
    logs = []
    [entry] = build_cache(load_config(RECIPE, overrides), discover(clips), "cpu", log=logs.append)
    assert any("removed" in line and tmp.name in line for line in logs) and not atomic.temps(cache)
    assert load_file(entry.latents)["mean"].shape == (16, 5, 8, 8)
    assert load_file(entry.prompt)["prompt_embeds"].shape == (48, 32)


def test_export_and_lora_folders(tmp_path):
    from cogpipe import models
    from cogpipe.config import load_config, to_yaml
    from cogpipe.export import export
    from cogpipe.lora import LORA_FILE, adapter_state_dict, add_lora

    out = tmp_path / "out"
    cfg = load_config(RECIPE, tiny_overrides(tmp_path, out, tmp_path / "cache", **{"lora.rank": 2}))
    transformer = models.build_transformer(cfg.model, torch.float32)
    add_lora(transformer, cfg.lora)
    ckpt = checkpoint.checkpoints_dir(out) / "checkpoint-000001"
    ckpt.mkdir(parents=True)
    trainable = checkpoint.trainable_state(transformer)
    checkpoint.save_trainable(trainable, list(trainable), ckpt)
    (ckpt / "config.yaml").write_text(to_yaml(cfg))
    (ckpt / checkpoint.STATE).write_text(json.dumps({"step": 1}))
    (ckpt.parent / "latest").write_text(ckpt.name)
    for sub in ("lora", "export"):  # an earlier export
        (out / sub).mkdir()
        (out / sub / "old.txt").write_text("old")

    code = f"from cogpipe.export import export\nexport({str(out)!r})"
    _killed(code, "lora")
    assert [p.name for p in (out / "lora").iterdir()] == ["old.txt"]
    [lora_tmp] = atomic.temps(out, "lora")
    assert (lora_tmp / LORA_FILE).is_file()
    _killed(code, "export")  # its start-up sweep removes the LoRA temp, then the LoRA is written
    assert not lora_tmp.exists() and (out / "lora" / LORA_FILE).is_file()
    assert [p.name for p in (out / "export").iterdir()] == ["old.txt"]
    [export_tmp] = atomic.temps(out, "export")
    assert (export_tmp / "model_index.json").is_file()
    logs = []
    folder = export(out, log=logs.append)
    assert logs == [f"removed {export_tmp}, left by a killed write"] and not atomic.temps(out)
    assert (folder / "model_index.json").is_file() and (folder / "cogpipe_config.yaml").is_file()
    assert not (folder / "old.txt").exists()
    assert set(load_file(out / "lora" / LORA_FILE)) == {f"transformer.{k}" for k in adapter_state_dict(trainable)}


def test_vae_pretraining_save(tmp_path):
    from diffusers import AutoencoderKLCogVideoX

    from cogpipe.world.vae import load_vae_config, train_vae

    clips = make_clips(tmp_path / "clips", [("square", "red", "up"), ("circle", "blue", "left")], frames=9)
    out = tmp_path / "vae"
    overrides = [f"output_dir={out}", f"data.root={clips}", "train.max_steps=1", "train.batch_size=2",
                 "train.warmup_steps=1", "train.save_every=1", "model.block_out_channels=[8,8,8]", "eval_clips=0"]
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "old.txt").write_text("old")
    _killed(f"from cogpipe.world.vae import load_vae_config, train_vae\n"
            f"train_vae(load_vae_config({str(VAE_RECIPE)!r}, {overrides!r}))", "checkpoint")
    assert [p.name for p in (out / "checkpoint").iterdir()] == ["old.txt"] and not (out / "vae").exists()
    [tmp] = atomic.temps(out, "checkpoint")
    assert (tmp / "config.json").is_file()
    logs = []
    folder = train_vae(load_vae_config(VAE_RECIPE, overrides), log=logs.append)
    assert f"removed {tmp}, left by a killed write" in logs and not atomic.temps(out)
    assert AutoencoderKLCogVideoX.from_pretrained(folder).config.block_out_channels == [8, 8, 8]
    assert (out / "checkpoint" / "config.json").is_file() and not (out / "checkpoint" / "old.txt").exists()


def test_converter_outputs(tmp_path):
    from cogpipe.convert import convert

    from fixtures import sat as F

    src = F.save_sat_folder(tmp_path / "sat_lora", F.sat_lora_only(F.sat_transformer("5b", lora_rank=4,
                                                                                      lora_layers=(0,))))
    for dst in (tmp_path / "out" / "lora", tmp_path / "out" / "lora.safetensors"):  # a folder, a file
        _killed(f"from cogpipe.convert import convert\nconvert({str(src)!r}, {str(dst)!r})", dst.name)
        assert not dst.exists()
        [tmp] = atomic.temps(dst.parent, dst.name)
        convert(src, dst)
        assert not tmp.exists() and not atomic.temps(dst.parent)
        file = dst if dst.suffix == ".safetensors" else dst / "pytorch_lora_weights.safetensors"
        assert len(load_file(file)) == 2 * 4  # lora_A and lora_B of to_q, to_k, to_v, to_out.0 in one layer
