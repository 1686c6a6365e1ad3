"""Sources, `cogpipe data index` and `cogpipe data encode` on Ray (one local Ray instance for the module, 2 CPUs):
every source kind lists its clips, the manifest names each bad clip's rule and a re-index probes only new clips,
the store's latents are the bits train.py's own cache encodes whatever the worker count, and a killed driver or a
killed Ray worker leaves every key in the store exactly once."""

import io
import json
import os
import subprocess
import sys
import tarfile
import time

import pytest
import torch
from safetensors.torch import load_file

from cogpipe.config import load_config
from cogpipe.data import encode as encode_mod
from cogpipe.data import index as index_mod
from cogpipe.data import sources, store
from cogpipe.data.cache import build_cache
from cogpipe.data.folders import discover

from helpers import NEEDS_DATA, REPO, child_env, make_clips

pytestmark = NEEDS_DATA  # the extras these tests need: skipped, named, where missing

SPECS = [("square", "red", "left"), ("circle", "blue", "up"), ("triangle", "green", "right"),
         ("square", "yellow", "down")]
RECIPE = str(REPO / "configs" / "tiny_lora.yaml")


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the module (2 CPUs, no dashboard); its start-up time is measured and printed."""
    import ray

    t0 = time.monotonic()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    print(f"ray.init on 2 CPUs: {time.monotonic() - t0:.1f} s")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_clips(tmp_path_factory.mktemp("clips") / "d", SPECS)


def _cfg(root, tmp, *more, recipe=RECIPE):
    return load_config(recipe, ["model.pretrained=null", f"data.root={root}", f"data.cache_dir={tmp / 'cache'}",
                                f"output_dir={tmp / 'out'}", "validation.every=0", *more])


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory):
    """train.py's own encoding of the folder (the folder cache, in this process): {digest: latents}, {caption:
    embeds}."""
    from cogpipe.data.cache import file_digest

    tmp = tmp_path_factory.mktemp("ref")
    cfg = _cfg(folder, tmp)
    samples = discover(folder)
    entries = build_cache(cfg, samples, "cpu", log=lambda *_: None)
    latents = {file_digest(s.video): load_file(str(e.latents)) for s, e in zip(samples, entries)}
    prompts = {e.caption: load_file(str(e.prompt))["prompt_embeds"] for e in entries}
    return cfg, latents, prompts


@pytest.fixture(scope="module")
def manifest(ray_local, folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("manifest")
    index_mod.build_index([str(folder)], out, log=lambda *_: None)
    return out


def _store_rows(url) -> dict:
    """{key: (caption, uri, example tensors)} of every row of a store, and how often each key occurs."""
    import pyarrow.parquet as pq

    s = store.open_store(url)
    fs, root = s.fs()
    rows, seen = {}, []
    for shard in s.shards:
        with fs.open(f"{root}/{shard.path}", "rb") as f:
            for row in pq.read_table(f).to_pylist():
                seen.append(row["key"])
                rows[row["key"]] = (row["caption"], row["uri"], store.decode_row(row, shard.tensors))
    return rows, seen


def _assert_matches_reference(url, manifest_dir, reference, expected=None):
    cfg, latents, prompts = reference
    rows, seen = _store_rows(url)
    expected = len(latents) if expected is None else expected
    assert len(seen) == len(set(seen)) == expected, "every key in the store exactly once"
    by_key = {r["key"]: r for r in encode_mod.plan(cfg, manifest_dir, set()).sorted_rows()}
    digests = {r["uri"]: r["digest"] for r in index_mod.read_manifest(manifest_dir)}
    for key, (caption, uri, t) in rows.items():
        assert key in by_key
        want = latents[digests[uri]]
        assert torch.equal(t["mean"], want["mean"]) and torch.equal(t["std"], want["std"]), uri
        assert torch.equal(t["prompt_embeds"], prompts[caption]), caption


# --- sources -----------------------------------------------------------------------------------------------------


def _tar(members: dict) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_sources_list_every_kind_and_read_the_bytes_back(folder, tmp_path):
    """A folder layout, WebDataset tar shards and Parquet files behind an fsspec URL (memory://), and a `datasets`
    save_to_disk folder: each clip's caption, and its bytes read back from its locator equal the file's."""
    import datasets
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    videos = sorted((folder / "videos").glob("*.mp4"))
    data = [v.read_bytes() for v in videos]
    listed = list(sources.open_source(str(folder)))
    assert [c.caption for c in listed] == [s.caption for s in discover(folder)] and not any(c.problem for c in listed)
    assert sources.read_bytes(listed[0].locator) == data[0]

    mem = fsspec.filesystem("memory")
    mem.pipe("/wds/shard-000.tar", _tar({"a/k0.mp4": data[0], "a/k0.txt": b"a red square\n",
                                         "a/k1.mp4": data[1], "a/k1.json": json.dumps({"caption": "blue"}).encode(),
                                         "a/k2.mp4": data[2]}))
    clips = list(sources.open_source("memory://wds/"))
    assert [(c.caption, c.problem) for c in clips] == [
        ("a red square", None), ("blue", None), (None, "no caption for key 'a/k2' (expected a/k2.txt or a/k2.json)")]
    assert [sources.read_bytes(c.locator) for c in clips] == data[:3]  # byte ranges of the shard
    assert clips[0].uri.startswith("memory://") and clips[0].uri.endswith("/wds/shard-000.tar#a/k0.mp4")

    buf = io.BytesIO()
    pq.write_table(pa.table({"clip": data[:2] + [data[3]], "text": ["one", "two", None]}), buf, row_group_size=2)
    mem.pipe("/pq/part-0.parquet", buf.getvalue())
    with pytest.raises(sources.SourceError, match="no video column.*--video-column"):
        list(sources.open_source("memory://pq/part-0.parquet"))
    rows = list(sources.open_source("memory://pq/part-0.parquet", video_column="clip", caption_column="text"))
    assert [(r.caption, r.problem) for r in rows] == [("one", None), ("two", None), (None, "no caption in this row")]
    assert rows[1].locator[0] == "parquet" and rows[1].locator[2:] == [0, 1, "clip"]
    assert sources.read_bytes(rows[2].locator) == data[3]  # second row group

    ds = datasets.Dataset.from_dict({"video": [str(v) for v in videos[:2]], "caption": ["x", "y"]})
    ds.save_to_disk(str(tmp_path / "hf"))
    rows = list(sources.open_source(str(tmp_path / "hf")))
    assert [(r.caption, r.locator[0]) for r in rows] == [("x", "file"), ("y", "file")]
    assert sources.read_bytes(rows[1].locator) == data[1]
    with pytest.raises(sources.SourceError, match="not found"):
        list(sources.open_source(str(tmp_path / "nowhere")))


def _hub(monkeypatch, root):
    """A stand-in for the Hugging Face hub's hf:// file system (huggingface_hub.HfFileSystem, which needs the
    network): hf://datasets/OWNER/NAME/... is root/datasets/OWNER/NAME/..., through fsspec's DirFileSystem. Returns
    the list of what it was asked to list and to read."""
    import importlib

    import fsspec
    from fsspec.implementations.dirfs import DirFileSystem

    calls = []

    class Hub(DirFileSystem):
        protocol, cachable = "hf", False

        def __init__(self, **_):
            super().__init__(path=str(root), fs=fsspec.filesystem("file"))

        def find(self, path, *args, **kwargs):
            calls.append(("find", path))
            return super().find(path, *args, **kwargs)

        def cat_file(self, path, *args, **kwargs):
            calls.append(("read", path))
            return super().cat_file(path, *args, **kwargs)

        def open(self, path, *args, **kwargs):
            calls.append(("read", path))
            return super().open(path, *args, **kwargs)

    monkeypatch.setitem(importlib.import_module("fsspec.registry")._registry, "hf", Hub)
    return calls


def test_hub_ids_name_hub_datasets_and_local_paths_win(monkeypatch, tmp_path):
    """OWNER/NAME[@REV] is the hub dataset hf://datasets/OWNER/NAME[@REV] (the path huggingface_hub's file system
    lists) unless a local path has that name; the hub's file system gets the repo's path."""
    import fsspec
    from huggingface_hub import HfFileSystem

    assert sources.source_url("owner/name") == "hf://datasets/owner/name"
    assert sources.source_url("owner/name@v1.0") == "hf://datasets/owner/name@v1.0"
    for other in ("hf://datasets/owner/name", "s3://b/k", "a/b/c", "clips.tar", "data/*.parquet"):
        assert sources.source_url(other) == other
    fs, path = fsspec.core.url_to_fs(sources.source_url("owner/name"))  # the real hf:// file system, not called
    assert isinstance(fs, HfFileSystem) and path == "datasets/owner/name"
    monkeypatch.chdir(tmp_path)
    make_clips(tmp_path / "owner" / "name", SPECS[:1])
    assert sources.source_url("owner/name") == "owner/name"  # a local folder of that name wins

    calls = _hub(monkeypatch, tmp_path / "hub")
    make_clips(tmp_path / "hub" / "datasets" / "someone" / "clips", SPECS[:1])
    for source in ("someone/clips", "hf://datasets/someone/clips"):
        calls.clear()
        [clip] = sources.open_source(source)
        assert calls[0] == ("find", "datasets/someone/clips") and clip.uri.startswith("hf://datasets/someone/clips/")
    with pytest.raises(sources.SourceError, match="someone/nothing: not found: no local path of that name, nor "
                                                  "the hub dataset hf://datasets/someone/nothing"):
        sources.open_source("someone/nothing")


def test_hub_repos_in_every_layout_are_listed_and_read_back(folder, monkeypatch, tmp_path):
    """A hub dataset (hf://, a local stand-in) in each layout a repo holds clips in: prompt.txt + videos.txt +
    videos/ (the Disney dataset's layout), metadata.jsonl with a first-frame image column, videos with .txt
    captions, WebDataset tars, Parquet. Each is recognised; its clips' captions are listed and their bytes read back
    from their locators; a folder layout is listed without reading a clip. A repo of none of them is refused, naming
    the repo, what was looked for and what it holds."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    videos = sorted((folder / "videos").glob("*.mp4"))
    data = [v.read_bytes() for v in videos]
    captions = [s.caption for s in discover(folder)]
    hub = tmp_path / "hub" / "datasets" / "o"
    calls = _hub(monkeypatch, tmp_path / "hub")

    disney = hub / "disney"  # Wild-Heart/Disney-VideoGeneration-Dataset: prompt.txt, videos.txt, videos/*.mp4
    shutil.copytree(folder / "videos", disney / "videos")
    (disney / "prompt.txt").write_text("".join(c + "\n" for c in captions))
    shutil.copy(folder / "videos.txt", disney / "videos.txt")
    (disney / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    meta = make_clips(hub / "meta", SPECS[:2], layout="jsonl")
    (meta / "first.png").write_bytes(b"an image's bytes")  # read back, not decoded, while listing
    rows = [json.loads(line) for line in (meta / "metadata.jsonl").read_text().splitlines()]
    rows[0]["image"] = "first.png"
    (meta / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    captioned = make_clips(hub / "captioned", SPECS[:2], layout="folder")
    (hub / "wds" / "train").mkdir(parents=True)
    (hub / "wds" / "train" / "000.tar").write_bytes(_tar({"k0.mp4": data[0], "k0.txt": b"zero"}))
    (hub / "pq" / "data").mkdir(parents=True)
    pq.write_table(pa.table({"video": [{"bytes": data[1], "path": "x.mp4"}], "caption": ["one"]}),
                   hub / "pq" / "data" / "train-00000-of-00001.parquet")

    calls.clear()
    clips = list(sources.open_source("hf://datasets/o/disney"))
    assert [c.caption for c in clips] == captions and not any(c.problem for c in clips)
    assert clips[0].uri == "hf://datasets/o/disney/" + (folder / "videos.txt").read_text().splitlines()[0]
    assert not [path for kind, path in calls if kind == "read" and path.endswith(".mp4")], "a clip read to list"
    assert [sources.read_bytes(c.locator) for c in clips] == data and clips[0].size == len(data[0])

    clips = list(sources.open_source("o/meta"))
    assert [c.caption for c in clips] == [r["caption"] for r in rows] and not any(c.problem for c in clips)
    assert clips[0].image == "hf://datasets/o/meta/first.png" and clips[1].image is None
    assert sources.read_bytes(clips[0].image_locator) == b"an image's bytes"
    assert sources.read_bytes(clips[1].locator) == (meta / rows[1]["video"]).read_bytes()

    clips = list(sources.open_source("o/captioned"))
    assert len(clips) == 2 and not any(c.problem for c in clips)
    assert [sources.read_bytes(c.locator) for c in clips] == [v.read_bytes() for v in sorted(captioned.glob("*.mp4"))]

    [clip] = sources.open_source("o/wds")
    assert (clip.caption, clip.uri) == ("zero", "hf://datasets/o/wds/train/000.tar#k0.mp4")
    assert sources.read_bytes(clip.locator) == data[0]
    [clip] = sources.open_source("o/pq")
    assert clip.caption == "one" and sources.read_bytes(clip.locator) == data[1]

    (hub / "other").mkdir()
    (hub / "other" / "README.md").write_text("no clips")
    (hub / "other" / "other.py").write_text("# a dataset script")
    (hub / "other" / "archive.zip").write_bytes(b"PK")
    with pytest.raises(sources.SourceError) as e:
        sources.open_source("o/other")
    message = str(e.value)
    assert message.startswith("o/other (hf://datasets/o/other): no clips found: looked for prompts.txt")
    for part in ("videos.txt", "metadata.jsonl", ".tar", ".parquet", "same-name .txt captions",
                 "it holds README.md, archive.zip, other.py", "dataset script"):
        assert part in message, part


# --- index -------------------------------------------------------------------------------------------------------


def test_index_names_bad_clips_and_probes_only_new_ones(ray_local, folder, tmp_path):
    """Unreadable, too short and caption-less clips are named in the manifest with the dataset check's rules; run
    again after a clip is added, only that clip is probed and the named ones are not tried again."""
    import shutil

    from cogpipe.video import write_mp4
    from cogpipe.world.render import render

    root = tmp_path / "d"
    shutil.copytree(folder, root)
    (root / "videos.txt").write_text((root / "videos.txt").read_text() + "videos/broken.mp4\nvideos/short.mp4\n")
    (root / "prompts.txt").write_text((root / "prompts.txt").read_text() + "broken\nshort\n")
    (root / "videos" / "broken.mp4").write_bytes(b"not a video at all")
    write_mp4(render("square", "red", "left", frames=5, size=64, seed=0), root / "videos" / "short.mp4")
    cfg = _cfg(root, tmp_path)
    summary = index_mod.build_index([str(root)], tmp_path / "m", cfg, log=lambda *_: None)
    assert summary["probed"] == 6 and summary["usable"] == 4 and summary["problems"] == 2
    rows = {os.path.basename(r["uri"]): r for r in index_mod.read_manifest(tmp_path / "m")}
    assert rows["broken.mp4"]["problem"].startswith("cannot decode video")
    assert rows["short.mp4"]["problem"] == "has 5 frames, fewer than data.frames=17"
    good = rows[os.path.basename(str(sorted((root / "videos").glob("00_*"))[0]))]
    assert (good["frames"], good["height"], good["width"], good["fps"]) == (17, 64, 64, 8.0)
    assert good["bucket"] == [17, 64, 64] and len(good["digest"]) == 64 and good["key"]

    # a grown source: one new clip; the caption-less one is named from the listing, nothing else probed again
    (root / "videos" / "new.mp4").write_bytes((root / "videos" / "short.mp4").read_bytes())
    write_mp4(render("circle", "red", "up", frames=17, size=64, seed=5), root / "videos" / "new.mp4")
    (root / "videos.txt").write_text((root / "videos.txt").read_text() + "videos/new.mp4\n")
    (root / "prompts.txt").write_text((root / "prompts.txt").read_text() + "a new one\n")
    summary = index_mod.build_index([str(root)], tmp_path / "m", cfg, log=lambda *_: None)
    assert summary["probed"] == 1 and summary["usable"] == 5 and summary["clips"] == 7

    capless = make_clips(tmp_path / "f", SPECS[:1], layout="folder")
    next(capless.glob("*.txt")).unlink()
    rows = index_mod.read_manifest(tmp_path / "m2") if index_mod.build_index(
        [str(capless)], tmp_path / "m2", log=lambda *_: None)["clips"] else []
    assert len(rows) == 1 and rows[0]["problem"].startswith("no caption file") and rows[0]["frames"] is None


# --- encode ------------------------------------------------------------------------------------------------------


def test_encode_on_ray_equals_train_py_encoding(ray_local, manifest, reference, tmp_path):
    """The store's latents and prompt embeddings are the bits train.py's folder cache encodes, with 2 workers (the
    other tests encode with 1), and its rows are in the plan's order; run again, nothing is encoded."""
    cfg = reference[0]
    result = encode_mod.encode(cfg, manifest, tmp_path / "s", workers=2, log=lambda *_: None)
    assert result["added"] == len(SPECS) and result["workers"] == 2 and result["failed"] == 0
    _assert_matches_reference(tmp_path / "s", manifest, reference)
    _, stored_order = _store_rows(tmp_path / "s")  # the plan's order, whichever worker finished first
    assert stored_order == [r["key"] for r in encode_mod.plan(cfg, manifest, set()).sorted_rows()]
    assert store.verify(tmp_path / "s") == []
    again = encode_mod.encode(cfg, manifest, tmp_path / "s", workers=2, log=lambda *_: None)
    assert again["added"] == 0 and again["present"] == len(SPECS)


def test_encode_on_a_two_node_cluster_with_gpus(manifest, folder, reference, tmp_path):
    """On a Ray cluster of two nodes (tests/ray_cluster.py): the driver's head with 1 CPU and a node with 4 CPUs and 2
    logical GPUs. A manifest folder on the driver's machine is read by tasks on the driver's node (the same tasks
    unpinned go elsewhere); encode takes the GPU path (decoding tasks, an actor a GPU: 2 actors) and stores every
    clip once, with the folder cache's bits (the actors find no CUDA, so the encoders run on the CPU)."""
    from cogpipe.devices import DTYPE_NAMES

    overrides = ["model.pretrained=null", f"data.root={folder}", f"data.cache_dir={tmp_path / 'cache'}",
                 f"output_dir={tmp_path / 'out'}", "validation.every=0"]
    env = child_env(REPO / "tests", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, str(REPO / "tests" / "ray_cluster.py"), str(RECIPE), str(manifest),
                        str(tmp_path / "s"), str(tmp_path), *overrides], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads([line for line in r.stdout.splitlines() if line.startswith("{")][-1])
    assert got["items"] == 30 and got["local"] == [got["driver"]]
    assert len(got["unpinned"]) == 2 or got["unpinned"] != [got["driver"]], got  # the control: they do go elsewhere
    result = got["result"]
    assert (result["workers"], result["added"], result["failed"]) == (2, len(SPECS), 0)
    assert store.open_store(tmp_path / "s").identity["dtype"] == DTYPE_NAMES[torch.bfloat16]  # the GPU path's
    _assert_matches_reference(tmp_path / "s", manifest, reference)


def test_encode_worker_killed_mid_task_is_retried_and_problems_skipped(ray_local, manifest, reference, tmp_path,
                                                                      monkeypatch):
    """An encoding actor kills itself (SIGKILL) on its first batch, once: Ray restarts it and runs the batch again;
    nothing is missing, nothing twice. A manifest row with a problem is never encoded; a caption several clips share
    is T5-encoded once."""
    rows = index_mod.read_manifest(manifest)
    rows[0]["problem"] = "cannot decode video (named by the index)"
    for r in rows:
        r["caption"] = rows[1]["caption"]  # one caption for every clip: T5 runs once
    marker = tmp_path / "killed"
    monkeypatch.setenv(encode_mod.FAULT_ENV, f"1:{marker}")
    index_mod.write_manifest(tmp_path / "m", rows, {})
    result = encode_mod.encode(reference[0], tmp_path / "m", tmp_path / "s", workers=1, log=lambda *_: None)
    assert marker.exists(), "the actor did not kill itself"
    assert int(marker.read_text()) not in result["pids"]  # the rows came from the restarted actor
    assert result["added"] == len(SPECS) - 1 and result["skipped"] == 1 and result["text_encodes"] == 1
    stored, seen = _store_rows(tmp_path / "s")
    assert rows[0]["uri"] not in {u for _, u, _ in stored.values()}
    _assert_matches_reference(tmp_path / "s", manifest, reference, expected=len(SPECS) - 1)


def test_cli_driver_killed_then_rerun_encodes_only_the_rest(ray_local, manifest, reference, tmp_path):
    """`cogpipe data encode --config RECIPE --manifest M --out S` (on the module's Ray, --address) SIGKILLed after
    publishing its first shard (2 rows); the rerun encodes only the other clips: every key in the store once, the
    latents equal train.py's, and `verify` passes."""
    address = ray_local.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "cogpipe.cli", "data", "encode", "--config", RECIPE, "--manifest", str(manifest),
           "--out", str(tmp_path / "S"), "--address", address, "--workers", "1", "--shard-rows", "2",
           "model.pretrained=null", "validation.every=0"]
    env = child_env(COGPIPE_FAILPOINT="encode-published:1")
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert store.open_store(tmp_path / "S").rows == 2
    result = encode_mod.encode(reference[0], manifest, tmp_path / "S", workers=1, log=lambda *_: None)
    assert (result["present"], result["added"]) == (2, len(SPECS) - 2)
    _assert_matches_reference(tmp_path / "S", manifest, reference)
    assert store.verify(tmp_path / "S") == []


def test_image_to_video_first_frame_encodings_are_the_folder_caches(ray_local, folder, manifest, tmp_path):
    """Image-to-video (the tiny I2V recipe): the store's noisy first-frame encodings are the folder cache's draws,
    bit for bit (both seeded by the clip's store key), beside its latents."""
    from cogpipe.data.cache import file_digest

    cfg = _cfg(folder, tmp_path, recipe=str(REPO / "configs" / "tiny_i2v_lora.yaml"))
    samples = discover(folder)
    cached = {file_digest(s.video): load_file(str(e.latents))
              for s, e in zip(samples, build_cache(cfg, samples, "cpu", log=lambda *_: None))}
    result = encode_mod.encode(cfg, manifest, tmp_path / "s", workers=1, log=lambda *_: None)
    assert result["added"] == len(SPECS)
    digests = {r["uri"]: r["digest"] for r in index_mod.read_manifest(manifest)}
    rows, _ = _store_rows(tmp_path / "s")
    for _, uri, t in rows.values():
        want = cached[digests[uri]]
        assert t["image_latents"].shape == want["image_latents"].shape == (cfg.data.image_noise_variants, 16, 1, 8, 8)
        assert torch.equal(t["image_latents"], want["image_latents"]) and torch.equal(t["mean"], want["mean"]), uri


def test_image_to_video_listed_first_frame_images_are_the_folder_caches(ray_local, folder, tmp_path):
    """A folder whose images.txt lists a first-frame image for a clip (image-to-video, the tiny I2V recipe): the
    index records the image and its digest, the clip's store key holds the digest, and the store's noisy
    first-frame encodings of that image are the folder cache's, bit for bit; a clip whose images.txt line is empty
    keeps its own first frame and its usual key. A listed image that is missing is named by the probe."""
    import hashlib
    import shutil

    import numpy as np
    from PIL import Image

    from cogpipe.data import stages

    root = tmp_path / "d"
    names = (folder / "videos.txt").read_text().splitlines()[:2]
    (root / "videos").mkdir(parents=True)
    for name in names:
        shutil.copy(folder / name, root / name)
    (root / "videos.txt").write_text("".join(n + "\n" for n in names))
    (root / "prompts.txt").write_text("".join(c + "\n" for c in (folder / "prompts.txt").read_text().splitlines()[:2]))
    pixels = np.random.default_rng(0).integers(0, 256, (72, 96, 3), dtype=np.uint8)  # resized and cropped to 64x64
    Image.fromarray(pixels).save(root / "first.png")
    (root / "images.txt").write_text("first.png\n\n")
    cfg = _cfg(root, tmp_path, "train.caption_dropout=0",  # no extra prompt: no text-only actor to start
               recipe=str(REPO / "configs" / "tiny_i2v_lora.yaml"))
    samples = discover(root)
    assert samples[0].image is not None and samples[1].image is None
    cached = {str(s.video): load_file(str(e.latents))
              for s, e in zip(samples, build_cache(cfg, samples, "cpu", log=lambda *_: None))}

    index_mod.build_index([str(root)], tmp_path / "m", cfg, log=lambda *_: None)
    rows = index_mod.read_manifest(tmp_path / "m")
    image = hashlib.sha256((root / "first.png").read_bytes()).hexdigest()
    assert (rows[0]["image"], rows[0]["image_digest"]) == (str(samples[0].image), image)
    assert rows[0]["key"] == stages.clip_key(rows[0]["digest"], (17, 64, 64), image)
    assert rows[1]["image"] is None and rows[1]["key"] == stages.clip_key(rows[1]["digest"], (17, 64, 64))
    result = encode_mod.encode(cfg, tmp_path / "m", tmp_path / "s", workers=1, log=lambda *_: None)
    assert (result["added"], result["failed"]) == (2, 0)
    stored, _ = _store_rows(tmp_path / "s")
    assert set(stored) == {r["key"] for r in rows}
    for _, uri, t in stored.values():
        want = cached[uri]
        assert torch.equal(t["image_latents"], want["image_latents"]) and torch.equal(t["mean"], want["mean"]), uri

    [missing] = index_mod.probe_clips([(rows[1]["uri"], json.loads(rows[1]["locator"]),
                                        ["file", str(root / "gone.png")])])
    assert missing["problem"].startswith("cannot read first-frame image (FileNotFoundError")


def test_sources_behind_an_s3_url(folder, monkeypatch):
    """WebDataset shards on an S3 server on 127.0.0.1 (moto's server mode, the real S3 API, through s3fs; endpoint
    and credentials from the standard AWS variables): listed as a stream, each clip read back as its byte range."""
    import s3fs
    from moto.server import ThreadedMotoServer

    from helpers import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
            monkeypatch.setenv(k, v)
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir("clips")
        data = [v.read_bytes() for v in sorted((folder / "videos").glob("*.mp4"))]
        fs.pipe("clips/wds/000.tar", _tar({"k0.mp4": data[0], "k0.txt": b"first", "k1.mp4": data[1],
                                           "k1.txt": b"second"}))
        fs.pipe("clips/wds/001.tar", _tar({"k2.mp4": data[2], "k2.json": b'{"prompt": "third"}'}))
        clips = list(sources.open_source("s3://clips/wds/"))
        assert [c.caption for c in clips] == ["first", "second", "third"] and not any(c.problem for c in clips)
        assert clips[2].uri == "s3://clips/wds/001.tar#k2.mp4" and clips[2].size > 0
        assert [sources.read_bytes(c.locator) for c in clips] == data[:3]
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()
