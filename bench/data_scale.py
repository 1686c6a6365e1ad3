"""Training's start-up from a latent store as it grows: 1k, 10k and 200k rows.

    python bench/data_scale.py [--rows 1000 10000 200000] [--out bench/results/data_scale.json]
    python bench/data_scale.py --out bench/results/data_scale.json --plot docs/data_scale.png

Stores of synthesised rows (random latents and prompt embeddings at the tiny recipe's shapes, one-frame clips of
64x64: [2, 16, 1, 8, 8] and [48, 32] float32, about 14 KB a row, so 200k rows are 2.8 GB) are written with
StoreWriter into a temporary folder. For each, a fresh process (`--reader`) runs what training runs at start-up
(cogpipe.data.reader.training_data: the index, the identity and bucket checks, the data order) and reads the first
batch, then 50 more batches, and reports:
- start-up: from the parent starting the process to the first batch in hand (median of 3 processes);
- files opened under the store, counted by strace (openat) from process start to the first batch;
- peak RSS (ru_maxrss) of the reader after its 51 batches.
The machine is shared with other work: times are noisy, hence the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench"), str(REPO / "tests")]

from common import emit  # noqa: E402

BATCH = 4
BUCKET = (1, 64, 64)


def recipe(store: str):
    from cogpipe.config import load_config

    return load_config(REPO / "configs" / "tiny_lora.yaml",
                       ["model.pretrained=null", "output_dir=/tmp/cogpipe-data-scale", "data.root=null",
                        f"data.store={store}", f"data.frames={BUCKET[0]}", f"train.batch_size={BATCH}",
                        "report_to=none"])


def synthesise(path: Path, rows: int) -> dict:
    """A store of `rows` rows at the tiny recipe's shapes, written with StoreWriter; seconds taken."""
    import torch

    from cogpipe.data import store as S

    cfg = recipe(str(path))
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(16, 1, 8, 8, generator=g), torch.rand(16, 1, 8, 8, generator=g)
    embeds = torch.randn(48, 32, generator=g)
    t = time.perf_counter()
    with S.StoreWriter(str(path), S.store_identity(cfg, torch.device("cpu"))) as w:
        for start in range(0, rows, 4096):
            w.add(BUCKET, [{"key": f"clip-{i:07d}", "caption": f"clip {i}", "mean": mean, "std": std,
                            "prompt_embeds": embeds} for i in range(start, min(rows, start + 4096))])
    store = S.open_store(str(path))
    return {"rows": store.rows, "shards": len(store.shards), "write_s": round(time.perf_counter() - t, 1),
            "bytes": sum(s.bytes for s in store.shards)}


def reader(store: str, batches: int) -> None:
    """The child: training's start-up, the first batch, then `batches` more; prints one JSON line."""
    import torch

    from cogpipe.data.reader import training_data

    t_imported = time.time()
    cfg = recipe(store)
    t_config = time.time()
    dataset, plan, _ = training_data(cfg, 0, 1, torch.device("cpu"), [], log=lambda *_: None)
    t_plan = time.time()
    first = [dataset[i] for i in plan.indices(0)]
    t_first = time.time()
    print(json.dumps({"first_batch_at": t_first, "imported_at": t_imported, "config_s": t_config - t_imported,
                      "index_and_order_s": t_plan - t_config, "first_batch_s": t_first - t_plan,
                      "examples": len(first)}), flush=True)
    for step in range(1, batches + 1):
        [dataset[i] for i in plan.indices(step)]
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


def run_reader(store: Path, batches: int, strace: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--reader", str(store), "--batches", str(batches)]
    if strace:
        cmd = ["strace", "-f", "-qq", "-e", "trace=openat", "-o", str(strace)] + cmd
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    return {"startup_s": lines[0]["first_batch_at"] - t0, "imports_s": lines[0]["imported_at"] - t0,
            **{k: lines[0][k] for k in ("config_s", "index_and_order_s", "first_batch_s")},
            "peak_rss_mib": lines[1]["peak_rss_mib"]}


def files_opened(trace: Path, store: Path) -> int:
    """Successful openat calls on files under the store before the first batch's end (the whole trace of a
    reader asked for 0 more batches)."""
    opened = set()
    for line in trace.read_text().splitlines():
        if str(store) in line and "openat(" in line and "= -1" not in line:
            opened.add(line.split('"')[1])
    return len(opened)


def plot(result: dict, path: Path) -> Path:
    """A bar chart of the start-up (median) per store size, the reader's own part (index, order, first batch)
    apart from the imports and config that every start pays, with files opened and peak RSS beneath: a PNG."""
    from PIL import Image, ImageDraw

    stores = result["stores"]
    w, h, left, base, bar = 640, 300, 70, 230, 90
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    top = max(s["startup_s"] for s in stores)
    scale = 180 / top
    d.text((left, 8), "start-up: process start to first batch (median s), by store size", fill="black")
    d.line([(left - 5, base), (w - 20, base)], fill="black")
    for k in range(0, int(top) + 1, max(1, int(top) // 5)):
        y = base - k * scale
        d.line([(left - 8, y), (left - 5, y)], fill="black")
        d.text((left - 40, y - 6), f"{k} s", fill="black")
    for i, s in enumerate(stores):
        x = left + 20 + i * (bar + 80)
        reader_s = s["index_and_order_s"] + s["first_batch_s"]
        d.rectangle([x, base - s["startup_s"] * scale, x + bar, base], fill=(170, 190, 220))
        d.rectangle([x, base - reader_s * scale - 1, x + bar, base], fill=(200, 60, 60))
        d.text((x, base - s["startup_s"] * scale - 14), f"{s['startup_s']:.1f} s", fill="black")
        d.text((x, base + 6), f"{s['rows']:,} rows, {s['shards']} shards", fill="black")
        d.text((x, base + 20), f"reader {reader_s:.2f} s", fill=(200, 60, 60))
        d.text((x, base + 34), f"{s['files_opened_at_startup']} files, {s['peak_rss_mib']:.0f} MiB", fill="black")
    d.text((left, h - 16), "blue: imports and config (every start); red: the store reader's own part", fill="gray")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1000, 10_000, 200_000])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--out", type=Path)
    p.add_argument("--plot", type=Path, help="draw this PNG from --out's JSON (no measuring)")
    p.add_argument("--reader", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.reader:
        return reader(args.reader, args.batches)
    if args.plot:
        return plot(json.loads(args.out.read_text()), args.plot)
    work = Path(tempfile.mkdtemp(prefix="cogpipe-data-scale-"))
    results = []
    try:
        made = {rows: synthesise(work / f"store-{rows}", rows) for rows in args.rows}
        runs = {rows: [] for rows in args.rows}
        for _ in range(args.repeats):  # the sizes in turn, so a busy spell of the machine falls on all of them
            for rows in args.rows:
                runs[rows].append(run_reader(work / f"store-{rows}", args.batches))
        for rows in args.rows:
            trace = work / f"trace-{rows}.txt"
            run_reader(work / f"store-{rows}", 0, strace=trace)
            med = {k: round(statistics.median(r[k] for r in runs[rows]), 3)
                   for k in ("startup_s", "imports_s", "config_s", "index_and_order_s", "first_batch_s")}
            results.append({**made[rows], **med, "startup_runs_s": [round(r["startup_s"], 3) for r in runs[rows]],
                            "files_opened_at_startup": files_opened(trace, work / f"store-{rows}"),
                            "peak_rss_mib": round(max(r["peak_rss_mib"] for r in runs[rows]), 1)})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {"bench": "data_scale", "batch_size": BATCH, "bucket": list(BUCKET), "stores": results,
               "machine": f"{os.cpu_count()} CPU cores, shared with other work (times noisy: medians)"}
    return emit(summarise(summary), args.out)


def summarise(summary: dict) -> dict:
    """The ratios the issue asks about, from the stores' medians: the whole start-up, and the reader's own part
    (index, checks, order, first batch: what grows with the store; the imports and config are the same for all)."""
    by_rows = {r["rows"]: r for r in summary["stores"]}
    for r in summary["stores"]:
        r["reader_startup_s"] = round(r["index_and_order_s"] + r["first_batch_s"], 3)
    lo, hi = min(by_rows), max(by_rows)
    summary["startup_ratio_largest_to_smallest"] = round(by_rows[hi]["startup_s"] / by_rows[lo]["startup_s"], 3)
    summary["reader_startup_ratio_largest_to_smallest"] = round(by_rows[hi]["reader_startup_s"]
                                                                / by_rows[lo]["reader_startup_s"], 3)
    if 10_000 in by_rows:
        summary["peak_rss_growth_mib_10k_to_largest"] = round(by_rows[hi]["peak_rss_mib"]
                                                              - by_rows[10_000]["peak_rss_mib"], 1)
    return summary


if __name__ == "__main__":
    main()
