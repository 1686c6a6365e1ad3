"""Clips of different lengths go to the nearest bucket; batches stay within a bucket."""

import pytest

from cogpipe.config import ConfigError, load_config
from cogpipe.data.batches import epoch_batches
from cogpipe.data.folders import choose_bucket

from helpers import REPO, make_clips, tiny_overrides

RECIPE = REPO / "configs" / "tiny_lora.yaml"


def test_choose_bucket_prefers_aspect_then_area_then_frames():
    buckets = [(17, 64, 64), (9, 64, 64), (17, 64, 112), (17, 128, 128)]
    assert choose_bucket((30, 64, 64), buckets) == (17, 64, 64)
    assert choose_bucket((12, 64, 64), buckets) == (9, 64, 64)
    assert choose_bucket((20, 72, 128), buckets) == (17, 64, 112)  # wide clip, wide bucket
    assert choose_bucket((40, 256, 256), buckets) == (17, 128, 128)  # the largest that fits
    assert choose_bucket((5, 64, 64), buckets) is None
    assert choose_bucket((30, 48, 48), buckets) is None


def test_epoch_batches_stay_in_one_bucket_and_split_across_processes():
    shapes = [(17, 64, 64)] * 5 + [(9, 64, 64)] * 4
    one = epoch_batches(shapes, 2, 0, 0, 0, 1)
    assert len(one) == 2 + 2  # 5 -> 2 batches (one left over), 4 -> 2
    assert all(len({shapes[i] for i in b}) == 1 for b in one)
    r0, r1 = epoch_batches(shapes, 1, 0, 0, 0, 2), epoch_batches(shapes, 1, 0, 0, 1, 2)
    assert [a + b for a, b in zip(r0, r1)] == one  # the same global batches on 2 processes
    assert epoch_batches(shapes, 2, 0, 1, 0, 1) != one  # a new order each epoch


def test_bucket_rules_are_checked():
    with pytest.raises(ConfigError, match=r"data.buckets\[1\]"):
        load_config(RECIPE, ["data.buckets=[[17,64,64],[12,64,64]]"])
    with pytest.raises(ConfigError, match=r"data.buckets\[0\]"):
        load_config(RECIPE, ["data.buckets=[[17,64,70]]"])


def test_training_on_two_buckets(tmp_path, capsys):
    from safetensors.torch import load_file

    from cogpipe.training import train

    root = tmp_path / "d"
    specs = [("square", "purple", "right"), ("circle", "purple", "up"), ("triangle", "purple", "left")]
    make_clips(root, specs)  # 17 frames
    make_clips(tmp_path / "short", specs[:2] + [("square", "purple", "down")], frames=9)
    make_clips(tmp_path / "tiny", specs[:1], frames=5)
    lines = [(root / "videos.txt").read_text(), (root / "prompts.txt").read_text()]
    for extra in ("short", "tiny"):
        for f in (tmp_path / extra / "videos").iterdir():
            (root / "videos" / f"{extra}_{f.name}").write_bytes(f.read_bytes())
            lines[0] += f"videos/{extra}_{f.name}\n"
        lines[1] += (tmp_path / extra / "prompts.txt").read_text()
    (root / "videos.txt").write_text(lines[0])
    (root / "prompts.txt").write_text(lines[1])
    cfg = load_config(RECIPE, tiny_overrides(root, tmp_path / "out", tmp_path / "cache", **{
        "data.buckets": "[[17,64,64],[9,64,64]]", "train.max_steps": 3, "train.batch_size": 2}))
    out = train(cfg)
    log = capsys.readouterr().out
    assert "skipped 1 clip(s) that fit no bucket" in log and "1 too short" in log
    assert "9x64x64: 3" in log and "17x64x64: 3" in log
    files = (tmp_path / "cache" / "latents").rglob("*.safetensors")
    shapes = sorted(tuple(load_file(str(p))["mean"].shape) for p in files)
    assert shapes == [(16, 3, 8, 8)] * 3 + [(16, 5, 8, 8)] * 3
    assert (out / "checkpoints" / "checkpoint-000003").is_dir()
