"""What cogpipe's training loop adds to the model's own work; prints one JSON line.

    python bench/loop_overhead.py [--steps 200] [--threads 1] [--out bench/results/loop_overhead_cpu.json]

The same tiny random CogVideoX (the `tiny` preset: 2 layers) with a rank-16 LoRA, the same 24 world clips
(17 x 64 x 64, cached latents), batch 1, one thread (what `accelerate launch` gives a process), in one process:

  bare     the limit: latents already in memory; per step noise and a timestep, the forward, an MSE loss on the
           v-target, backward, gradient clipping, a fused AdamW step; nothing else
  cogpipe  training.train(cfg) on the same model and data: the DataLoader over the cache, per-example seeded
           randomness, model inputs, the weighted loss, accelerate, checkpoint-free, logging every step

Both are timed over their steps after `--warmup`; the ratio cogpipe / bare is what the loop keeps of the model's
speed (1.0: it adds nothing). `--clock cpu` (the default) times with the process's CPU time, which other processes
on a shared machine do not inflate (one thread, no loader workers: all the work is this process's); `--clock wall`
with the wall clock.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import torch  # noqa: E402


def make_clips(root: Path, n: int) -> Path:
    from cogpipe.world.render import COLOURS, DIRECTIONS, SHAPES

    from helpers import make_clips as write

    specs = [(SHAPES[i % 3], COLOURS[i % 4], DIRECTIONS[(i // 3) % 4]) for i in range(n)]
    return write(root, specs)


def config(root: Path, out: Path, steps: int, warmup: int):
    from cogpipe.config import load_config

    overrides = ["model.pretrained=null", "model.preset=tiny", f"data.root={root}", f"data.cache_dir={root}/cache",
                 f"output_dir={out}", "report_to=none", f"train.max_steps={steps + warmup}", "train.batch_size=1",
                 "train.checkpoint_every=0", "train.warmup_steps=0", "lora.rank=16", "lora.alpha=16",
                 "validation.prompts=[]", "train.log_every=1", "train.lr_scheduler=constant", "train.cpu_threads=1"]
    return load_config(REPO / "configs" / "tiny_lora.yaml", overrides)


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = time.process_time


def bare_loop(cfg, steps: int, warmup: int) -> float:
    """Steps/s of the bare loop on the cached latents of `cfg` (built by a cogpipe run before)."""
    from safetensors.torch import load_file

    from cogpipe import models
    from cogpipe.cache import Cache
    from cogpipe.data import discover
    from cogpipe.diffusion import add_noise, rotary_embeddings, v_target
    from cogpipe.lora import add_lora

    cache = Cache.for_config(cfg, "cpu")
    samples = discover(cfg.data.root)
    latents = [load_file(str(cache.video_path(s))) for s in samples]
    prompts = [load_file(str(cache.prompt_path(s.caption)))["prompt_embeds"] for s in samples]
    torch.manual_seed(0)
    model = models.build_transformer(cfg.model, torch.float32)
    add_lora(model, cfg.lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, fused=True)
    alphas = models.build_scheduler(cfg.model).alphas_cumprod
    config_ = dict(model.config)
    rope = rotary_embeddings(config_, 5, 8, 8, "cpu")
    g = torch.Generator().manual_seed(0)
    tic = None
    for step in range(steps + warmup):
        if step == warmup:
            tic = clock()
        i = step % len(latents)
        mean, std = latents[i]["mean"], latents[i]["std"]
        x0 = (mean + std * torch.randn(mean.shape, generator=g)).permute(1, 0, 2, 3)[None]  # (1, F, C, H, W)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, len(alphas), (1,), generator=g)
        noisy = add_noise(x0, noise, t, alphas)
        v = model(hidden_states=noisy, encoder_hidden_states=prompts[i][None], timestep=t, image_rotary_emb=rope,
                  return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(v, v_target(x0, noise, t, alphas))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps / (clock() - tic)


def cogpipe_loop(cfg, steps: int, warmup: int) -> float:
    """Steps/s of training.train over the steps after `warmup`, from the loop's own clock (metrics.jsonl)."""
    from cogpipe import tracking
    from cogpipe.training import train

    real = tracking.time.perf_counter
    tracking.time.perf_counter = clock  # the loop's step meter (steps_per_s) on the chosen clock
    try:
        out = train(cfg)
    finally:
        tracking.time.perf_counter = real
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # steps_per_s at step n is n / (loop time up to n): the time of steps warmup+1..end is their difference
    t_end = rows[-1]["step"] / rows[-1]["steps_per_s"]
    t_warm = rows[warmup - 1]["step"] / rows[warmup - 1]["steps_per_s"]
    return steps / (t_end - t_warm)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3, help="alternate bare and cogpipe this many times; medians")
    ap.add_argument("--clock", choices=tuple(CLOCKS), default="cpu")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    import statistics

    with tempfile.TemporaryDirectory() as tmp:
        root = make_clips(Path(tmp) / "clips", 24)
        cfg = config(root, Path(tmp) / "warm", 2, 1)
        cfg.train.cpu_threads = args.threads
        cogpipe_loop(cfg, 1, 1)  # builds the latent cache, so neither timed loop pays for it
        bare, ours = [], []
        for r in range(args.repeat):
            cfg = config(root, Path(tmp) / f"run{r}", args.steps, args.warmup)
            cfg.train.cpu_threads = args.threads
            bare.append(bare_loop(cfg, args.steps, args.warmup))
            ours.append(cogpipe_loop(cfg, args.steps, args.warmup))
    ratios = [o / b for o, b in zip(ours, bare)]
    import os

    result = {"bench": "loop_overhead", "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
              "clock": args.clock,
              "model": "tiny preset (2 layers, hidden 32), LoRA rank 16, batch 1, 17 x 64 x 64 clips",
              "bare_steps_per_s": statistics.median(bare), "cogpipe_steps_per_s": statistics.median(ours),
              "ratio": statistics.median(ratios), "runs": [dict(bare=b, cogpipe=o, ratio=o / b)
                                                           for b, o in zip(bare, ours)],
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)),
                          "load_average": os.getloadavg(), "torch": torch.__version__,
                          "python": platform.python_version()}}
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
