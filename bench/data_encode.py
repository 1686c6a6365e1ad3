"""Encoding throughput of `cogpipe data encode` on Ray (1 and 2 workers) against train.py's own in-process encoding
of the same clips, and whether the latents are the same bits; prints one JSON line.

    python bench/data_encode.py [--clips 96] [--repeat 3] [--out bench/results/data_encode_cpu.json]

The tiny recipe's encoders (configs/tiny_lora.yaml with the `tiny` preset's random VAE and T5), `--clips` world
clips (17 x 64 x 64), each encoder on one thread (cogpipe.data.stages.ENCODE_THREADS). Three ways, `--repeat` times
each, in turns:

  in_process   train.py's folder cache (cogpipe.data.cache.build_cache) into a fresh cache folder
  ray_1        `cogpipe data encode` with 1 encoding actor into a fresh store (a local Ray on 2 CPUs, started once)
  ray_2        the same with 2 actors

Throughput is clips/s once the encoders are loaded: for Ray, the clips over the time from the first batch an actor
started decoding to the last one it finished (the actors' own clocks: Ray's start-up, the actors' start and the
encoders' loading left out; decoding, VAE and T5 in); for the folder cache, its clips over build_cache's time less
the encoders' loading (timed apart in the same process; its content digests and entry writes in). Wall times,
start-up included, are recorded beside. The medians over the repeats are compared. Latents: every clip's stored
mean and std against the folder cache's, bit for bit.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from common import emit, world_clips
from safetensors.torch import load_file

from cogpipe import models
from cogpipe.config import load_config
from cogpipe.data import encode as encode_mod
from cogpipe.data import index as index_mod
from cogpipe.data import stages, store
from cogpipe.data.cache import build_cache, file_digest
from cogpipe.data.folders import discover

RECIPE = ROOT / "configs" / "tiny_lora.yaml"


def stored_latents(url) -> dict:
    import pyarrow.parquet as pq

    s = store.open_store(url)
    fs, root = s.fs()
    out = {}
    for shard in s.shards:
        with fs.open(f"{root}/{shard.path}", "rb") as f:
            for row in pq.read_table(f).to_pylist():
                out[row["uri"]] = store.decode_row(row, shard.tensors)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=96)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--note", default="", help="how busy the machine was while measured (recorded)")
    args = ap.parse_args()

    import ray

    tmp = Path(tempfile.mkdtemp(prefix="data_encode_"))
    root = world_clips(tmp / "clips", args.clips)
    overrides = ["model.pretrained=null", f"data.root={root}", "validation.every=0", f"output_dir={tmp / 'o'}"]
    cfg = load_config(RECIPE, overrides)
    t = time.monotonic()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    ray_start = time.monotonic() - t
    index_mod.build_index([str(root)], tmp / "m", log=lambda *_: None)

    samples = discover(root)
    runs = {"in_process": [], "ray_1": [], "ray_2": []}
    reference = None
    for r in range(args.repeat):
        # in process: build_cache; the encoders' loading timed apart (the same builds build_cache makes)
        t = time.monotonic()
        with stages.encoder_threads("cpu"):
            models.build_vae(cfg.model, torch.float32, "cpu")
            models.build_tokenizer(cfg.model)
            models.build_text_encoder(cfg.model, torch.float32, "cpu")
        load = time.monotonic() - t
        c = load_config(RECIPE, overrides + [f"data.cache_dir={tmp / f'cache{r}'}"])
        t = time.monotonic()
        entries = build_cache(c, samples, "cpu", log=lambda *_: None)
        wall = time.monotonic() - t
        runs["in_process"].append(dict(wall_s=wall, load_s=load, clips_per_s=len(samples) / max(wall - load, 1e-9)))
        if reference is None:
            reference = {file_digest(s.video): load_file(str(e.latents)) for s, e in zip(samples, entries)}
        for workers in (1, 2):
            res = encode_mod.encode(cfg, tmp / "m", tmp / f"store{r}_{workers}", workers=workers,
                                    log=lambda *_: None)
            steady = res["added"] / max(res["busy_seconds"], 1e-9)
            digests = {row["uri"]: row["digest"] for row in index_mod.read_manifest(tmp / "m")}
            same = all(torch.equal(t_["mean"], reference[digests[uri]]["mean"])
                       and torch.equal(t_["std"], reference[digests[uri]]["std"])
                       for uri, t_ in stored_latents(tmp / f"store{r}_{workers}").items())
            runs[f"ray_{workers}"].append(dict(wall_s=res["seconds"], busy_s=res["busy_seconds"], clips_per_s=steady,
                                               clips=res["added"], bit_identical=same))
            print(f"repeat {r}: {workers} worker(s) {steady:.2f} clips/s steady, identical {same}", file=sys.stderr)
        print(f"repeat {r}: in process {runs['in_process'][-1]['clips_per_s']:.2f} clips/s", file=sys.stderr)
    ray.shutdown()
    med = {k: statistics.median(x["clips_per_s"] for x in v) for k, v in runs.items()}
    emit(dict(
        bench="data_encode", machine=f"{platform.machine()}, {os.cpu_count()} cores, {args.note}",
        torch=torch.__version__, ray=ray.__version__,
        clips=args.clips, shape=[17, 64, 64], encode_batch=cfg.data.encode_batch, threads=stages.ENCODE_THREADS,
        ray_init_s=round(ray_start, 2), median_clips_per_s={k: round(v, 3) for k, v in med.items()},
        ray_2_over_ray_1=round(med["ray_2"] / med["ray_1"], 3),
        ray_1_over_in_process=round(med["ray_1"] / med["in_process"], 3),
        bit_identical=all(x["bit_identical"] for k in ("ray_1", "ray_2") for x in runs[k]),
        runs={k: [{kk: (round(vv, 3) if isinstance(vv, float) else vv) for kk, vv in x.items()} for x in v]
              for k, v in runs.items()}), args.out)


if __name__ == "__main__":
    main()
