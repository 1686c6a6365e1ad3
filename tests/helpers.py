"""Helpers shared by the tests: the repository root, small synthetic clip folders, the tiny recipe's overrides."""

import os
from importlib.util import find_spec
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child_env(*paths, **variables) -> dict:
    """The environment of a test's python subprocess: this one's, with `paths` and then the repository on
    PYTHONPATH (so `cogpipe` imports from this checkout) and `variables` set."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, paths), str(REPO)]), **variables}


def needs(module: str, extra: str):
    """A mark for a test that needs an optional package: skipped, with the install line, where `module` is missing
    (the README's `pip install -e ".[test]"`); under CI (`CI` set: .ci/run installs every extra) it runs, so a missing
    extra there fails."""
    import pytest

    return pytest.mark.skipif(find_spec(module) is None and not os.environ.get("CI"),
                              reason=f"needs {module}: pip install -e \".[{extra}]\"")


NEEDS_TORCHAO = needs("torchao", "quantize")
# the data extra (the latent store, cogpipe data on Ray) and the prepare extra (shot detection, filters): a module's
# `pytestmark`, so its fixtures are skipped too
NEEDS_DATA = [needs("pyarrow", "data"), needs("fsspec", "data"), needs("ray", "data"), needs("datasets", "data")]
NEEDS_PREPARE = [needs("scenedetect", "prepare"), needs("cv2", "prepare")]

# Generated videos compared with ones made on another machine (a shipped image, a README strip): float kernels
# differ between CPUs (vector widths, reduction orders), so 50 denoising steps may end a few 8-bit values one level
# apart (3 of 110,592 in the one case seen). A real change (another prompt, seed, step count, scheduler or weight)
# moves most values, by tens of levels. Allowed: 0.1% of the values off, none by more than 8 levels.
VIDEO_TOLERANCE = {"fraction": 1e-3, "levels": 8}


def video_difference(a, b) -> str:
    import numpy as np

    d = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    return f"{int((d > 0).sum())} of {d.size} values differ, by up to {int(d.max())} levels"


def same_video(a, b) -> bool:
    """uint8 videos equal within VIDEO_TOLERANCE (same shape, few values off and none by much)."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
    if a.shape != b.shape:
        return False
    d = np.abs(a - b)
    return bool((d > 0).mean() <= VIDEO_TOLERANCE["fraction"] and d.max() <= VIDEO_TOLERANCE["levels"])


def make_clips(root: Path, specs, frames: int = 17, size: int = 64, layout: str = "txt") -> Path:
    """Write clips of the synthetic world in one of the dataset layouts; returns root."""
    from cogpipe.video import write_mp4
    from cogpipe.world.render import caption, render

    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (shape, colour, direction) in enumerate(specs):
        name = f"{i:02d}_{colour}_{shape}_{direction}.mp4"
        sub = "" if layout == "folder" else "videos/"
        write_mp4(render(shape, colour, direction, frames=frames, size=size, seed=i), root / sub / name)
        rows.append((sub + name, caption(shape, colour, direction)))
    if layout == "txt":
        (root / "videos.txt").write_text("".join(f"{v}\n" for v, _ in rows))
        (root / "prompts.txt").write_text("".join(f"{c}\n" for _, c in rows))
    elif layout == "folder":
        for v, c in rows:
            (root / v).with_suffix(".txt").write_text(c + "\n")
    elif layout == "jsonl":
        import json

        (root / "metadata.jsonl").write_text("".join(json.dumps({"video": v, "caption": c}) + "\n" for v, c in rows))
    elif layout == "csv":
        import csv

        with open(root / "metadata.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file_name", "prompt"])
            w.writerows(rows)
    return root


SPECS = [("square", "purple", "right"), ("circle", "purple", "up"), ("triangle", "purple", "left"),
         ("square", "purple", "down")]


def tiny_overrides(data_root, output_dir, cache_dir, **extra) -> list[str]:
    # the recipe's random preset, not the shipped model tiny_lora.yaml builds on: fast, independent of its weights
    base = {"model.pretrained": "null",
            "data.root": data_root, "output_dir": output_dir, "data.cache_dir": cache_dir, "report_to": "none",
            "train.max_steps": 4, "train.checkpoint_every": 2, "train.batch_size": 2, "lora.rank": 4,
            "lora.alpha": 8, "validation.steps": 2, "train.lr": 1e-2, "train.warmup_steps": 0,
            "train.log_every": 1}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def run_tiny(clips, out, cache, **extra):
    """Train the tiny LoRA recipe in this process with the test overrides."""
    from cogpipe.config import load_config
    from cogpipe.training import train

    cfg = load_config(REPO / "configs" / "tiny_lora.yaml", tiny_overrides(clips, out, cache, **extra))
    return train(cfg), cfg


CPU_SWITCH = {"ddp": {"ACCELERATE_USE_CPU": "1"}, "zero2": {"DS_ACCELERATOR": "cpu"},
              "zero3": {"DS_ACCELERATOR": "cpu"}, "fsdp": {"DS_ACCELERATOR": "cpu"}}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: str, clips, out, cache, failpoint: str | None = None, check: bool = True, processes: int = 2,
           switch: dict | None = None, reads: Path | None = None, **extra):
    """`accelerate launch --config_file configs/accelerate/<launcher>.yaml` with 2 (or `processes`) CPU processes (the
    CPU switch of CPU_SWITCH, a free port) of train.py on the tiny recipe with the test overrides, batch 1 a
    process. `switch`: these CPU switches instead (DS_ACCELERATOR and ACCELERATE_USE_CPU left unset otherwise).
    `reads`: a folder where each process records the rows the latent store's reader hands it (tests/store_reads.py;
    assert_store_reads checks them)."""
    import os
    import subprocess
    import sys

    script = [str(REPO / "tests" / "store_reads.py")] if reads is not None else []
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs" / "accelerate" / f"{launcher}.yaml"), "--num_processes", str(processes),
           "--main_process_port", str(free_port()), *script, str(REPO / "train.py"), "--config",
           str(REPO / "configs" / "tiny_lora.yaml"),
           *tiny_overrides(clips, out, cache, **{"train.batch_size": 1, **extra})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **CPU_SWITCH[launcher]}
    if switch is not None:
        env = {k: v for k, v in env.items() if k not in ("DS_ACCELERATOR", "ACCELERATE_USE_CPU")} | switch
    if failpoint:
        env["COGPIPE_FAILPOINT"] = failpoint
    if reads is not None:
        env["COGPIPE_TEST_READS"] = str(reads)
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


# ---- the latent store (cogpipe/data/store.py) for the tests that train from one -------------------------------------

def store_from_folder(cfg, url, prompts=(), **options):
    """A latent store holding the folder cache's examples of `cfg`'s clips, in the folder's order (as an encoder
    would write them), and `prompts` ("" and validation prompts) in its prompt table, as `cogpipe data encode` writes
    a recipe's extra prompts. Its rows are the folder cache's tensors and it is one window of shards, so training from
    it reads the folder run's examples in the folder run's order (cogpipe.data.reader): a run from the store equals
    the same run from the folder. The cache is the folder runs' (usually encoded already): no Ray, no encoder run."""
    import torch
    from safetensors.torch import load_file

    from cogpipe.data import store as S
    from cogpipe.data.cache import build_cache, load_prompt_embeds
    from cogpipe.data.checks import usable_samples

    cpu = torch.device("cpu")
    samples = usable_samples(cfg, log=lambda *_: None, device=cpu)
    entries = build_cache(cfg, samples, cpu, log=lambda *_: None, extra_prompts=list(prompts))
    with S.StoreWriter(url, S.store_identity(cfg, cpu), **options) as w:
        for sample, e in zip(samples, entries):
            latents = load_file(str(e.latents))
            w.add(sample.shape, [{"key": e.latents.stem, "caption": e.caption, "uri": str(sample.video),
                                  "prompt_embeds": load_file(str(e.prompt))["prompt_embeds"], **latents}])
        if prompts:
            w.add_prompts(load_prompt_embeds(cfg, list(prompts), cpu))
    return S.open_store(url, options.get("storage_options"))


def assert_store_reads(reads: Path, store, seed: int, micro_steps, processes: int, sp: int = 1,
                       killed: bool = False) -> dict:
    """What launch(..., reads=...) recorded: every process read, through the store's reader, its data-parallel
    rank's example of each of `micro_steps` (batch 1 a process) in the data order of cogpipe.data.reader.StorePlan,
    for data-parallel rank = process // sp of processes // sp; the processes of one sequence-parallel group (`sp`
    consecutive processes) received the same examples, byte for byte; the data-parallel ranks of a micro-step
    different rows (the parts of one global batch). `killed`: the launch was killed during the last of
    `micro_steps`, which a process may not have read yet when another's kill ended it. Returns {process: [{"row",
    "digest"}, ...]}."""
    import json

    from cogpipe.data.reader import StorePlan

    got = {p: [json.loads(line) for line in (reads / f"process{p}.jsonl").read_text().splitlines()]
           for p in range(processes)}
    dp_world = processes // sp
    for p, rows in got.items():
        plan = StorePlan(store, 1, seed, p // sp, dp_world)
        want = [plan.indices(m)[0] for m in micro_steps]
        assert [r["row"] for r in rows] in ([want, want[:-1]] if killed else [want]), (p, want, rows)
    n = min(len(rows) for rows in got.values())
    for p in range(processes):  # an SP group's processes: the same sample at every micro-step
        assert got[p][:n] == got[p - p % sp][:n], (p, got)
    for m in range(n):  # a global batch: each data-parallel rank its own part
        assert len({got[d * sp][m]["row"] for d in range(dp_world)}) == dp_world, got
    return got
