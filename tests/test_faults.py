"""Nothing lost: bad inputs are reported by file and rule, faults while training keep the last good
state, and a run killed at any moment resumes to the same weights as one never killed."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cogpipe import atomic, checkpoint
from cogpipe.config import load_config
from cogpipe.data.folders import DataError, scan

from helpers import REPO, SPECS, make_clips, tiny_overrides

RECIPE = REPO / "configs" / "tiny_lora.yaml"


def _cfg(root, tmp_path, **extra):
    return load_config(RECIPE, tiny_overrides(root, tmp_path / "out", tmp_path / "cache", **extra))


def _problems(cfg):
    from cogpipe.data.checks import check_dataset

    return check_dataset(cfg)


# ---- bad inputs -------------------------------------------------------------------------------

BAD_CASES = {
    "zero-byte video": (lambda root: (root / "videos" / "00_purple_square_right.mp4").write_bytes(b""),
                        "00_purple_square_right.mp4", "empty file"),
    "corrupt video": (lambda root: (root / "videos" / "00_purple_square_right.mp4").write_bytes(os.urandom(3000)),
                      "00_purple_square_right.mp4", "cannot decode"),
    "missing video": (lambda root: (root / "videos" / "00_purple_square_right.mp4").unlink(),
                      "00_purple_square_right.mp4", "video file not found"),
    "empty caption": (lambda root: (root / "prompts.txt").write_text(
        "a purple square moving right\n\na purple triangle moving left\na purple square moving down\n"),
                      "01_purple_circle_up.mp4", "empty caption"),
    "caption not UTF-8": (lambda root: (root / "prompts.txt").write_bytes(
        b"a purple square moving right\na purple \xff\xfe circle\na purple triangle moving left\n"
        b"a purple square moving down\n"), "prompts.txt:2", "not valid UTF-8"),
    "path escaping the folder": (lambda root: (root / "videos.txt").write_text(
        "videos/00_purple_square_right.mp4\n../../../etc/passwd\nvideos/02_purple_triangle_left.mp4\n"
        "videos/03_purple_square_down.mp4\n"), "videos.txt:2", "escapes the dataset folder"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_named_with_its_rule(case, tmp_path):
    root = make_clips(tmp_path / "d", SPECS)
    damage, file_part, rule = BAD_CASES[case]
    damage(root)
    good, problems = _problems(_cfg(root, tmp_path))
    assert len(problems) == 1, problems
    assert file_part in problems[0].file and rule in problems[0].rule
    assert len(good) == 3


def test_short_and_small_clips(tmp_path):
    root = make_clips(tmp_path / "d", SPECS[:2])
    from cogpipe.video import write_mp4

    write_mp4(np.full((9, 64, 64, 3), 128, np.uint8), root / "videos" / "00_purple_square_right.mp4")
    write_mp4(np.full((17, 32, 32, 3), 128, np.uint8), root / "videos" / "01_purple_circle_up.mp4")
    _, problems = _problems(_cfg(root, tmp_path))
    rules = {os.path.basename(p.file): p.rule for p in problems}
    assert "fewer than data.frames=17" in rules["00_purple_square_right.mp4"]
    assert "smaller than data.height x data.width" in rules["01_purple_circle_up.mp4"]


def test_mismatched_lists_and_missing_caption_file(tmp_path):
    root = make_clips(tmp_path / "d", SPECS[:2])
    (root / "prompts.txt").write_text("one caption only\n")
    good, problems = scan(root)  # the structural problem is reported with the entries it leaves unpaired
    assert [s.caption for s in good] == ["one caption only"]
    assert any(re.search("prompts.txt has 1 lines but .*videos.txt has 2", str(p)) for p in problems)
    assert any(p.file.endswith("videos.txt:2") and "no line for this video in prompts.txt" in p.rule for p in problems)
    folder = make_clips(tmp_path / "f", SPECS[:2], layout="folder")
    (folder / "01_purple_circle_up.txt").unlink()
    good, problems = scan(folder)
    assert len(good) == 1 and "no caption file 01_purple_circle_up.txt" in str(problems[0])


def test_last_caption_empty_with_a_corrupt_and_a_missing_clip(tmp_path, capsys):
    """A prompts.txt whose last caption is empty ends with an empty line: counted as a line (an empty caption),
    reported with every other problem; with data.skip_bad=true the rest trains, no caption shifted."""
    from cogpipe.cli import main
    from cogpipe.training import train

    root = make_clips(tmp_path / "d", SPECS + [("circle", "purple", "down"), ("triangle", "purple", "up")])
    captions = (root / "prompts.txt").read_text().splitlines()
    (root / "prompts.txt").write_text("\n".join(captions[:-1]) + "\n\n")  # the last caption is empty
    (root / "videos" / "01_purple_circle_up.mp4").write_bytes(os.urandom(3000))  # corrupt
    (root / "videos" / "02_purple_triangle_left.mp4").unlink()  # missing
    args = ["check", "--config", str(RECIPE), f"data.root={root}", f"data.cache_dir={tmp_path / 'c'}"]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "3 problem(s)" in out and "04_purple_circle_down" not in out
    assert "05_purple_triangle_up.mp4: empty caption (" in out and "videos.txt:6" in out
    assert "01_purple_circle_up.mp4: cannot decode" in out
    assert "02_purple_triangle_left.mp4: video file not found" in out
    assert main(args + ["data.skip_bad=true"]) == 0
    out = train(_cfg(root, tmp_path, **{"data.skip_bad": True, "train.max_steps": 1, "train.batch_size": 1}))
    assert (out / "checkpoints" / "checkpoint-000001").is_dir()
    good, _ = _problems(_cfg(root, tmp_path))  # what training trained on
    assert [(s.video.name, s.caption) for s in good] == [
        (f"{i:02d}_purple_{shape}_{d}.mp4", f"a purple {shape} moving {d}") for i, (shape, _, d) in
        [(0, SPECS[0]), (3, SPECS[3]), (4, ("circle", "purple", "down"))]]


def test_training_refuses_with_one_report_or_skips(tmp_path):
    from cogpipe.training import train

    root = make_clips(tmp_path / "d", SPECS + [("circle", "purple", "down")])
    (root / "videos" / "00_purple_square_right.mp4").write_bytes(b"")
    (root / "videos" / "02_purple_triangle_left.mp4").write_bytes(b"garbage" * 100)
    with pytest.raises(DataError) as e:
        train(_cfg(root, tmp_path))
    msg = str(e.value)
    assert "2 problem(s)" in msg and "00_purple_square_right.mp4: empty file" in msg
    assert "02_purple_triangle_left.mp4: cannot decode" in msg and "data.skip_bad" in msg
    assert not (tmp_path / "out" / "checkpoints").exists()
    out = train(_cfg(root, tmp_path, **{"data.skip_bad": True, "train.max_steps": 1}))
    assert (out / "checkpoints" / "checkpoint-000001").is_dir()


def test_no_usable_clip(tmp_path):
    from cogpipe.data.checks import usable_samples

    root = make_clips(tmp_path / "d", SPECS[:1])
    (root / "videos" / "00_purple_square_right.mp4").write_bytes(b"")
    with pytest.raises(DataError, match="no usable clip"):
        usable_samples(_cfg(root, tmp_path, **{"data.skip_bad": True}), log=lambda *_: None)


def test_cogpipe_check_command(tmp_path, capsys):
    from cogpipe.cli import main

    root = make_clips(tmp_path / "d", SPECS)
    args = ["check", "--config", str(RECIPE), f"data.root={root}", f"data.cache_dir={tmp_path / 'c'}"]
    assert main(args) == 0
    (root / "videos" / "03_purple_square_down.mp4").write_bytes(os.urandom(5000))
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "03_purple_square_down.mp4: cannot decode" in out and "training would refuse" in out
    assert main(args + ["data.skip_bad=true"]) == 0
    assert main(["check", "--config", str(RECIPE), "model.latent_input=false"]) == 2


# ---- faults while training --------------------------------------------------------------------

@pytest.mark.parametrize("log_every,stop_step,in_a_row,skipped", [(1, 6, 3, 4), (4, 8, 5, 6)])
def test_non_finite_losses_are_skipped_then_stop(clips, tmp_path, monkeypatch, log_every, stop_step, in_a_row,
                                                 skipped):
    """Steps 2 and from 4 on give NaN. The host sees the device's counts only every train.log_every steps: with 1 the
    run stops at the third bad step in a row (6); with 4 at the first look after it (8, five in a row)."""
    import cogpipe.training as training

    real = training.diffusion_loss
    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        loss = real(*args)
        return loss * float("nan") if calls["n"] == 2 or calls["n"] >= 4 else loss

    monkeypatch.setattr(training, "diffusion_loss", flaky)
    cfg = _cfg(clips, tmp_path, **{"train.max_steps": 20, "train.checkpoint_every": 0, "train.max_bad_steps": 3,
                                   "train.log_every": log_every})
    with pytest.raises(FloatingPointError, match=f"{in_a_row} non-finite losses in a row") as e:
        training.train(cfg)
    name = f"checkpoint-{stop_step:06d}"
    assert name in str(e.value)
    state = checkpoint.read_state(tmp_path / "out" / "checkpoints" / name)
    assert state["step"] == stop_step and state["skipped_steps"] == skipped
    weights = load_file(str(tmp_path / "out" / "checkpoints" / name / checkpoint.TRAINABLE))
    assert all(torch.isfinite(v).all() for v in weights.values())
    logged = [json.loads(x)["step"] for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(log_every, stop_step + 1, log_every))


def test_full_disk_keeps_the_previous_checkpoint(clips, tmp_path, monkeypatch):
    import cogpipe.checkpoint as ckpt
    from cogpipe.training import train

    real = ckpt.save_trainable

    def disk_full(state_dict, names, directory):
        if "000004" in str(directory):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(state_dict, names, directory)

    monkeypatch.setattr(ckpt, "save_trainable", disk_full)
    with pytest.raises(OSError, match="previous checkpoint \\(checkpoint-000002\\) is intact"):
        train(_cfg(clips, tmp_path))
    root = tmp_path / "out" / "checkpoints"
    assert (root / "latest").read_text() == "checkpoint-000002"
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-000002", "latest"]
    assert checkpoint.read_state(root / "checkpoint-000002")["step"] == 2


def test_out_of_memory_names_the_switches(clips, tmp_path, monkeypatch):
    from diffusers import CogVideoXTransformer3DModel

    from cogpipe.training import train

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(CogVideoXTransformer3DModel, "forward", oom)
    with pytest.raises(MemoryError) as e:
        train(_cfg(clips, tmp_path))
    assert "train.gradient_checkpointing=true" in str(e.value) and "cogpipe plan" in str(e.value)


# ---- kill and resume --------------------------------------------------------------------------

def _launch(clips, out, cache, env=None, **extra):
    args = tiny_overrides(clips, out, cache, **{"train.max_steps": 6, "train.checkpoint_every": 1,
                                                "train.resume_from": "latest", **extra})
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), "--config", str(RECIPE), *args], cwd=REPO,
                            env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _final(out):
    return load_file(str(out / "checkpoints" / "checkpoint-000006" / checkpoint.TRAINABLE))


def _wait_for_step(out, step, proc, timeout=120):
    deadline = time.time() + timeout
    metrics = out / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists() and any(json.loads(x)["step"] >= step for x in metrics.read_text().splitlines() if x):
            return
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


@pytest.fixture(scope="module")
def reference(clips, tmp_path_factory):
    base = tmp_path_factory.mktemp("ref")
    proc = _launch(clips, base / "out", base / "cache")
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    return _final(base / "out"), base / "cache"


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigkill_between_steps_then_resume_is_bit_identical(clips, reference, tmp_path):
    expected, cache = reference
    out = tmp_path / "out"
    kill_at = int(np.random.default_rng().integers(1, 5))
    proc = _launch(clips, out, cache)
    _wait_for_step(out, kill_at, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc = _launch(clips, out, cache)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    assert _same(_final(out), expected), f"killed after step {kill_at}"


@pytest.mark.slow
def test_sigkill_during_a_save_then_resume_is_bit_identical(clips, reference, tmp_path):
    expected, cache = reference
    out = tmp_path / "out"
    proc = _launch(clips, out, cache, env={"COGPIPE_FAILPOINT": "checkpoint-save:3"})
    assert proc.wait(timeout=300) == -signal.SIGKILL
    root = out / "checkpoints"
    assert (root / "latest").read_text() == "checkpoint-000002"  # never names the partial one
    assert atomic.temps(root, "checkpoint-000003") and not (root / "checkpoint-000003").exists()
    proc = _launch(clips, out, cache)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    assert not atomic.temps(root, "checkpoint-000003")
    assert _same(_final(out), expected)


@pytest.mark.slow
def test_sigterm_saves_then_exits(clips, reference, tmp_path):
    expected, cache = reference
    out = tmp_path / "out"
    # SIGTERM arrives in the middle of step 3 (between forward and backward): a signal sent from outside
    # raced the 6 fast steps and could land after the last one.
    # SIGUSR1 at step 2 first: every thread's stack to stderr (README: Troubleshooting), and the run goes on
    proc = _launch(clips, out, cache, env={"COGPIPE_FAILPOINT": "train-step:2=USR1;train-step:3=TERM"},
                   **{"train.checkpoint_every": 0})
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, proc.stderr.read().decode()[-2000:]
    stderr = proc.stderr.read().decode()
    assert re.search(r"Current thread 0x[0-9a-f]+ \(most recent call first\):\n(  File .*\n)*  File \".*training\.py\""
                     r", line \d+ in _micro_step", stderr), stderr[-3000:]
    assert (out / "checkpoints" / "latest").read_text() == "checkpoint-000003"
    assert checkpoint.read_state(out / "checkpoints" / "checkpoint-000003")["step"] == 3
    assert not (out / "checkpoints" / "checkpoint-000004").exists()
    proc = _launch(clips, out, cache, **{"train.checkpoint_every": 0})
    assert proc.wait(timeout=300) == 0
    assert _same(_final(out), expected)
