"""What cogpipe's training loop adds to the model's own work; prints one JSON line.

    python bench/loop_overhead.py [--steps 300] [--repeat 3] [--out bench/results/loop_overhead_cpu.json]

The same tiny random CogVideoX (the `tiny` preset: 2 layers) with a rank-16 LoRA, the same 24 world clips
(17 x 64 x 64, cached latents), batch 1, one thread (what `accelerate launch` gives a process), in one process:

  bare     the limit: latents already in memory; per step noise and a timestep, the forward, an MSE loss on the
           v-target, backward, gradient clipping, a fused AdamW step; nothing else
  cogpipe  training.train(cfg) on the same model and data with its defaults: the cached examples in the plan's
           order, per-example seeded randomness, model inputs, the loss, accelerate, the skip-on-non-finite
           bookkeeping, the LR schedule, logging every train.log_every (= --chunk) steps

Each loop is timed by the process's CPU clock in chunks of `--chunk` steps after `--warmup`. On a shared virtual
machine the same loop's speed swings by 10-40% from minute to minute (other tenants, caches), so `--mode
interleaved` (the default) runs the two in turns in one thread: before every chunk-th step of training.train,
`--chunk` steps of the bare loop run, so each cogpipe chunk has a bare chunk beside it, a tenth of a second apart,
on the same machine state. The ratio (cogpipe's steps/s over bare's: 1.0 adds nothing) is the median over all
chunk pairs of bare's chunk time over cogpipe's: a hiccup of the machine that hits one chunk of either loop moves
it no more than any other pair. Beside it: the ratio of the two loops' total times (which such hiccups do move)
and of each loop's `--quantile` (0.1) chunk time. Every cogpipe chunk holds one logging step (chunk = log_every).
`--mode sequential` runs bare, then cogpipe, `--repeat` times, and its ratio is the quantile one.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import torch  # noqa: E402
from common import at_quantile, emit, world_clips  # noqa: E402


def config(root: Path, out: Path, steps: int, warmup: int, log_every: int, threads: int = 1):
    from cogpipe.config import load_config

    overrides = ["model.pretrained=null", "model.preset=tiny", f"data.root={root}", f"data.cache_dir={root}/cache",
                 f"output_dir={out}", "report_to=none", f"train.max_steps={steps + warmup}", "train.batch_size=1",
                 "train.checkpoint_every=0", "train.warmup_steps=0", "lora.rank=16", "lora.alpha=16",
                 "validation.prompts=[]", f"train.log_every={log_every}", "train.lr_scheduler=constant",
                 f"train.cpu_threads={threads}"]
    return load_config(REPO / "configs" / "tiny_lora.yaml", overrides)


clock = time.process_time  # the process's CPU time: other processes on a shared machine do not add to it


def bare_stepper(cfg) -> Callable[[], None]:
    """One step of the bare loop per call, on the cached latents of `cfg` (built by a cogpipe run before)."""
    from safetensors.torch import load_file

    from cogpipe import models
    from cogpipe.data.cache import Cache
    from cogpipe.data.folders import discover
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
    rope = rotary_embeddings(dict(model.config), 5, 8, 8, "cpu")
    g = torch.Generator().manual_seed(0)
    steps = itertools.count()

    def step() -> None:
        i = next(steps) % len(latents)
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

    return step


def chunk_time(step: Callable[[], None], chunk: int) -> float:
    tic = clock()
    for _ in range(chunk):
        step()
    return clock() - tic


def sequential(cfg, steps: int, warmup: int, chunk: int) -> tuple[list[float], list[float]]:
    """The chunk times of the bare loop, then of training.train (from its own clock: the steps_per_s of
    metrics.jsonl, written every train.log_every = chunk steps)."""
    from cogpipe import tracking, training

    step = bare_stepper(cfg)
    for _ in range(warmup):
        step()
    bare = [chunk_time(step, chunk) for _ in range(steps // chunk)]
    real_clock = tracking.time.perf_counter
    tracking.time.perf_counter = clock  # the loop's step meter (steps_per_s) on the bench's clock
    try:
        out = training.train(cfg)
    finally:
        tracking.time.perf_counter = real_clock
    rows = {row["step"]: row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    # steps_per_s at step n is n / (loop time up to n)
    marks = [n / rows[n]["steps_per_s"] for n in range(warmup, warmup + steps + 1, chunk)]
    return bare, [b - a for a, b in zip(marks, marks[1:])]


def interleaved(cfg, steps: int, warmup: int, chunk: int) -> tuple[list[float], list[float]]:
    """The chunk times of both loops, run in turns in this thread: before every chunk-th micro-step of
    training.train, `chunk` steps of the bare loop run. A cogpipe chunk is the time from the end of one bare chunk to
    the start of the next: `chunk` whole iterations of its loop (the batch, model inputs, the step, the schedule,
    logging), nothing of the bare loop's."""
    from cogpipe import training

    step, real_step = bare_stepper(cfg), training._micro_step
    calls, bare, ours, last = itertools.count(), [], [], [None]

    def micro_step(*args, **kwargs):
        i = next(calls)
        if i % chunk == 0 and i >= warmup:
            now = clock()
            if last[0] is not None:
                ours.append(now - last[0])
            if i < warmup + steps:
                bare.append(chunk_time(step, chunk))
            last[0] = clock()
        elif i < warmup:
            step()  # the bare loop's warmup, in step with cogpipe's
        return real_step(*args, **kwargs)

    training._micro_step = micro_step
    try:
        training.train(cfg)
    finally:
        training._micro_step = real_step
    return bare[:len(ours)], ours  # the last chunk of cogpipe's has no next turn to end it


def main(argv=None) -> dict:
    import os
    import statistics

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--chunk", type=int, default=10, help="steps per timed chunk; cogpipe logs every chunk steps")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3, help="runs of both loops")
    ap.add_argument("--mode", choices=("interleaved", "sequential"), default="interleaved")
    ap.add_argument("--quantile", type=float, default=0.1, help="of the chunk times that stand for each loop")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.steps % args.chunk or args.warmup % args.chunk:
        ap.error("--steps and --warmup must be multiples of --chunk")
    torch.set_num_threads(args.threads)

    bare, ours = [], []  # per repeat: the chunk times
    with tempfile.TemporaryDirectory() as tmp:
        root = world_clips(Path(tmp) / "clips", 24)
        from cogpipe.training import train

        train(config(root, Path(tmp) / "warm", 2, 1, args.chunk, args.threads))  # the latent cache, built once
        for r in range(args.repeat):
            cfg = config(root, Path(tmp) / f"run{r}", args.steps, args.warmup, args.chunk, args.threads)
            b, o = (interleaved if args.mode == "interleaved" else sequential)(cfg, args.steps, args.warmup, args.chunk)
            bare.append(b)
            ours.append(o)

    def quantile(runs):  # of all chunk times of all repeats
        return at_quantile((t for run in runs for t in run), args.quantile)

    def steps_per_s(seconds):
        return args.chunk / seconds

    total_bare, total_ours = sum(map(sum, bare)), sum(map(sum, ours))
    pairs = [b / o for run_b, run_o in zip(bare, ours) for b, o in zip(run_b, run_o)]
    result = {"bench": "loop_overhead", "mode": args.mode, "steps": args.steps, "warmup": args.warmup,
              "chunk": args.chunk, "threads": args.threads, "repeat": args.repeat,
              "model": "tiny preset (2 layers, hidden 32), LoRA rank 16, batch 1, 17 x 64 x 64 clips",
              "bare_steps_per_s": steps_per_s(total_bare / sum(map(len, bare))),
              "cogpipe_steps_per_s": steps_per_s(total_ours / sum(map(len, ours))),
              "ratio": statistics.median(pairs) if args.mode == "interleaved" else quantile(bare) / quantile(ours),
              "ratio_of_totals": total_bare / total_ours,
              "quantile": args.quantile, "ratio_at_quantile": quantile(bare) / quantile(ours),
              "runs": [dict(bare=steps_per_s(sum(b) / len(b)), cogpipe=steps_per_s(sum(o) / len(o)),
                            ratio=sum(b) / sum(o), bare_best=steps_per_s(min(b)), cogpipe_best=steps_per_s(min(o)))
                       for b, o in zip(bare, ours)],
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)),
                          "load_average": os.getloadavg(), "torch": torch.__version__,
                          "python": platform.python_version()}}
    return emit(result, args.out)


if __name__ == "__main__":
    main()
