"""`cogpipe prepare` (issue 32): split raw videos into clips that follow the recipe, score and filter them, caption
them with a vision-language model, write the manifest and folder layouts. Tiny synthetic videos made here."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cogpipe.config import load_config
from cogpipe.data.prepare import split
from cogpipe.video import open_video, probe, write_mp4

from fixtures.tiny_vlm import make_tiny_vlm
from helpers import NEEDS_DATA, NEEDS_PREPARE, REPO

pytestmark = NEEDS_DATA + NEEDS_PREPARE  # the extras these tests need: skipped, named, where missing

CUTS = [40, 95, 150]
RECIPE = str(REPO / "configs" / "tiny_lora.yaml")
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def synth(n, cuts, h=72, w=96, seed=0):
    """n frames with a hard cut at each of `cuts`: each shot its own background colour and a moving disc."""
    rng = np.random.default_rng(seed)
    bounds = [0, *cuts, n]
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.zeros((n, h, w, 3), np.uint8)
    for a, b in zip(bounds[:-1], bounds[1:]):
        base = rng.integers(30, 225, 3)
        cx, cy = int(rng.integers(10, w - 10)), int(rng.integers(10, h - 10))
        for f in range(a, b):
            x = (cx + (f - a)) % w
            out[f] = base
            out[f][((xx - x) ** 2 + (yy - cy) ** 2) < 100] = 255 - base
    return out


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("raw")
    write_mp4(synth(200, CUTS), d / "cuts.mp4", fps=30)
    write_mp4(synth(300, [200], seed=1), d / "long_short.mp4", fps=30)  # a 200-frame shot, then a 100-frame one
    write_mp4(synth(330, [], seed=2), d / "one_shot.mp4", fps=30)
    return d


def _target(recipe, *overrides):
    return split.target_for(load_config(recipe, list(overrides), validate_model=False))


def test_hard_cuts_found_within_one_frame_and_no_others(videos):
    with open_video(videos / "cuts.mp4") as reader:
        cuts = split.detect_cuts(reader)
    assert len(cuts) == len(CUTS), cuts
    assert all(abs(a - b) <= 1 for a, b in zip(cuts, CUTS)), cuts
    with open_video(videos / "one_shot.mp4") as reader:
        assert split.detect_cuts(reader) == []


def test_recipe_targets_follow_the_model_version():
    tiny = _target("configs/tiny_lora.yaml")
    assert (tiny.version, tiny.fps, tiny.shapes) == ("1.0", 8.0, ((17, 64, 64),))
    v10 = _target("configs/cogvideox_2b_lora.yaml")
    assert (v10.version, v10.fps, v10.shapes) == ("1.0", 8.0, ((49, 480, 720),))
    v15 = _target("configs/cogvideox1.5_5b_lora.yaml")
    assert (v15.version, v15.fps) == ("1.5", 16.0) and (v15.shapes[0][0] - 1) % 16 == 0


def test_windows_resample_the_frame_rate_never_slow_motion():
    t = split.Target(fps=8.0, shapes=((49, 32, 48),))
    frames, wins, reason = split.windows(0, 400, 30.0, t)
    assert reason is None and frames == 49 and len(wins) == 2  # 400 frames = 13.3 s: two windows of 6 s
    for idx in wins:
        assert len(idx) == 49
        assert (idx[-1] - idx[0]) / 30.0 == pytest.approx(48 / 8.0, abs=1 / 30)  # 6 s of source time
        assert set(np.diff(idx)) <= {3, 4}  # 30/8 = 3.75 source frames per clip frame
    assert wins[1][0] - wins[0][0] == round(49 * 30 / 8)  # consecutive, no overlap
    assert split.windows(0, 150, 30.0, t)[2].startswith("shot too short")
    assert "slow motion" in split.windows(0, 1000, 6.0, t)[2]


@pytest.mark.parametrize("recipe, frames, fps, clips", [
    ("configs/cogvideox_2b_lora.yaml", 49, 8, {"long_short.mp4": 1, "one_shot.mp4": 1}),
    ("configs/cogvideox1.5_5b_lora.yaml", 81, 16, {"long_short.mp4": 1, "one_shot.mp4": 2}),
])
def test_clips_decode_to_exactly_the_recipes_frames_fps_and_size(videos, tmp_path, recipe, frames, fps, clips):
    target = _target(recipe, "data.height=32", "data.width=64", f"data.frames={frames}")
    for name, count in clips.items():
        record = split.split_video(str(videos / name), target, tmp_path)
        assert len(record["clips"]) == count, record
        for row in record["clips"]:
            info = probe(tmp_path / row["clip"])
            # 64 wide: decord reads no 48-wide clip (docs/video.md), and the suite runs with decord where installed
            assert (info.num_frames, info.fps, info.height, info.width) == (frames, fps, 32, 64)
        if name == "long_short.mp4":  # the 100-frame shot (3.3 s) is too short for 49 frames at 8 fps (6 s)
            assert [d["reason"].split(":")[0] for d in record["dropped"]] == ["shot too short"]


def _moving(seed, n=17, h=64, w=64):
    """A textured background with a bright square moving 2 px a frame."""
    rng = np.random.default_rng(seed)
    tex = rng.integers(0, 255, (h // 8, w // 8, 3)).astype(np.uint8).repeat(8, 0).repeat(8, 1)
    out = np.repeat(tex[None], n, axis=0).copy()
    for f in range(n):
        out[f, 20:36, 4 + 2 * f:20 + 2 * f] = 250
    return out


def test_filters_record_scores_then_drop_each_with_its_reason(tmp_path):
    import cv2

    from cogpipe.data.prepare import filters

    moving = _moving(0)
    blurred = np.stack([cv2.GaussianBlur(f, (0, 0), 3) for f in _moving(5)])
    clips = {"a_moving.mp4": moving, "b_copy.mp4": np.clip(moving.astype(int) + 2, 0, 255).astype(np.uint8),
             "c_still.mp4": np.repeat(moving[:1], 17, axis=0), "d_black.mp4": np.zeros_like(moving),
             "e_blurred.mp4": blurred}
    for name, frames in clips.items():
        write_mp4(frames, tmp_path / name, fps=8)
    scored = {name: filters.score_clip(tmp_path / name) for name in clips}
    assert set(scored["a_moving.mp4"]) == {"motion", "sharpness", "dark", "frozen", "dhash"}
    assert scored["a_moving.mp4"]["motion"] > 0.2 > 0.01 > scored["c_still.mp4"]["motion"]
    assert scored["c_still.mp4"]["frozen"] == 1.0 and scored["a_moving.mp4"]["frozen"] == 0.0
    assert scored["d_black.mp4"]["dark"] == 1.0 and scored["a_moving.mp4"]["dark"] == 0.0
    assert scored["e_blurred.mp4"]["sharpness"] < scored["a_moving.mp4"]["sharpness"] / 4

    drops = filters.apply(scored, filters.Thresholds())
    assert drops["a_moving.mp4"] is None and drops["e_blurred.mp4"] is None
    assert drops["b_copy.mp4"].startswith("near-duplicate: ") and "from a_moving.mp4" in drops["b_copy.mp4"]
    assert "too little motion" in drops["c_still.mp4"] and "frozen frames" in drops["c_still.mp4"]
    assert drops["d_black.mp4"].startswith("black frames") or "black frames" in drops["d_black.mp4"]
    # thresholds apply to the recorded scores: a sharpness bar drops the blurred clip, no rescoring
    middle = (scored["e_blurred.mp4"]["sharpness"] + scored["a_moving.mp4"]["sharpness"]) / 2
    drops = filters.apply(scored, filters.Thresholds(min_sharpness=middle, max_dup_distance=-1))
    assert drops["e_blurred.mp4"].startswith("blurred") and drops["a_moving.mp4"] is None
    assert drops["b_copy.mp4"] is None  # duplicate check off


def test_buckets_take_the_longest_frames_that_fit_then_the_closest_aspect():
    t = split.Target(fps=8.0, shapes=((17, 64, 96), (17, 64, 64), (9, 64, 64)))
    frames, wins, _ = split.windows(0, 40, 30.0, t)  # 40 frames at 30 fps: 1.3 s, 9 frames at 8 fps need 1 s
    assert frames == 9 and len(wins) == 1
    assert split.windows(0, 100, 30.0, t)[0] == 17
    assert split.fit_shape(17, 720, 1280, t.shapes) == (17, 64, 96)  # 16:9 -> the wide bucket
    assert split.fit_shape(17, 480, 480, t.shapes) == (17, 64, 64)
    wide = np.zeros((2, 72, 160, 3), np.uint8)
    wide[:, :, 40:120] = 200  # the centre 80 columns of 160: a 72x108 crop keeps them in the middle
    out = split.crop_resize(wide, 64, 96)
    assert out.shape == (2, 64, 96, 3) and out[0, 32, 48, 0] == 200 and out[0, 32, 2, 0] == 0


def test_bad_input_is_named(tmp_path, capsys):
    from cogpipe.cli import main

    assert main(["prepare", str(tmp_path / "missing"), "--for", "configs/tiny_lora.yaml", "--out",
                 str(tmp_path / "o")]) == 2
    assert "missing: no such file or folder" in capsys.readouterr().err
    assert main(["prepare", "write", "--for", "configs/tiny_lora.yaml", "--out", str(tmp_path / "o")]) == 2
    assert "nothing split here yet" in capsys.readouterr().err


def test_captions_are_cut_at_a_sentence_end_within_the_recipes_t5_length():
    from cogpipe.data.prepare.caption import fit_caption, sample_indices, t5_count
    from cogpipe.models import build_tokenizer

    t5 = build_tokenizer(load_config("configs/tiny_lora.yaml", []).model)
    text = "A dog runs.  The camera pans left. Waves roll onto the beach under a pale sky."
    assert fit_caption(t5, text, 200) == (" ".join(text.split()), t5_count(t5, " ".join(text.split())), False)
    cut, n, was_cut = fit_caption(t5, text, 40)
    assert (cut, was_cut) == ("A dog runs. The camera pans left.", True) and n == t5_count(t5, cut) <= 40
    cut, n, _ = fit_caption(t5, "a very long single sentence without any end at all", 20)
    assert cut == "a very long single" and n <= 20  # no sentence fits: whole words
    assert list(sample_indices(49, 8)) == [3, 9, 15, 21, 27, 33, 39, 45]


@pytest.fixture(scope="module")
def ray_local():
    from cogpipe.data import raycluster

    ray = raycluster.connect(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return make_tiny_vlm(tmp_path_factory.mktemp("vlm"))


@pytest.fixture(scope="module")
def prepared(ray_local, vlm, videos, tmp_path_factory):
    """`cogpipe prepare` of two raw videos for the tiny recipe (the whole run, in this process, on the module's Ray):
    (DIR, the argv, the log). The tests after it read DIR; the one that changes it puts it back."""
    import contextlib
    import io

    from cogpipe.cli import main

    raw = tmp_path_factory.mktemp("raw_copy")
    for name in ("long_short.mp4", "one_shot.mp4"):
        (raw / name).write_bytes((videos / name).read_bytes())
    out = tmp_path_factory.mktemp("prep") / "prepared"
    argv = ["prepare", str(raw), "--for", RECIPE, "--out", str(out), "--caption-model", vlm, "--max-new-tokens", "12",
            "--caption-batch", "8"]
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        assert main(argv) == 0
    return SimpleNamespace(out=out, argv=argv, log=log.getvalue())


def test_caption_killed_then_rerun_captions_only_the_clips_without_one(ray_local, vlm, prepared, tmp_path):
    """`cogpipe prepare caption` in a process of its own (on the module's Ray through --address, its captioning actor
    there), SIGKILLed by a failpoint once it has persisted its 2nd caption: the 2 captions are whole files of that run
    (no temp left), the rerun calls the model once a clip without a caption (batch 1: the actors count their model
    calls) and leaves the 2 files as they were; a third run calls no model. Captions are greedy (the killed run's,
    the rerun's and this process's are the same text), start with the trigger and fit the recipe's T5 length."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    from cogpipe import atomic
    from cogpipe.data.prepare import filters, pipeline
    from cogpipe.models import build_tokenizer

    cfg = load_config(RECIPE, [])
    out = tmp_path / "out"
    shutil.copytree(prepared.out / "clips", out / "clips")  # split and scored already: only captioning is left
    for part in ("split", "scores"):
        shutil.copytree(prepared.out / "work" / part, out / "work" / part)
    clips = pipeline.clip_rows(pipeline.load_records(out))
    drops = pipeline.decide(pipeline.run_scores(out, clips, log=lambda *_: None), filters.Thresholds())
    names = [c["clip"] for c in clips if drops[c["clip"]] is None]
    assert len(names) >= 3, drops
    cmd = [sys.executable, "-m", "cogpipe.cli", "prepare", "caption", "--for", RECIPE, "--out", str(out),
           "--caption-model", vlm, "--trigger", "zq", "--caption-batch", "1", "--max-new-tokens", "60",
           "--address", ray_local.get_runtime_context().gcs_address]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "COGPIPE_FAILPOINT": "caption-written:2"}
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert f"caption: {len(names)} clip(s), {len(names)} to caption" in killed.stdout
    captions_dir = out / "work" / "captions"
    written = {p.name[:-len(".json")]: p.read_bytes() for p in captions_dir.glob("*.json")}
    assert len(written) == 2 and set(written) <= set(names) and atomic.temps(out) == []
    first = [json.loads(b) for b in written.values()]  # whole JSON files, not torn
    assert len({r["run"] for r in first}) == 1 and all(r["caption"].startswith("zq, ") for r in first)

    logs = []
    kw = dict(model_id=vlm, trigger="zq", batch_size=1, max_new_tokens=60, log=logs.append)
    rest = pipeline.run_captions(out, names, cfg, **kw)
    assert sorted(rest["captioned"]) == sorted(set(names) - set(written))
    assert rest["model_calls"] == len(names) - 2, logs  # the model ran for the clips without a caption only
    assert {c: (captions_dir / f"{c}.json").read_bytes() for c in written} == written  # the killed run's kept
    again = pipeline.run_captions(out, names, cfg, **kw)
    assert (again["captioned"], again["model_calls"]) == ([], 0)  # all kept: no model, no Ray
    t5 = build_tokenizer(cfg.model)
    captions = rest["captions"]
    assert set(captions) == set(names) and len({r["run"] for r in captions.values()}) == 2
    for name in names:
        rec = captions[name]
        assert rec["caption"].startswith("zq, ") and len(rec["caption"]) > 4
        assert rec["tokens"] == len(t5(rec["caption"]).input_ids) <= rec["limit"] <= 226
        assert rec["limit"] == 48  # the tiny recipe's own text length (226 for the released models)
    assert any(r["cut"] for r in captions.values())  # 60 words do not fit in 48 byte tokens: cut at a word end
    # greedy: the same text on every run (the killed process's, the rerun's; again here, in this process)
    actor = pipeline.CaptionActor(vlm, cfg.model, 48, "zq", 8, None, 60, None)
    for name in names:
        got = actor(dict(clip=[name], path=[str(out / "clips" / name)]))
        assert got["caption"] == [captions[name]["caption"]]


def test_cli_prepares_a_folder_for_the_tiny_recipe_and_resumes(prepared, capsys):
    import json

    from cogpipe.cli import main
    from cogpipe.data.encode import plan
    from cogpipe.data.folders import scan
    from cogpipe.data.index import read_manifest
    from cogpipe.data.prepare.pipeline import load_records

    out, argv, log = prepared.out, prepared.argv, prepared.log
    assert "split: 2 source video(s), 2 to split" in log and "caption: " in log
    # 30 fps -> 8 fps, 17 frames (2 s): the 200-frame shot gives 3 windows, the 100-frame one 1, 330 frames 5
    records = {Path(r["source"]).name: r for r in load_records(out)}
    assert [len(records[n]["clips"]) for n in ("long_short.mp4", "one_shot.mp4")] == [4, 5]
    report = json.loads((out / "report.json").read_text())
    rows = read_manifest(out)
    assert len(rows) == 9 and report["kept"] == sum(r["problem"] is None for r in rows) > 0
    assert report["warning"].startswith(f"only {report['kept']} clips")
    for r in rows:
        assert (r["frames"], r["fps"], r["height"], r["width"]) == (17, 8.0, 64, 64)
        info = probe(r["uri"])
        assert (info.num_frames, info.fps, info.height, info.width) == (17, 8.0, 64, 64)
    # the layouts train.py reads, and the manifest `cogpipe data encode` takes as it is
    samples, problems = scan(out)
    assert len(samples) == report["kept"] and not problems
    assert [s.caption for s in samples] == (out / "prompts.txt").read_text().splitlines()
    planned = plan(load_config(RECIPE, []), rows, set())
    assert len(planned) == report["kept"] and planned.problems == 9 - report["kept"]
    # started again: nothing is split, scored or captioned again
    before = {p: p.stat().st_mtime_ns for p in (out / "work").rglob("*.json")}
    assert main(argv) == 0
    log = capsys.readouterr().out
    assert "2 to split" not in log and "0 to split" in log and "0 to score" in log and " 0 to caption" in log
    assert {p: p.stat().st_mtime_ns for p in (out / "work").rglob("*.json")} == before
    # one stage alone: `write` with a stricter threshold re-applies it to the recorded scores, scoring nothing again
    layouts = {name: (out / name).read_bytes() for name in ("videos.txt", "prompts.txt", "metadata.jsonl")}
    assert main(["prepare", "write", "--for", RECIPE, "--out", str(out), "--min-motion", "1e6"]) == 1
    strict = json.loads((out / "report.json").read_text())
    assert strict["kept"] == 0 and strict["dropped"]["too little motion"] == 9
    assert (out / "videos.txt").read_text() == "" and all(r["problem"] for r in read_manifest(out))
    assert {p: p.stat().st_mtime_ns for p in (out / "work").rglob("*.json")} == before
    # and without it again: the same set as before (the later tests train on it)
    assert main(["prepare", "write", "--for", RECIPE, "--out", str(out)]) == 0
    assert {name: (out / name).read_bytes() for name in layouts} == layouts
    assert json.loads((out / "report.json").read_text())["kept"] == report["kept"]


def test_the_prepared_set_trains_from_the_folder_and_from_the_store(ray_local, prepared, tmp_path):
    """The prepared set trains with the tiny recipe (its random preset) for 2 steps, from the folder layout
    (data.root=DIR) and from the store `cogpipe data encode` makes of DIR's manifest (data.store, no clip read): each
    writes its checkpoint and LoRA. The store's examples are the folder cache's bit for bit
    (cogpipe/data/stages.py), but its rows are in encode's order (bucket, caption, key), not videos.txt's, and a one-
    window store trains its rows in the order a folder trains its list: so the store run equals, in losses, gradient
    norms and LoRA weights bit for bit, a run from DIR's clips listed in the store's row order (the same latents
    cache, nothing encoded again)."""
    import json
    import shutil
    import time

    import pyarrow.parquet as pq
    import torch
    from safetensors.torch import load_file

    from cogpipe.data import encode as encode_mod
    from cogpipe.data import store as store_mod
    from cogpipe.data.index import read_manifest
    from cogpipe.training import train

    from helpers import tiny_overrides

    t0 = time.monotonic()
    quick = {"train.max_steps": 2, "train.checkpoint_every": 0, "validation.every": 0, "validation.prompts": "[]"}

    def run(name, root, **more):
        cfg = load_config(RECIPE, tiny_overrides(root, tmp_path / f"run_{name}", tmp_path / "cache", **quick, **more))
        out = train(cfg)
        assert (out / "checkpoints" / "checkpoint-000002").is_dir()
        metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1, 2]
        print(f"{name}: {time.monotonic() - t0:.1f} s")
        return cfg, [(m["loss"], m["grad_norm"]) for m in metrics], load_file(out / "lora" / LORA_WEIGHTS)

    cfg, folder_metrics, _ = run("folder", prepared.out)
    result = encode_mod.encode(cfg, prepared.out, tmp_path / "store", workers=1, log=lambda *_: None)
    store = store_mod.open_store(tmp_path / "store")
    kept = json.loads((prepared.out / "report.json").read_text())["kept"]
    assert result["added"] == kept == store.rows
    print(f"encode: {time.monotonic() - t0:.1f} s")

    def cache(*parts):
        return {p: p.stat().st_mtime_ns for part in parts for p in (tmp_path / "cache" / part).rglob("*")}

    cached = cache("")
    _, store_metrics, store_lora = run("store", "null", **{"data.store": tmp_path / "store"})
    assert cache("") == cached  # nothing probed or encoded: the store's rows only

    rows = [r for s in store.shards for r in pq.read_table(tmp_path / "store" / s.path, columns=["uri", "caption"])
            .to_pylist()]
    view = tmp_path / "view"  # DIR's clips and captions, listed in the store's row order
    (view / "clips").mkdir(parents=True)
    for r in rows:  # copies: a folder's clips live in it (the content keys the latents cache)
        shutil.copyfile(r["uri"], view / "clips" / Path(r["uri"]).name)
    (view / "videos.txt").write_text("".join(f"clips/{Path(r['uri']).name}\n" for r in rows))
    (view / "prompts.txt").write_text("".join(f"{r['caption']}\n" for r in rows))
    assert sorted(r["uri"] for r in rows) == sorted(r["uri"] for r in read_manifest(prepared.out) if not r["problem"])
    encoded = cache("latents", "prompts")
    assert len([p for p in cache("latents") if p.suffix == ".safetensors"]) == kept
    _, view_metrics, view_lora = run("view", view)
    assert cache("latents", "prompts") == encoded  # the folder run's encodings, not made again
    assert store_metrics == view_metrics, (store_metrics, view_metrics, folder_metrics)
    assert store_lora.keys() == view_lora.keys()
    assert all(torch.equal(store_lora[k], view_lora[k]) for k in store_lora)
