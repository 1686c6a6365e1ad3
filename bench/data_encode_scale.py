"""The `cogpipe data encode` driver's peak memory and time as the manifest grows: 10k and 200k rows.

    python bench/data_encode_scale.py [--rows 10000 200000] [--new 32] [--out bench/results/data_encode_scale.json]

A manifest of `--rows` synthesised rows (written with cogpipe.data.index.write_manifest): each row's locator points
at one of 4 real world clips (tests/helpers.make_clips, probed once), its digest, uri and caption are its own, so
every row has its own store key; one row in 200 carries a problem (as the index names a clip that does not decode).
The recipe is configs/tiny_lora.yaml with the `tiny` preset's random encoders (model.pretrained=null) at one frame
of 64x64, the shapes bench/data_scale.py writes. Two scenarios, each driver in a fresh process (`--driver`) that
runs `cogpipe data encode` as the CLI does (cogpipe.data.encode.encode on a local Ray on this machine's cores):

- rerun: the store already holds every usable row but the last `--new` (a source that grew by `--new` clips since
  the last encode): a store of rows at the tiny recipe's shapes is written with StoreWriter under the manifest's
  keys, and the driver encodes the `--new` rows for real (decode, VAE, T5 in the encoding actors) and publishes
  them. Its index.json is put back after each run, so every run starts from the same store (the next StoreWriter
  sweeps the shard files the run left).
- fresh (planning): an empty store, every usable row to do; the driver is stopped when the first encoded row comes
  back from Ray (everything the driver does before its first batch has left it and returned: reading the
  manifest, the plan, handing the rows to Ray Data), since encoding 200k clips is not what is measured.

Each reports the driver's peak RSS (VmHWM of the driver process alone: Ray's raylet, GCS and the encoding actors
are other processes and not counted; not ru_maxrss, which on Linux a child inherits from its parent's peak), its
peak once Ray is up (imports and ray.init, before encode is called) and when the plan is done (the log line that
says what is to do), and times: the whole driver (process start to encode's return, or to the first row back),
encode's own part, and its plan (encode's start to that log line). Medians of `--repeats` runs, the sizes in
turns. The machine is shared with other work: times are noisy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench"), str(REPO / "tests")]

from common import emit, world_clips  # noqa: E402

BUCKET = (1, 64, 64)
PROBLEM_EVERY = 200  # one row in this many carries a problem


def recipe():
    from cogpipe.config import load_config

    return load_config(REPO / "configs" / "tiny_lora.yaml",
                       ["model.pretrained=null", "output_dir=/tmp/cogpipe-encode-scale",
                        f"data.frames={BUCKET[0]}", f"data.height={BUCKET[1]}", f"data.width={BUCKET[2]}",
                        "report_to=none"])


def real_rows(root: Path) -> list[dict]:
    """The real clips' manifest rows: listed by their source and probed (in this process: no Ray)."""
    from cogpipe.data.index import probe_clips
    from cogpipe.data.sources import open_source

    clips = list(open_source(str(root)))
    probed = probe_clips([(c.uri, c.locator) for c in clips])
    return [dict(uri=c.uri, locator=json.dumps(c.locator), size=c.size, mtime=c.mtime, caption=c.caption, **p)
            for c, p in zip(clips, probed)]


def manifest_rows(real: list[dict], rows: int) -> list[dict]:
    """`rows` manifest rows over the real clips, each with its own uri, caption, digest and key (as `cogpipe data
    index --config` writes them); one in PROBLEM_EVERY with a problem and no probe."""
    from cogpipe.data.stages import clip_key

    out = []
    for i in range(rows):
        base = real[i % len(real)]
        uri = f"{base['uri']}#synthetic-{i:07d}"
        if i % PROBLEM_EVERY == PROBLEM_EVERY - 1:
            out.append(dict(uri=uri, locator=base["locator"], size=base["size"], mtime=base["mtime"],
                            caption=base["caption"], problem="cannot decode video"))
            continue
        digest = hashlib.sha256(f"synthetic clip {i}".encode()).hexdigest()
        out.append({**base, "uri": uri, "caption": f"{base['caption']}, take {i}", "digest": digest,
                    "bucket": list(BUCKET), "key": clip_key(digest, BUCKET), "problem": None})
    return out


def synthesise(path: Path, rows: list[dict]) -> dict:
    """A store holding `rows` (their keys, captions and uris; random tensors at the tiny recipe's shapes for one
    frame of 64x64), written with StoreWriter."""
    import torch

    from cogpipe.data import store as S

    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(16, 1, 8, 8, generator=g), torch.rand(16, 1, 8, 8, generator=g)
    embeds = torch.randn(48, 32, generator=g)
    t = time.perf_counter()
    with S.StoreWriter(str(path), S.store_identity(recipe(), torch.device("cpu"))) as w:
        for start in range(0, len(rows), 4096):
            w.add(BUCKET, [{"key": r["key"], "caption": r["caption"], "uri": r["uri"], "mean": mean, "std": std,
                            "prompt_embeds": embeds} for r in rows[start:start + 4096]])
    store = S.open_store(str(path))
    return {"stored_rows": store.rows, "shards": len(store.shards), "store_write_s": round(time.perf_counter() - t, 1)}


def peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM, the high-water mark of its own memory map. Not ru_maxrss: on Linux that
    carries the parent's peak over fork and exec (a child of a 600 MiB parent starts at 600 MiB)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


class FirstRow(Exception):
    pass


def driver(manifest: str, store: str, mode: str, started: float) -> None:
    """The child: `cogpipe data encode` as the CLI runs it (a local Ray on this machine's cores); one JSON line."""
    def rss() -> float:
        return peak_rss_mib()

    from cogpipe.data import encode as E
    from cogpipe.data import raycluster

    cfg = recipe()
    raycluster.connect()
    out = {"ray_up_s": time.time() - started, "base_rss_mib": rss()}
    marks = {}

    def log(msg: str) -> None:
        if msg.startswith("encode: ") and "planned_at" not in marks:
            marks.update(planned_at=time.time(), planned_rss_mib=rss(), plan_line=msg)

    class Progress(E.Progress):  # the first row back from Ray: noted (and, for `fresh`, the end of the run)
        def update(self, n: int) -> None:
            if "first_row_at" not in marks:
                marks["first_row_at"] = time.time()
                if mode == "fresh":
                    raise FirstRow
            super().update(n)

    E.Progress = Progress
    t = time.time()
    try:
        result = E.encode(cfg, manifest, store, log=log)
        out.update(added=result["added"], present=result["present"], skipped=result["skipped"],
                   failed=result["failed"])
    except FirstRow:
        pass
    end = time.time()
    out.update(peak_rss_mib=rss(), driver_s=end - started, encode_s=end - t, plan_s=marks["planned_at"] - t,
               planned_rss_mib=marks["planned_rss_mib"], plan_line=marks["plan_line"],
               first_row_s=marks.get("first_row_at", end) - t)
    print(json.dumps(out), flush=True)
    import ray

    ray.shutdown()


def run_driver(manifest: Path, store: Path, mode: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, __file__, "--driver", str(manifest), str(store), mode, repr(time.time())]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads([x for x in r.stdout.splitlines() if x.startswith("{")][-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[10_000, 200_000])
    p.add_argument("--new", type=int, default=32, help="rows the rerun encodes (the rest are in the store)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", nargs="+", default=["rerun", "fresh"], choices=["rerun", "fresh"])
    p.add_argument("--out", type=Path)
    p.add_argument("--driver", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.driver:
        manifest, store, mode, started = args.driver
        return driver(manifest, store, mode, float(started))

    from cogpipe.data.index import write_manifest

    work = Path(tempfile.mkdtemp(prefix="cogpipe-encode-scale-"))
    sizes = {}
    try:
        real = real_rows(world_clips(work / "clips", 4, frames=5))
        for rows in args.rows:
            made = manifest_rows(real, rows)
            write_manifest(work / f"m-{rows}", made, dict(clips=rows))
            usable = [r for r in made if not r["problem"]]
            info = {"rows": rows, "usable": len(usable), "problems": rows - len(usable), "new": args.new,
                    "manifest_bytes": (work / f"m-{rows}" / "manifest.parquet").stat().st_size}
            if "rerun" in args.modes:
                info.update(synthesise(work / f"s-{rows}", usable[:len(usable) - args.new]))
            sizes[rows] = info
            del made, usable
        runs = {(rows, mode): [] for rows in args.rows for mode in args.modes}
        for _ in range(args.repeats):  # the sizes in turn, so a busy spell of the machine falls on all of them
            for rows in args.rows:
                for mode in args.modes:
                    if mode == "rerun":
                        store = work / f"s-{rows}"
                        index = (store / "index.json").read_bytes()
                        r = run_driver(work / f"m-{rows}", store, mode)
                        (store / "index.json").write_bytes(index)  # as before the run (its shards: swept next)
                        assert (r["added"], r["present"]) == (args.new, sizes[rows]["stored_rows"]), r
                    else:
                        store = work / f"fresh-{rows}"
                        r = run_driver(work / f"m-{rows}", store, mode)
                        shutil.rmtree(store, ignore_errors=True)
                    print(f"{rows} rows, {mode}: peak RSS {r['peak_rss_mib']:.0f} MiB, driver {r['driver_s']:.1f} s",
                          file=sys.stderr, flush=True)
                    runs[rows, mode].append(r)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    keys = ("peak_rss_mib", "base_rss_mib", "planned_rss_mib", "driver_s", "ray_up_s", "encode_s", "plan_s",
            "first_row_s")
    results = []
    for rows in args.rows:
        entry = dict(sizes[rows])
        for mode in args.modes:
            rs = runs[rows, mode]
            entry[mode] = {**{k: round(statistics.median(r[k] for r in rs), 3 if k.endswith("_s") else 1)
                              for k in keys},
                           "peak_rss_runs_mib": [round(r["peak_rss_mib"], 1) for r in rs],
                           "driver_runs_s": [round(r["driver_s"], 2) for r in rs], "plan_line": rs[0]["plan_line"]}
        results.append(entry)
    summary = {"bench": "data_encode_scale", "recipe": "configs/tiny_lora.yaml, model.pretrained=null",
               "bucket": list(BUCKET), "repeats": args.repeats, "manifests": results,
               "measured": "peak RSS (VmHWM) of the driver process alone: Ray's raylet, GCS and encoding actors are "
                           "other processes, not counted",
               "machine": f"{os.cpu_count()} CPU cores, shared with other work (times noisy: medians)"}
    lo, hi = min(args.rows), max(args.rows)
    by_rows = {r["rows"]: r for r in results}
    for mode in args.modes:
        summary[f"{mode}_peak_rss_growth_mib_{lo}_to_{hi}"] = round(by_rows[hi][mode]["peak_rss_mib"]
                                                                    - by_rows[lo][mode]["peak_rss_mib"], 1)
    return emit(summary, args.out)


if __name__ == "__main__":
    main()
