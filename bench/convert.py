"""Benchmark `cogpipe convert` against `cp` of the same bytes, both directions; prints one JSON line.

    python bench/convert.py --size 5b [--repeat 3] [--workdir /tmp/cogpipe-bench-convert] [--save]

1. writes a SAT transformer folder (latest + 1/mp_rank_00_model_states.pt) with the real shapes of the chosen
   size in bf16, streaming one tensor at a time (random values from a reused pool), and converts it once to a
   Diffusers folder, the source of the reverse direction;
2. per direction and repeat, the baseline `cp -r SRC COPY` followed by `sync` of the copied files (the
   converter fsyncs its output, so the copy is made durable too; both timings are reported), and the
   conversion `python -m cogpipe.convert SRC OUT --json` (wall time of the whole process, interpreter start
   and imports included; peak RSS from wait4). The source is evicted from the page cache before each cp and each
   conversion (--hot: read once before each instead, so both find it cached); the two alternate, cp first on
   even repeats, the conversion first on odd ones;
3. checks converted tensors against the source bit for bit, deletes the synthetic files (unless --keep).
The JSON reports, per direction, the median of each pair's ratio conversion / (cp + sync) and of conversion / cp,
the medians of the times, every run, and the machine (cores, memory, disk, load averages).
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

from common import emit  # noqa: E402

from cogpipe.convert.io import Out, write_torch  # noqa: E402
from cogpipe.weights import open_state_dict  # noqa: E402

SIZES = {  # hidden, heads, layers, time embed, text embed
    "tiny": (64, 2, 2, 32, 64),
    "2b": (1920, 30, 30, 512, 4096),
    "5b": (3072, 48, 42, 512, 4096),
}
PREFIX = "model.diffusion_model."
DIRECTIONS = ("sat->diffusers", "diffusers->sat")


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


def files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def evict(path: Path) -> None:
    """Flush and drop `path` (a file or every file under a folder) from the page cache: reads hit the disk."""
    subprocess.run(["sync"], check=True)
    for f in files(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(path: Path) -> None:
    """Read `path` once so that it sits in the page cache (--hot)."""
    buf = bytearray(64 << 20)
    for f in files(path):
        with open(f, "rb", buffering=0) as fi:
            while fi.readinto(buf):
                pass


def prepare(src: Path, hot: bool) -> None:
    if hot:
        warm(src)
    else:
        evict(src)


# Runs a command as its grandchild and reports the command's own peak RSS: a child's ru_maxrss also counts the
# memory of the process it was forked from (Linux records it at exec), here a small interpreter, not this bench.
_RSS_WRAPPER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(f"peak_rss_kib={usage.ru_maxrss}", file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def convert_run(src: Path, dst: Path) -> dict:
    cmd = [sys.executable, "-c", _RSS_WRAPPER, sys.executable, "-m", "cogpipe.convert", str(src), str(dst), "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"conversion failed ({p.returncode}):\n{p.stderr[-3000:]}")
    rss_kib = int(re.findall(r"peak_rss_kib=(\d+)", p.stderr)[-1])
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    return {"wall_s": round(wall, 3), "peak_rss_mib": round(rss_kib / 1024, 1), "summary": summary}


def cp_run(src: Path, dst: Path) -> dict:
    """`cp -r SRC DST`, then `sync` of the copied files (fsync each), timed separately; the copy is removed."""
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    t1 = time.perf_counter()
    subprocess.run(["sync", *map(str, files(dst))], check=True)
    t2 = time.perf_counter()
    shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    return {"cp_s": round(t1 - t0, 3), "sync_s": round(t2 - t1, 3), "cp_sync_s": round(t2 - t0, 3)}


def cpu_busy() -> list[int]:
    """System-wide (busy, total) jiffies: shows whether other processes shared the CPU during a run."""
    v = list(map(int, Path("/proc/stat").read_text().splitlines()[0].split()[1:]))
    return [sum(v) - v[3] - v[4], sum(v)]


def busy_share(a: list[int], b: list[int]) -> float:
    return round((b[0] - a[0]) / max(1, b[1] - a[1]), 2)


def machine(work: Path) -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 2**20
    df = subprocess.run(["df", "-T", "-B1", str(work)], capture_output=True, text=True).stdout.splitlines()[-1].split()
    usage = shutil.disk_usage(work)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1), "gpu": None,
            "disk": {"device": df[0], "filesystem": df[1], "size_gib": round(usage.total / 2**30),
                     "free_gib_at_start": round(usage.free / 2**30)},
            "os": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}


def check(size: str, planned: dict, sat_file: Path, diffusers_dir: Path, sat_back: Path) -> None:
    """Converted tensors equal the source bit for bit, both ways (every tensor at tiny size, samples at 5B)."""
    got = open_state_dict(diffusers_dir)
    back = open_state_dict(sat_back, master_weights=False)
    h = SIZES[size][0]
    qkv = planned[PREFIX + "transformer.layers.1.attention.query_key_value.weight"].pieces[0][0].load()
    assert torch.equal(got["transformer_blocks.1.attn1.to_k.weight"].load(), qkv[h:2 * h]), "to_k mismatch"
    ada = planned[PREFIX + "mixins.adaln_layer.adaLN_modulations.0.1.weight"].pieces[0][0].load().chunk(12)
    assert torch.equal(got["transformer_blocks.0.norm2.linear.weight"].load(),
                       torch.cat([ada[i] for i in (3, 4, 5, 9, 10, 11)])), "adaLN mismatch"
    keys = [k for k in planned if "freqs" not in k and "position_embeddings" not in k]
    sample = keys if size == "tiny" else keys[:: max(1, len(keys) // 40)]
    for k in sample:
        assert torch.equal(back[k].load(), planned[k].pieces[0][0].load()), f"{k} differs after the round trip"
    if size == "tiny":  # torch itself reads both files written by cogpipe (the synthetic source and the round trip)
        for f, key in ((sat_file, "module"), (sat_back / "1" / "mp_rank_00_model_states.pt", "module")):
            sd = torch.load(f, weights_only=True, mmap=True)[key]
            assert all(torch.equal(sd[k], planned[k].pieces[0][0].load()) for k in sample)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default="tiny")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/cogpipe-bench-convert")
    ap.add_argument("--hot", action="store_true", help="read the source into the page cache before each cp and "
                                                       "conversion instead of evicting it")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints and the outputs")
    ap.add_argument("--save", action="store_true", help="also write bench/results/convert_<size>_cpu.json")
    args = ap.parse_args()

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    load_start = os.getloadavg()
    info = machine(work)
    sat, diffusers_src = work / "sat", work / "diffusers"
    t0 = time.perf_counter()
    planned = write_sat(sat, args.size)
    write_s = time.perf_counter() - t0
    first = convert_run(sat, diffusers_src)  # the reverse direction's source (not timed against cp)
    sources = {"sat->diffusers": sat, "diffusers->sat": diffusers_src}

    runs: dict[str, list[dict]] = {d: [] for d in DIRECTIONS}
    for r in range(args.repeat):
        for direction in DIRECTIONS:
            src, out, copy = sources[direction], work / "out", work / "copy"
            shutil.rmtree(out, ignore_errors=True)
            row = {"repeat": r, "order": "cp first" if r % 2 == 0 else "conversion first"}
            for step in (("cp", "convert") if r % 2 == 0 else ("convert", "cp")):
                prepare(src, args.hot)
                load, c0 = os.getloadavg()[0], cpu_busy()
                if step == "cp":
                    row.update(cp_run(src, copy))
                else:
                    conv = convert_run(src, out)
                    row.update(convert_wall_s=conv["wall_s"], convert_peak_rss_mib=conv["peak_rss_mib"])
                row[f"loadavg_1min_before_{step}"] = round(load, 2)
                row[f"system_cpu_busy_{step}"] = busy_share(c0, cpu_busy())
            row["ratio"] = round(row["convert_wall_s"] / max(row["cp_sync_s"], 1e-3), 3)
            row["ratio_to_cp_alone"] = round(row["convert_wall_s"] / max(row["cp_s"], 1e-3), 3)
            runs[direction].append(row)
            if direction == "diffusers->sat" and r == args.repeat - 1:
                check(args.size, planned, sat / "1" / "mp_rank_00_model_states.pt", diffusers_src, out)

    def med(direction: str, key: str) -> float:
        return round(statistics.median(row[key] for row in runs[direction]), 3)

    summary = first["summary"]
    result = {
        "bench": "convert", "size": args.size, "model": summary["model"], "dtype": "bfloat16",
        "source_bytes": {d: sum(f.stat().st_size for f in files(sources[d])) for d in DIRECTIONS},
        "tensors_out": summary["tensors"], "parameters_out": summary["parameters"],
        "directions": {d: {"ratio": med(d, "ratio"), "ratio_to_cp_alone": med(d, "ratio_to_cp_alone"),
                           "convert_wall_s": med(d, "convert_wall_s"), "cp_s": med(d, "cp_s"),
                           "cp_sync_s": med(d, "cp_sync_s"),
                           "convert_peak_rss_mib": max(row["convert_peak_rss_mib"] for row in runs[d]),
                           "runs": runs[d]} for d in DIRECTIONS},
        "page_cache": ("source read into the page cache before each cp and each conversion (both hot)" if args.hot
                       else "source evicted from the page cache before each cp and each conversion (both cold; "
                            "libraries as the OS left them)"),
        "baseline": "cp -r SRC COPY, then `sync` of the copied files (fsync each: the converter fsyncs its output); "
                    "cp_s is the cp alone",
        "measured": "ratio = median over repeats of convert_wall_s / cp_sync_s of the same repeat (ratio_to_cp_alone:"
                    " / cp_s); times are medians; convert_wall_s = the whole `python -m cogpipe.convert SRC OUT` "
                    "process (interpreter start and imports included); the converter keeps no memo between runs; "
                    "peak RSS of the converter process from wait4 in a small wrapper interpreter (its start is "
                    "counted in convert_wall_s); system_cpu_busy = share of all cores busy (any process) during "
                    "that step",
        "readahead": os.environ.get("COGPIPE_CONVERT_READAHEAD", "default (2 GiB)"),
        "write_synthetic_s": round(write_s, 1),
        "command": f"python bench/convert.py --size {args.size} --repeat {args.repeat}" + (" --hot" * args.hot),
        "converter_command": "python -m cogpipe.convert SRC OUT --json",
        "machine": {**info, "loadavg_at_start": [round(x, 2) for x in load_start],
                    "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=ROOT).stdout.strip() or None,
    }
    emit(result, ROOT / "bench" / "results" / f"convert_{args.size}_cpu.json" if args.save else None)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
