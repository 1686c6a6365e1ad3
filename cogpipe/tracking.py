"""What a run reports: metrics.jsonl (one JSON line per logged step), the tracker (wandb, offline by default,
or tensorboard) and the validation videos sent to wandb; the step meter that averages losses over micro-batches
and times the steps."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from cogpipe.atomic import write_text

METRICS = "metrics.jsonl"


def tracker(cfg) -> str | None:
    """The accelerate tracker name for `report_to`, with wandb kept offline and quiet unless told otherwise."""
    if cfg.report_to == "wandb":
        os.environ.setdefault("WANDB_MODE", cfg.wandb_mode)
        os.environ.setdefault("WANDB_DIR", str(Path(cfg.output_dir).resolve()))
        os.environ.setdefault("WANDB_SILENT", "true")
    return None if cfg.report_to == "none" else cfg.report_to


def start(accelerator, cfg, resumed_step: int) -> None:
    """On the main process: drop metric lines past a resumed step (they are about to be recomputed) and start
    the tracker with the resolved config."""
    if not accelerator.is_main_process:
        return
    file = Path(cfg.output_dir) / METRICS
    if file.exists():
        keep = [line for line in file.read_text().splitlines() if line and json.loads(line)["step"] <= resumed_step]
        write_text(file, "".join(line + "\n" for line in keep))
    if cfg.report_to != "none":
        from omegaconf import OmegaConf

        accelerator.init_trackers(cfg.wandb_project, config=OmegaConf.to_container(OmegaConf.structured(cfg)))


class StepMeter:
    """What a step's micro-batches leave on the device: their summed loss, and the run's counts of skipped steps (in
    all, and in a row). A non-finite loss anywhere makes the sum non-finite (NaN and inf survive every sum), so the
    sum alone tells whether a step must be skipped. The host reads the values only when it logs or saves, so a step
    never waits for the device; `end_step` combines the processes' sums in one scalar all-reduce."""

    def __init__(self, grad_accum: int, device):
        self.grad_accum = grad_accum
        self.loss_sum = None  # this step's micro-batch losses so far
        self.skipped = torch.zeros((), device=device)
        self.in_a_row = torch.zeros((), device=device)
        self.tic, self.steps = time.perf_counter(), 0

    def add(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss

    def end_step(self, accelerator, also_skipped: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss over micro-batches and processes, skipped: 1. when any process saw a non-finite loss, or
        `also_skipped`), both on the device; the counters advance, the sum resets."""
        mean = self.loss_sum / self.grad_accum if self.grad_accum > 1 else self.loss_sum
        if accelerator.num_processes > 1:
            mean = accelerator.reduce(mean, "sum") / accelerator.num_processes
        bad = torch.ones_like(mean) if also_skipped else (~torch.isfinite(mean)).float()
        self.skipped += bad
        self.in_a_row = (self.in_a_row + 1) * bad
        self.loss_sum = None
        self.steps += 1
        return mean, bad

    def rate(self) -> float:
        return self.steps / (time.perf_counter() - self.tic)


class MetricsFile:
    """metrics.jsonl, kept open for appending (written by the main process only); a line per logged step, flushed
    as it is written so a killed run loses none."""

    def __init__(self, accelerator, cfg):
        self.file = open(Path(cfg.output_dir) / METRICS, "a") if accelerator.is_main_process else None

    def write(self, row: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def log_step(accelerator, metrics: MetricsFile, step: int, logs: dict, bar) -> None:
    """One logged step: the progress bar (redrawn at tqdm's own rate), the tracker and metrics.jsonl."""
    bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}", it_s=f"{logs['steps_per_s']:.2f}",
                    refresh=False)
    accelerator.log(logs, step=step)
    metrics.write({"step": step, **logs})


def log_videos(accelerator, cfg, step: int) -> None:
    """Send this step's validation mp4s to wandb (no-op for other trackers)."""
    if cfg.report_to != "wandb":
        return
    import wandb

    videos = sorted((Path(cfg.output_dir) / "validation").glob(f"step-{step:06d}-*.mp4"))
    if videos:
        accelerator.log({"validation": [wandb.Video(str(v), caption=v.with_suffix(".txt").read_text().strip(),
                                                    format="mp4") for v in videos]}, step=step)
