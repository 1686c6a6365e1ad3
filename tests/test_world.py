"""A launch forms the world its launcher asked for, or is refused before any write (cogpipe.sharding.world_problem,
checked in training._start). On a machine without CUDA, a DeepSpeed or FSDP launch without DS_ACCELERATOR gets it from
cogpipe (sharding.cpu_accelerator_chosen) and really shards, as with the variable: tests/test_launchers.py runs every
launcher with DS_ACCELERATOR=cpu set and asserts the same distributed type, world and backend. One step each."""

import pytest
import torch

from helpers import launch

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only launch paths")

ONE_STEP = {"train.max_steps": 1, "train.checkpoint_every": 0, "validation.prompts": "[]"}


def _described(r) -> dict:
    import json

    lines = [line for line in r.stdout.splitlines() if line.startswith("sharding: ")]
    assert lines, r.stdout[-2000:] + r.stderr[-2000:]
    return json.loads(lines[0][len("sharding: "):])


@pytest.mark.parametrize("launcher,distributed_type", [("zero2", "DEEPSPEED"), ("fsdp", "FSDP")])
def test_sharded_launch_without_the_variable_shards(launcher, distributed_type, clips, tmp_path):
    r = launch(launcher, clips, tmp_path / "out", tmp_path / "cache", switch={}, **ONE_STEP)
    d = _described(r)
    assert (d["distributed_type"], d["world"], d["backend"]) == (distributed_type, 2, "gloo"), d
    assert d["launcher"] == {"zero2": "zero2", "fsdp": "fsdp2"}[launcher], d
    if launcher == "fsdp":
        assert d["dtensor_params"] == d["params"] > 0, d
    assert "DS_ACCELERATOR=cpu, set by cogpipe" in r.stdout
    assert (tmp_path / "out" / "checkpoints" / "checkpoint-000001").is_dir()


def test_a_world_that_does_not_form_is_refused_before_any_write(clips, tmp_path):
    """DDP on CPU processes without accelerate's CPU switch: each process would count a world of one."""
    r = launch("ddp", clips, tmp_path / "out", tmp_path / "cache", check=False, switch={}, **ONE_STEP)
    assert r.returncode != 0
    assert "the launcher started 2 processes (WORLD_SIZE=2)" in r.stderr, r.stderr[-3000:]
    assert "accelerate counts 1 (distributed_type NO)" in r.stderr and "ACCELERATE_USE_CPU=1" in r.stderr
    assert r.stderr.count("error: the launcher started 2 processes") == 2  # both ranks refuse
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
