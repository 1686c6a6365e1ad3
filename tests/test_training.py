"""End to end on the tiny model: train a LoRA, resume, export, reload, infer."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cogpipe import checkpoint, models
from cogpipe.config import load_config

from helpers import REPO
from helpers import run_tiny as _run

RECIPE = REPO / "configs" / "tiny_lora.yaml"


def test_run_leaves_checkpoints_export_lora_and_video(trained):
    out, cfg, _ = trained
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-000002", "checkpoint-000004"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "checkpoint-000004"
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "checkpoint-000004" / "config.yaml").is_file()
    assert load_config(out / "config.yaml").train.max_steps == 4
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (out / "export" / sub).is_dir()
    assert (out / "export" / "model_index.json").is_file()
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    from cogpipe.video import read_video

    video = read_video(next((out / "validation").glob("*.mp4")))
    assert video.shape == (17, 64, 64, 3)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(np.isfinite(m["loss"]) and m["loss"] > 0 for m in metrics)


def test_only_lora_weights_trained(trained):
    out, cfg, _ = trained
    state = load_file(str(out / "checkpoints" / "checkpoint-000004" / checkpoint.TRAINABLE))
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)
    assert len(state) == 2 * 4 * 2  # 2 blocks x (to_q, to_k, to_v, to_out.0) x (A, B)
    assert all(v.abs().max() > 0 for k, v in state.items() if "lora_B" in k)  # B starts at zero: it moved
    fresh = models.build_transformer(cfg.model, torch.float32).state_dict()
    exported = load_file(str(out / "export" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert set(exported) == set(fresh)
    assert all(torch.equal(exported[k], fresh[k]) for k in fresh)  # the base did not change


def test_export_reload_reproduces_in_memory_model(trained):
    from cogpipe.inference import generate, load_pipeline
    from cogpipe.lora import add_lora

    out, cfg, _ = trained
    transformer = models.build_transformer(cfg.model, torch.float32)
    add_lora(transformer, cfg.lora)
    checkpoint.load_trainable(transformer, out / "checkpoints" / "checkpoint-000004")
    in_memory = models.build_pipeline(cfg.model, torch.float32, transformer=transformer)
    in_memory.set_progress_bar_config(disable=True)
    kw = dict(prompt="a purple circle moving up", num_frames=9, steps=3, seed=3)
    expected = generate(in_memory, **kw)
    reloaded = generate(load_pipeline(out / "export", out / "lora"), **kw)
    base = generate(load_pipeline(out / "export"), **kw)
    np.testing.assert_array_equal(reloaded, expected)
    assert np.abs(base.astype(int) - expected).max() > 0  # the LoRA does something
    # scale 0 switches the LoRA off: alpha/rank is applied by the loader, not baked in
    np.testing.assert_array_equal(generate(load_pipeline(out / "export", out / "lora", lora_scale=0.0), **kw), base)


def test_resume_continues_to_the_same_weights(trained, clips, tmp_path, monkeypatch):
    """A run stopped after its step-2 checkpoint and resumed ends where the uninterrupted run ended. And the run's
    end frees training: by the export and render (_finish), AdamW, its state and the EMA are gone."""
    import gc
    import weakref

    from cogpipe import training

    out, _, cache = trained
    part = tmp_path / "part"
    shutil.copytree(out / "checkpoints" / "checkpoint-000002", part / "checkpoints" / "checkpoint-000002")
    (part / "checkpoints" / "latest").write_text("checkpoint-000002")
    refs, seen = [], []
    make_optimizer, finish = training.make_optimizer, training._finish

    def recorded_optimizer(*args, **kwargs):
        optimizer = make_optimizer(*args, **kwargs)
        refs.append(weakref.ref(optimizer))
        return optimizer

    def checked_finish(run, state):
        gc.collect()
        seen.append([r() is None for r in refs])
        finish(run, state)

    monkeypatch.setattr(training, "make_optimizer", recorded_optimizer)
    monkeypatch.setattr(training, "_finish", checked_finish)
    _run(clips, part, cache, **{"train.resume_from": "latest"})
    assert seen == [[True]]  # one AdamW, released before the export
    assert checkpoint.read_state(part / "checkpoints" / "checkpoint-000004")["step"] == 4
    lines = [json.loads(x)["step"] for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert lines == [3, 4]  # the step count continued
    a = load_file(str(out / "checkpoints" / "checkpoint-000004" / checkpoint.TRAINABLE))
    b = load_file(str(part / "checkpoints" / "checkpoint-000004" / checkpoint.TRAINABLE))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_from_missing_path_is_an_error(clips, tmp_path):
    with pytest.raises(FileNotFoundError, match="train.resume_from"):
        _run(clips, tmp_path / "o", tmp_path / "c", **{"train.resume_from": str(tmp_path / "nowhere")})


def test_cogpipe_export_command(trained, tmp_path, capsys):
    from cogpipe.cli import main

    out = tmp_path / "copy"
    shutil.copytree(trained[0] / "checkpoints", out / "checkpoints")
    assert main(["export", str(out)]) == 0
    assert (out / "export" / "model_index.json").is_file()
    a = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(trained[0] / "lora" / "pytorch_lora_weights.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert f"{out / 'export'}" in capsys.readouterr().out

    # again, from the first checkpoint: beside the run's own folders, which keep their bytes
    first = out / "checkpoints" / "checkpoint-000002"
    kept = (out / "lora" / "pytorch_lora_weights.safetensors").read_bytes()
    assert main(["export", str(out), "--checkpoint", str(first)]) == 0
    said = capsys.readouterr().out
    assert f"{out / 'export-checkpoint-000002'}" in said and f"{out / 'lora-checkpoint-000002'}" in said, said
    assert (out / "export-checkpoint-000002" / "model_index.json").is_file()
    assert (out / "lora-checkpoint-000002" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "lora" / "pytorch_lora_weights.safetensors").read_bytes() == kept
    # a third time: refused, naming what exists and --overwrite
    assert main(["export", str(out), "--checkpoint", str(first)]) == 2
    err = capsys.readouterr().err
    assert "export-checkpoint-000002" in err and "--overwrite" in err and "nothing written" in err
    # --overwrite rewrites lora/ from the checkpoint asked for
    assert main(["export", str(out), "--checkpoint", str(first), "--overwrite"]) == 0
    assert (out / "lora" / "pytorch_lora_weights.safetensors").read_bytes() != kept
    assert main(["export", str(out), "--checkpoint", str(out / "nowhere")]) == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_infer_cli_writes_requested_video(trained, tmp_path):
    from cogpipe.video import read_video

    out = trained[0]
    video = tmp_path / "x.mp4"
    r = subprocess.run([sys.executable, str(REPO / "infer.py"), "--model", str(out / "export"), "--lora",
                        str(out / "lora"), "--prompt", "a red ball", "--num-frames", "9", "--height", "64",
                        "--width", "96", "--steps", "2", "--output", str(video)],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert read_video(video).shape == (9, 64, 96, 3)


def test_same_seed_same_video(trained):
    from cogpipe.inference import generate, load_pipeline

    pipe = load_pipeline(trained[0] / "export", trained[0] / "lora")
    a = generate(pipe, "a red ball", num_frames=9, steps=2, seed=5)
    b = generate(pipe, "a red ball", num_frames=9, steps=2, seed=5)
    c = generate(pipe, "a red ball", num_frames=9, steps=2, seed=6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
