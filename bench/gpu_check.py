"""The GPU check: what the CPU cannot show, in one short run on one CUDA GPU; writes one JSON file, after every stage.

    bash bench/gpu_wheels.sh                      # first, on a machine with internet: the wheels the GPU image lacks
    bash bench/gpu_check.sh                       # on the GPU machine (installs the carried wheels first)
    python bench/gpu_check.py --out bench/results/gpu_check_<device>.json [--budget-min 5]
    python bench/gpu_check.py --tiny --out /tmp/gpu_check.json      # the same code paths, tiny, on a CPU

Stages, in this order (STAGES), each in its own process under its own timeout (a share of the budget), its error
or timeout recorded and the next stage run; the JSON is rewritten after each stage (and the end-to-end run rewrites
its own part after each of its steps), so a run cut short still leaves every finished result:
  steps-2b     bench/train_step.py at 2B's real size as its recipe trains it: LoRA, fp16 with a GradScaler, fused
               AdamW, gradient checkpointing, rank 128 (3 steps, 1 warmup): step time, peak memory, MFU
  steps-5b     the same for 5B (bf16)
  steps-1.5    the same for CogVideoX1.5-5B (bf16, 81 x 768 x 1360)
  run          the real path end to end: a CogVideoX-2B pipeline folder laid out as the hub's (random weights, bf16,
               SentencePiece tokenizer, T5-XXL), two 49 x 480 x 720 clips, `train.py` on configs/cogvideox_2b_lora.yaml
               for 2 steps with one in-training validation, the export, the end-of-run render, then `infer.py` with
               the LoRA at the model's own size: wall time and peak GPU memory of each
  caption      cogpipe prepare's captioner (cogpipe/data/prepare/caption.py): Qwen2.5-VL-3B-Instruct in bf16 (its
               weights must be in the Hugging Face cache, or COGPIPE_CAPTION_MODEL names a folder: the GPU machine
               has no internet) captions 12 clips of 49 x 480 x 720, 8 frames each, batches of 4: clips per minute, peak
               memory, the captions' T5 token counts; then 4-bit weights where bitsandbytes is installed
  memory       bench/memory_measure.py: max_memory_allocated/reserved of recipes with the low-VRAM switches, and the
               ratio to their simulation (bench/results/memory_sim.json)
  inference    bench/inference_gpu.py: seconds a denoising step of CogVideoX-5B at 49 x 480 x 720 (random bf16
               weights) eager, compiled, fp8 + compiled, SageAttention where installed, and with each step cache at
               its recommended threshold, with the peak memory of each (its own run: `--only inference
               --budget-min 6`; in the full run it gets what the others left)
The CUDA cache is emptied between stages. A stage is one entry of STAGES: (name, share of the budget, function of
(work folder, tiny, its own JSON file) -> dict); add one there.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # fixtures/hub.py: the hub's folder layout
sys.path.insert(0, str(REPO / "bench"))  # train_step.py

import torch  # noqa: E402
from common import write_json  # noqa: E402

STEP_RUNS = {"steps-2b": ("2b", "fp16"), "steps-5b": ("5b", "bf16"), "steps-1.5": ("1.5-5b", "bf16")}  # recipes'
PROMPT = "a red ball bouncing on a wooden floor"
MIN_STAGE_S = 20  # a stage with less time than this left in the budget is skipped, and recorded as skipped


def write_pipeline(folder: Path, tiny: bool, device) -> Path:
    """A CogVideoX-2B pipeline folder in the hub's layout with random weights in bf16 (tiny: the toy 2B of the
    test fixtures), built on `device`."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    from cogpipe import family

    from fixtures.hub import write_hub_pipeline, write_tokenizer

    if tiny:
        return write_hub_pipeline(folder, "2b")
    variant = family.VARIANTS["2b"]
    write_tokenizer(folder / "tokenizer")
    torch.manual_seed(0)
    with torch.device(device):
        parts = {"text_encoder": T5EncoderModel(T5Config(**variant.text_encoder)),
                 "transformer": CogVideoXTransformer3DModel(**variant.transformer),
                 "vae": AutoencoderKLCogVideoX(**variant.vae)}
    for name, model in parts.items():
        model.to(torch.bfloat16).save_pretrained(folder / name, max_shard_size="5GB")
        del model
    parts.clear()
    CogVideoXDDIMScheduler(**family.scheduler_config("2b")).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "CogVideoXPipeline", "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "CogVideoXTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLCogVideoX"]}))
    return folder


def write_clips(root: Path, frames: int, height: int, width: int) -> Path:
    """Two clips of a moving gradient, in the prompts.txt + videos.txt layout."""
    import numpy as np

    from cogpipe.video import write_mp4

    y, x = np.mgrid[0:height, 0:width]
    for i in range(2):
        video = np.stack([np.stack([(x + 8 * t + 40 * i) % 256, (y + 4 * t) % 256, np.full_like(x, 90 * i)], -1)
                          for t in range(frames)]).astype(np.uint8)
        write_mp4(video, root / "videos" / f"{i}.mp4", fps=8)
    (root / "videos.txt").write_text("videos/0.mp4\nvideos/1.mp4\n")
    (root / "prompts.txt").write_text(f"{PROMPT}\na blue gradient sliding left\n")
    return root


class Peak:
    """Wall time and peak GPU memory of a block."""

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.tic = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.result = {"wall_s": round(time.perf_counter() - self.tic, 2),
                       "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available()
                       else None}


def part_run(work: Path, tiny: bool, partial: Path) -> dict:
    import infer
    from cogpipe.config import load_config
    from cogpipe.training import train
    from cogpipe.video import read_video

    device = "cuda" if torch.cuda.is_available() else "cpu"
    frames, height, width = (17, 64, 64) if tiny else (49, 480, 720)
    out: dict = {}
    with Peak() as p:
        model = write_pipeline(work / "pipeline", tiny, device)
    out["write_pipeline"] = p.result
    write_json(partial, out)
    clips = write_clips(work / "clips", frames, height, width)
    overrides = [f"model.pretrained={model}", f"data.root={clips}", f"output_dir={work / 'run'}",
                 f"data.frames={frames}", f"data.height={height}", f"data.width={width}", "report_to=none",
                 "train.max_steps=2", "train.log_every=1", "train.checkpoint_every=0", "validation.every=1",
                 "validation.steps=4", f"validation.prompts=[{PROMPT}]"]
    if tiny:
        overrides += ["lora.rank=4", "train.mixed_precision=no", "model.weight_dtype=fp32"]
    cfg = load_config(REPO / "configs" / "cogvideox_2b_lora.yaml", overrides)
    with Peak() as p:
        run = train(cfg)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    videos = sorted((run / "validation").glob("*.mp4"))
    out["train"] = {**p.result, "steps": len(metrics), "loss": [m["loss"] for m in metrics],
                    "validation_videos": [v.name for v in videos],
                    "video_shape": list(read_video(videos[-1]).shape) if videos else None}
    write_json(partial, out)
    with Peak() as p:
        code = infer.main(["--model", str(model), "--lora", str(run / "lora"), "--prompt", PROMPT, "--steps", "4",
                           "--num-frames", str(frames), "--height", str(height), "--width", str(width),
                           "--output", str(work / "infer.mp4")])
    out["infer"] = {**p.result, "exit": code, "video_shape": list(read_video(work / "infer.mp4").shape)}
    return out


def part_steps(name: str, work: Path, tiny: bool, partial: Path) -> dict:
    """One bench/train_step.py run of STEP_RUNS[name] (LoRA, its recipe's dtype, 3 steps, 1 warmup)."""
    size, dtype = STEP_RUNS[name]
    args = (["--size", "tiny", "--like", size, "--steps", "2", "--warmup", "1"] if tiny
            else ["--size", size, "--steps", "3", "--warmup", "1"])
    args += ["--mode", "lora", "--dtype", dtype, "--gradient-checkpointing", "--out", str(partial)]
    from train_step import main as train_step

    return train_step(args)


def part_memory_stage(work: Path, tiny: bool, partial: Path) -> dict:
    """bench/memory_measure.py: max_memory_allocated/reserved of recipes with the low-VRAM switches, each beside its
    simulation (bench/results/memory_sim.json) as a ratio."""
    from memory_measure import part_memory

    return {"runs": part_memory(work, tiny)}


def part_caption(work: Path, tiny: bool, partial: Path) -> dict:
    """Captioning throughput and peak memory of the prepare captioner (bf16; then 4-bit where bitsandbytes is)."""
    import importlib.util

    import numpy as np

    from cogpipe.data.prepare.caption import Captioner, clip_frames, fit_caption
    from cogpipe.devices import DTYPE_NAMES
    from cogpipe.models import build_tokenizer
    from cogpipe.video import write_mp4

    count, batch = (2, 2) if tiny else (12, 4)
    frames, height, width = (17, 64, 64) if tiny else (49, 480, 720)
    if tiny:
        from fixtures.tiny_vlm import make_tiny_vlm

        model_id = make_tiny_vlm(work / "tiny_vlm")
    else:
        model_id = os.environ.get("COGPIPE_CAPTION_MODEL", "Qwen/Qwen2.5-VL-3B-Instruct")
    y, x = np.mgrid[0:height, 0:width]
    paths = []
    for i in range(count):
        video = np.stack([np.stack([(x + 8 * t + 40 * i) % 256, (y + 4 * t) % 256, np.full_like(x, 20 * i)], -1)
                          for t in range(frames)]).astype(np.uint8)
        paths.append(write_mp4(video, work / "caption_clips" / f"{i}.mp4", fps=8))
    sampled = [clip_frames(p) for p in paths]
    from cogpipe.config import load_config

    recipe = "tiny_lora.yaml" if tiny else "cogvideox_2b_lora.yaml"
    try:  # the recipe's T5 tokenizer counts the captions' tokens (where it is in the cache)
        t5 = build_tokenizer(load_config(REPO / "configs" / recipe, [], validate_model=False).model)
    except Exception:
        t5 = None
    out: dict = {"model": model_id, "clips": count, "batch": batch, "clip_shape": [frames, height, width]}
    modes = [None] + (["4bit"] if importlib.util.find_spec("bitsandbytes") and not tiny else [])
    for quantize in modes:
        with Peak() as load:  # bf16 on a GPU, fp32 on the CPU (cogpipe/devices.py)
            captioner = Captioner(model_id, quantize=quantize, max_new_tokens=12 if tiny else 300)
        name = quantize or DTYPE_NAMES[captioner.dtype]
        captioner.caption([sampled[0][0]], [sampled[0][1]])  # warm-up
        texts = []
        with Peak() as p:
            for i in range(0, count, batch):
                part = sampled[i:i + batch]
                texts += captioner.caption([f for f, _ in part], [r for _, r in part])
        out[name] = {"load_s": load.result["wall_s"], **p.result, "dtype": str(captioner.dtype),
                     "device": str(captioner.device), "clips_per_min": round(count / p.result["wall_s"] * 60, 2),
                     "caption_chars": [len(t) for t in texts], "first_caption": texts[0][:600]}
        if t5 is not None:
            out[name]["t5_tokens"] = [fit_caption(t5, t, 10_000)[1] for t in texts]
        del captioner
        empty_cuda_cache()
        write_json(partial, out)
    return out


def part_inference_stage(work: Path, tiny: bool, partial: Path) -> dict:
    """bench/inference_gpu.py: seconds a denoising step of 5B at 49 x 480 x 720 with the speed switches."""
    from inference_gpu import part_inference

    return part_inference(work, tiny, partial)


STAGES = [  # (name, share of the budget it may take, what it runs)
    ("steps-2b", 0.15, functools.partial(part_steps, "steps-2b")),
    ("steps-5b", 0.2, functools.partial(part_steps, "steps-5b")),
    ("steps-1.5", 0.25, functools.partial(part_steps, "steps-1.5")),
    ("caption", 0.2, part_caption),
    ("run", 1.0, part_run),  # whatever is left
    ("memory", 1.0, part_memory_stage),  # whatever the run left
    ("inference", 1.0, part_inference_stage),  # whatever is left
]


def run_stage(name: str, work: Path, tiny: bool, partial: Path) -> int:
    """In the stage's own process: run it, write its result (or its error) to `partial`."""
    fn = dict((n, f) for n, _, f in STAGES)[name]
    try:
        result = fn(work, tiny, partial)
    except Exception:
        done = json.loads(partial.read_text()) if partial.is_file() else {}
        write_json(partial, {**done, "error": traceback.format_exc()[-3000:]})
        return 1
    write_json(partial, result)
    return 0


def launch_stage(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    """A stage in its own process (its GPU memory gone with it), killed at its timeout."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def empty_cuda_cache() -> None:
    if torch.cuda.is_available():
        import gc

        gc.collect()
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu_check.json")
    ap.add_argument("--work", type=Path, default=Path("/tmp/cogpipe_gpu_check"))
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: the same code paths on a CPU")
    ap.add_argument("--budget-min", type=float, default=5.0,
                    help="all stages together (default 5: a rerun still fits in a 15-minute device lease)")
    ap.add_argument("--only", nargs="+", default=None, metavar="STAGE",
                    help=f"run only these stages (of {', '.join(n for n, _, _ in STAGES)})")
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # internal: run one stage in this process
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.stage:
        return run_stage(args.stage, args.work, args.tiny, args.out)
    start = time.perf_counter()
    deadline = start + 60 * args.budget_min
    cuda = torch.cuda.is_available()
    import diffusers
    import transformers

    report = {"bench": "gpu_check", "tiny": args.tiny, "budget_min": args.budget_min,
              "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
              "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
              "transformers": transformers.__version__, "python": platform.python_version(), "parts": {}}

    def save():
        report["total_s"] = round(time.perf_counter() - start, 1)
        write_json(args.out, report)

    save()
    unknown = sorted(set(args.only or []) - {n for n, _, _ in STAGES})
    if unknown:
        ap.error(f"--only: no stage {', '.join(unknown)} (stages: {', '.join(n for n, _, _ in STAGES)})")
    for name, share, _ in STAGES:
        if args.only and name not in args.only:
            continue
        left = deadline - time.perf_counter()
        timeout = int(min(left, share * 60 * args.budget_min)) if not args.tiny else int(max(left, 600))
        if timeout < MIN_STAGE_S:
            report["parts"][name] = {"skipped": f"time budget: {left:.0f} s left"}
            save()
            continue
        partial = args.work / f"{name}.json"
        partial.unlink(missing_ok=True)
        tic = time.perf_counter()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--work", str(args.work),
               "--out", str(partial)] + (["--tiny"] if args.tiny else [])
        try:
            r = launch_stage(cmd, timeout)
            failure = None if r.returncode == 0 else f"exit {r.returncode}: {r.stderr[-1500:]}"
        except subprocess.TimeoutExpired:
            failure = f"timeout after {timeout} s"
        result = json.loads(partial.read_text()) if partial.is_file() else {}
        if failure and "error" not in result:
            result["error"] = failure
        result["stage_wall_s"] = round(time.perf_counter() - tic, 1)
        report["parts"][name] = result
        save()
        empty_cuda_cache()
        print(json.dumps({name: result})[:2000], flush=True)
    ok = all("error" not in p for p in report["parts"].values())
    print(f"wrote {args.out} in {report['total_s']} s" + ("" if ok else " (a stage failed: see its error)"))
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
