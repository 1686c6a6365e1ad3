"""Benchmark `cogpipe convert` on a synthetic full-size SAT checkpoint; prints one JSON line.

    python bench/convert.py --size 5b [--repeat 3] [--workdir /tmp/cogpipe-bench] [--save]

1. writes a SAT transformer folder (latest + 1/mp_rank_00_model_states.pt) with the real shapes of the chosen
   size in bf16, streaming one tensor at a time (random values from a reused pool);
2. measures the baseline: reading those bytes and writing them to a new file with fsync (the checkpoint
   evicted from the page cache before; --cold drops the whole cache, libraries included);
3. runs `python -m cogpipe.convert SAT OUT` under /usr/bin/time -v (same eviction), reading the wall time and
   the child's maximum resident set size;
4. spot-checks converted tensors against the source, deletes the synthetic files (unless --keep).
Runs alternate baseline/conversion `--repeat` times; the JSON reports medians and every run. The first
conversion computes the expected Diffusers shapes by importing diffusers (~7 s of CPU here); later ones find
them memoised (COGPIPE_CONVERT_CACHE, a fresh folder per benchmark), as a user's second conversion would.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cogpipe.convert.io import Out, write_torch  # noqa: E402
from cogpipe.weights import open_state_dict  # noqa: E402

SIZES = {  # hidden, heads, layers, time embed, text embed
    "tiny": (64, 2, 2, 32, 64),
    "2b": (1920, 30, 30, 512, 4096),
    "5b": (3072, 48, 42, 512, 4096),
}
PREFIX = "model.diffusion_model."


def sat_shapes(size: str) -> dict[str, tuple]:
    """SAT CogVideoX 1.0 transformer layout (2B: sin-cos table; 5B: RoPE freqs + SAT's unused position table)."""
    h, heads, layers, t, text = SIZES[size]
    s = {"mixins.patch_embed.proj.weight": (h, 16, 2, 2), "mixins.patch_embed.proj.bias": (h,),
         "mixins.patch_embed.text_proj.weight": (h, text), "mixins.patch_embed.text_proj.bias": (h,),
         "time_embed.0.weight": (t, h), "time_embed.0.bias": (t,), "time_embed.2.weight": (t, t),
         "time_embed.2.bias": (t,)}
    for i in range(layers):
        L = f"transformer.layers.{i}."
        for name, shape in [("input_layernorm", (h,)), ("attention.query_key_value", (3 * h, h)),
                            ("attention.dense", (h, h)), ("post_attention_layernorm", (h,)),
                            ("mlp.dense_h_to_4h", (4 * h, h)), ("mlp.dense_4h_to_h", (h, 4 * h))]:
            s[L + name + ".weight"], s[L + name + ".bias"] = shape, (shape[0],)
    for i in range(layers):
        s[f"mixins.adaln_layer.adaLN_modulations.{i}.1.weight"] = (12 * h, t)
        s[f"mixins.adaln_layer.adaLN_modulations.{i}.1.bias"] = (12 * h,)
        for n in ("query_layernorm_list", "key_layernorm_list"):
            s[f"mixins.adaln_layer.{n}.{i}.weight"] = s[f"mixins.adaln_layer.{n}.{i}.bias"] = (h // heads,)
    s.update({"transformer.final_layernorm.weight": (h,), "transformer.final_layernorm.bias": (h,),
              "mixins.final_layer.norm_final.weight": (h,), "mixins.final_layer.norm_final.bias": (h,),
              "mixins.final_layer.adaLN_modulation.1.weight": (2 * h, t),
              "mixins.final_layer.adaLN_modulation.1.bias": (2 * h,),
              "mixins.final_layer.linear.weight": (64, h), "mixins.final_layer.linear.bias": (64,)})
    if size == "2b":
        s["mixins.pos_embed.pos_embedding"] = (1, 226 + 17550, h)
    else:
        s["mixins.pos_embed.freqs_sin"] = s["mixins.pos_embed.freqs_cos"] = (13, 30, 45, h // heads)
        s["transformer.position_embeddings.weight"] = (64, h)
    return s


class Synthetic:
    """A tensor made on demand from a shared random pool (so the checkpoint never sits in memory)."""

    pool = None

    def __init__(self, shape, dtype, offset):
        self.shape, self.dtype, self.offset = tuple(shape), dtype, offset

    def load(self) -> torch.Tensor:
        if Synthetic.pool is None:
            Synthetic.pool = torch.randn(1 << 26, generator=torch.Generator().manual_seed(0)).bfloat16()
        n = torch.Size(self.shape).numel()
        start = self.offset % (Synthetic.pool.numel() - n + 1)
        return Synthetic.pool[start:start + n].view(self.shape).to(self.dtype)


def write_sat(folder: Path, size: str) -> dict:
    shapes = sat_shapes(size)
    outs, offset = [], 0
    for k, shape in shapes.items():
        dtype = torch.float32 if "freqs" in k else torch.bfloat16
        outs.append(Out(PREFIX + k, [(Synthetic(shape, dtype, offset), 0, 1)], dtype))
        offset += 7919 * (len(outs))
    (folder / "1").mkdir(parents=True)
    write_torch(folder / "1" / "mp_rank_00_model_states.pt", outs, lambda sd: {"module": sd})
    (folder / "latest").write_text("1")
    return {o.name: o for o in outs}


def evict(path: Path) -> None:
    """Flush and drop `path` (a file or every file under a folder) from the page cache: reads hit the disk."""
    subprocess.run(["sync"], check=True)
    for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def drop_all_caches() -> bool:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def baseline(src: Path, dst: Path) -> float:
    """Read `src` and write it to `dst` in 64 MiB blocks, fsync: the I/O a streaming conversion cannot avoid."""
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    t0 = time.perf_counter()
    with open(src, "rb", buffering=0) as fi, open(dst, "wb", buffering=0) as fo:
        while n := fi.readinto(buf):
            fo.write(view[:n])
        os.fsync(fo.fileno())
    wall = time.perf_counter() - t0
    dst.unlink()
    return wall


def cpu_busy() -> list[int]:
    """System-wide (busy, total) jiffies: shows whether other processes shared the CPU during a run."""
    v = list(map(int, Path("/proc/stat").read_text().splitlines()[0].split()[1:]))
    return [sum(v) - v[3] - v[4], sum(v)]


def convert_run(src: Path, dst: Path, cache: Path, entry: str) -> dict:
    prog = [shutil.which("cogpipe") or "cogpipe", "convert"] if entry == "cogpipe" else \
        [sys.executable, "-m", "cogpipe.convert"]
    cmd = ["/usr/bin/time", "-v", *prog, str(src), str(dst), "--json"]
    env = {**os.environ, "COGPIPE_CONVERT_CACHE": str(cache)}
    cold = not any(cache.glob("*.json"))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"conversion failed ({p.returncode}):\n{p.stderr[-3000:]}")
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(rss_kib / 1024, 1), "summary": summary,
            "expected_shapes": "computed (imports diffusers)" if cold else "memoised"}


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 2**20
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1), "gpu": None,
            "os": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default="tiny")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/cogpipe-bench-convert")
    ap.add_argument("--entry", choices=["module", "cogpipe"], default="module",
                    help="run `python -m cogpipe.convert` (default) or the `cogpipe convert` console command")
    ap.add_argument("--cold", action="store_true", help="drop the whole page cache before each run (needs root)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and the output")
    ap.add_argument("--save", action="store_true", help="also write bench/results/convert_<size>_cpu.json")
    args = ap.parse_args()

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sat, out = work / "sat", work / "out"
    t0 = time.perf_counter()
    planned = write_sat(sat, args.size)
    write_s = time.perf_counter() - t0
    src_file = sat / "1" / "mp_rank_00_model_states.pt"
    nbytes = src_file.stat().st_size

    runs, cold = [], True
    for _ in range(args.repeat):
        shutil.rmtree(out, ignore_errors=True)
        evict(sat)
        cold &= drop_all_caches() if args.cold else True
        load = os.getloadavg()[0]
        c0 = cpu_busy()
        base = baseline(src_file, work / "copy.bin")
        c1 = cpu_busy()
        evict(sat)
        cold &= drop_all_caches() if args.cold else True
        c2 = cpu_busy()
        conv = convert_run(sat, out, work / "cache", args.entry)
        c3 = cpu_busy()
        runs.append({"baseline_read_write_s": round(base, 2), "convert_wall_s": conv["wall_s"],
                     "convert_peak_rss_mib": conv["peak_rss_mib"], "ratio": round(conv["wall_s"] / base, 3),
                     "expected_shapes": conv["expected_shapes"], "loadavg_1min_before": round(load, 2),
                     "system_cpu_busy_baseline": round((c1[0] - c0[0]) / max(1, c1[1] - c0[1]), 2),
                     "system_cpu_busy_convert": round((c3[0] - c2[0]) / max(1, c3[1] - c2[1]), 2)})
    summary = conv["summary"]

    # spot check: converted tensors equal the source bit for bit (and torch itself reads the synthetic file)
    got = open_state_dict(out)
    if args.size == "tiny":
        sd = torch.load(src_file, weights_only=True, mmap=True)["module"]
        assert len(sd) == len(planned) and all(torch.equal(sd[k], o.pieces[0][0].load()) for k, o in planned.items())
    h = SIZES[args.size][0]
    qkv = planned[PREFIX + "transformer.layers.1.attention.query_key_value.weight"].pieces[0][0].load()
    assert torch.equal(got["transformer_blocks.1.attn1.to_k.weight"].load(), qkv[h:2 * h]), "to_k mismatch"
    ada = planned[PREFIX + "mixins.adaln_layer.adaLN_modulations.0.1.weight"].pieces[0][0].load().chunk(12)
    assert torch.equal(got["transformer_blocks.0.norm2.linear.weight"].load(),
                       torch.cat([ada[i] for i in (3, 4, 5, 9, 10, 11)])), "adaLN mismatch"

    med = {k: statistics.median(r[k] for r in runs) for k in ("convert_wall_s", "baseline_read_write_s")}
    result = {
        "bench": "convert", "size": args.size, "model": summary["model"], "dtype": "bfloat16",
        "source_bytes": nbytes, "tensors_in": len(planned), "tensors_out": summary["tensors"],
        "parameters_out": summary["parameters"], "output_files": len(summary["files"]),
        "convert_wall_s": med["convert_wall_s"], "baseline_read_write_s": med["baseline_read_write_s"],
        "ratio_convert_to_baseline": statistics.median(r["ratio"] for r in runs),  # each run's own ratio
        "ratio_memoised_runs": statistics.median([r["ratio"] for r in runs if r["expected_shapes"] == "memoised"]
                                                 or [float("nan")]),
        "convert_peak_rss_mib": max(r["convert_peak_rss_mib"] for r in runs),
        "page_cache": ("whole page cache dropped before each run (cold libraries too)" if args.cold and cold else
                       "checkpoint file evicted from the page cache before each run (libraries as the OS left them)"),
        "runs": runs, "write_synthetic_s": round(write_s, 1),
        "command": f"python bench/convert.py --size {args.size} --repeat {args.repeat}"
                   + (" --entry cogpipe" if args.entry == "cogpipe" else ""),
        "converter_command": " ".join(["cogpipe convert" if args.entry == "cogpipe" else
                                       "python -m cogpipe.convert", "SAT", "OUT", "--json"]),
        "cold_convert_wall_s": runs[0]["convert_wall_s"],
        "measured": "medians over runs (ratio: median of each run's convert/baseline); wall of "
                    "`python -m cogpipe.convert SAT OUT` incl. interpreter start and "
                    "imports; run 1 starts with an empty expected-shape memo (imports diffusers), later runs reuse "
                    "it; baseline = read the .pt + write a copy + fsync; peak RSS from /usr/bin/time -v; "
                    "system_cpu_busy = share of both cores busy (any process) during the run",
        "machine": machine(),
    }
    line = json.dumps(result)
    print(line)
    if args.save:
        path = ROOT / "bench" / "results" / f"convert_{args.size}_cpu.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
