"""The output folder a run owns (cogpipe/rundir.py): a fresh start into a used folder is refused before anything is
written, train.overwrite moves the old run aside whole, a live run's lock keeps a second launch out, a dead one's is
taken over; the page refuses the same way."""

import json
import os
import socket
import subprocess
import sys

import pytest

from cogpipe import rundir
from cogpipe.config import ConfigError, load_config
from cogpipe.training import train

from helpers import REPO, child_env, launch, run_tiny, tiny_overrides

RECIPE = REPO / "configs" / "tiny_lora.yaml"


def _listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _used(folder):
    (folder / "checkpoints" / "checkpoint-000002").mkdir(parents=True)
    (folder / "checkpoints" / "latest").write_text("checkpoint-000002")
    (folder / "config.yaml").write_text("old: run\n")
    return _listing(folder)


def test_fresh_start_into_a_used_folder_is_refused_before_any_write(clips, tmp_path, capsys):
    out = tmp_path / "out"
    before = _used(out)
    cfg = load_config(RECIPE, tiny_overrides(clips, out, tmp_path / "cache", report_to="wandb"))
    with pytest.raises(rundir.OutputDirInUse) as e:
        train(cfg)
    message = str(e.value)
    assert str(out) in message and "train.resume_from=latest" in message and "train.overwrite=true" in message
    assert "moved aside" in message and "checkpoints/" in message
    assert _listing(out) == before  # no config.yaml written over, no wandb/, no lock, nothing
    assert not (tmp_path / "cache").exists()  # nor anywhere else (the latent cache)
    # train.py: the same refusal, exit status 2
    from train import main

    assert main(["--config", str(RECIPE), *tiny_overrides(clips, out, tmp_path / "cache")]) == 2
    assert "train.overwrite=true" in capsys.readouterr().err and _listing(out) == before


def test_overwrite_moves_the_old_run_aside_whole(clips, tmp_path):
    out = tmp_path / "out"
    old = _used(out)
    (out / "ui_train.log").write_text("the launch now starting\n")  # the page's log of this launch stays with it
    run_tiny(clips, out, tmp_path / "cache", **{"train.overwrite": "true", "train.max_steps": 1,
                                                "train.checkpoint_every": 0, "validation.prompts": "[]"})
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("out.replaced-")]
    assert len(aside) == 1 and _listing(aside[0]) == [p for p in old]  # the old run, whole, nothing else
    assert (out / "ui_train.log").read_text() == "the launch now starting\n"
    assert (out / "checkpoints" / "latest").read_text() == "checkpoint-000001"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-000001", "latest"]  # no old ones
    assert not (out / rundir.LOCK).exists()  # released at the end
    # a resume into the used folder is no fresh start: allowed
    assert rundir.refusal(out, resume_from="latest") is None and rundir.refusal(out) is not None


HOLD = """
import sys, time
from cogpipe import rundir
rundir.claim(sys.argv[1], log=print)
print("held", flush=True)
time.sleep(60)
"""


def test_a_live_lock_refuses_a_second_launch_and_a_dead_ones_is_taken_over(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                              env=child_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = json.loads((out / rundir.LOCK).read_text())
        assert lock["pid"] == holder.pid
        for resume in (None, "latest"):  # a resume is refused as well while the run lives
            with pytest.raises(rundir.OutputDirInUse, match=f"a live run writes there \\(pid {holder.pid} on host "):
                rundir.claim(out, resume_from=resume)
        assert f"pid {holder.pid}" in rundir.refusal(out) and "started " in rundir.refusal(out)
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (SIGKILL: no release): its lock is recognised and taken over, with a line
    lines = []
    assert rundir.refusal(out) is None
    rundir.claim(out, log=lines.append)
    assert len(lines) == 1 and "took over the lock" in lines[0] and f"pid {holder.pid}" in lines[0]
    assert json.loads((out / rundir.LOCK).read_text())["pid"] == os.getpid()
    rundir.release(out)
    assert not (out / rundir.LOCK).exists()
    # a lock held on another host cannot be judged here: refused, saying which file to delete
    (out / rundir.LOCK).write_text(json.dumps({"host": "elsewhere-" + socket.gethostname(), "pid": 1, "start": 1,
                                               "started": 0}))
    with pytest.raises(rundir.OutputDirInUse, match=f"delete {out / rundir.LOCK}"):
        rundir.claim(out)


def test_every_rank_hears_the_refusal_and_none_writes(clips, tmp_path):
    """Two DDP processes into a used folder: the main process refuses, the other rank learns it before any write."""
    out = tmp_path / "out"
    before = _used(out)
    r = launch("ddp", clips, out, tmp_path / "cache", check=False, report_to="wandb")
    assert r.returncode != 0
    assert "train.overwrite=true" in r.stderr and "the main process refused the output folder" in r.stderr
    assert _listing(out) == before and not (tmp_path / "cache").exists()


def test_the_page_refuses_the_same_way(tmp_path):
    from cogpipe.ui import recipes
    from cogpipe.ui.safety import PathGuard

    outputs = tmp_path / "outputs"
    _used(outputs / "r")
    guard = PathGuard([outputs, REPO / "configs", REPO / "models", REPO / "data"])

    def job(text="", name="r"):
        return recipes.training_job(RECIPE, text, name, outputs, guard, REPO / "train.py", REPO / "configs")

    with pytest.raises(ConfigError, match="holds another run .*train.resume_from=latest.*train.overwrite=true"):
        job()
    assert job("train.overwrite=true").run_dir == (outputs / "r").resolve()
    assert job("train.resume_from=latest").run_dir == (outputs / "r").resolve()
    # a fresh folder whose job is already queued on the page: refused before a second one is queued
    queued = job(name="fresh")
    with pytest.raises(ConfigError, match="already queued or running"):
        recipes.training_job(RECIPE, "", "fresh", outputs, guard, REPO / "train.py", REPO / "configs", jobs=[queued])
