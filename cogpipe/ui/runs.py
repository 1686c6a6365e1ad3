"""The training runs under an outputs folder, read from the files a run leaves (README: the output table): its
state, step of max_steps, metrics.jsonl, checkpoints, validation videos and resolved config. A run the page
launched also has ui_job.json (cogpipe.ui.launcher), which tells running, finished, failed and interrupted apart
exactly; for a run started elsewhere the state is read from its files."""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from cogpipe.checkpoint import STATE, checkpoints_dir
from cogpipe.tracking import METRICS

JOB = "ui_job.json"  # what the launcher records about the process it started for this run
LOG = "ui_train.log"  # that process's stdout and stderr
STATES = ("queued", "running", "finished", "failed", "interrupted")
RECENT_S = 60.0  # a run started elsewhere whose metrics.jsonl changed this recently counts as running
INTERRUPTED_LINE = "interrupted: stopped by signal"  # what train.py prints when a signal stopped it (train.py)
STEP_VIDEO = re.compile(r"step-(\d+)-(\d+)\.mp4$")


@dataclass
class Run:
    name: str
    path: Path
    state: str
    step: int | None  # the last logged or checkpointed optimizer step
    max_steps: int | None
    job: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.name}: {self.state}"


def read_job(run_dir) -> dict:
    file = Path(run_dir) / JOB
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return {}


def pid_alive(pid) -> bool:
    """True while process `pid` exists and is not a zombie."""
    if not pid:
        return False
    import psutil

    try:
        return psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def read_metrics(run_dir) -> list[dict]:
    """metrics.jsonl as rows (a line still being written is skipped)."""
    rows = []
    try:
        text = (Path(run_dir) / METRICS).read_text()
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def curves(run_dir) -> dict[str, list[tuple[int, float]]]:
    """{"loss": [(step, value), ...], "lr": ..., "grad_norm": ...}, non-finite values left out."""
    out = {"loss": [], "lr": [], "grad_norm": []}
    for row in read_metrics(run_dir):
        for key, points in out.items():
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                points.append((int(row["step"]), float(value)))
    return out


def checkpoints(run_dir) -> list[dict]:
    """The complete checkpoints (trainer_state.json present), oldest first: {name, path, step, latest}."""
    root = checkpoints_dir(run_dir)
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    found = []
    for folder in sorted(root.glob("checkpoint-*")):
        if (folder / STATE).is_file():
            try:
                step = int(json.loads((folder / STATE).read_text())["step"])
            except (OSError, ValueError, KeyError):
                continue
            found.append({"name": folder.name, "path": str(folder), "step": step, "latest": folder.name == latest})
    return found


def validation_videos(run_dir) -> list[dict]:
    """The validation videos by step: {step, index, path, prompt}, in step order."""
    videos = []
    for path in sorted((Path(run_dir) / "validation").glob("step-*.mp4")):
        m = STEP_VIDEO.search(path.name)
        if m:
            caption = path.with_suffix(".txt")
            prompt = caption.read_text().strip() if caption.is_file() else ""
            videos.append({"step": int(m.group(1)), "index": int(m.group(2)), "path": str(path), "prompt": prompt})
    return videos


def resolved_config(run_dir) -> str:
    file = Path(run_dir) / "config.yaml"
    return file.read_text() if file.is_file() else ""


def max_steps_of(run_dir) -> int | None:
    text = resolved_config(run_dir)
    if not text:
        return None
    import yaml

    try:
        return int(yaml.safe_load(text)["train"]["max_steps"])
    except (KeyError, TypeError, ValueError, yaml.YAMLError):
        return None


def log_tail(run_dir, chars: int = 20000, name: str = LOG) -> str:
    """The end of the run's log (the page's launch log, or another log file in the run folder)."""
    file = Path(run_dir) / name
    try:
        with open(file, "rb") as f:
            f.seek(max(0, file.stat().st_size - chars))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def readable(text: str, lines: int = 80) -> str:
    """A log as a terminal shows it: each progress bar redrawn in place (carriage returns) as its last state, and
    the last `lines` lines."""
    shown = [line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\r") else line.rstrip("\r")
             for line in text.split("\n")]
    return "\n".join(shown[-lines:])


def finished_files(run_dir) -> bool:
    """The end of a run is on disk: its export or its LoRA."""
    run_dir = Path(run_dir)
    return (run_dir / "export" / "model_index.json").is_file() or any((run_dir / "lora").glob("*.safetensors"))


def state_of(run_dir, job: dict, step: int | None, max_steps: int | None, now: float | None = None) -> str:
    """running, finished, failed or interrupted (or queued: launched from the page, waiting for its turn)."""
    run_dir = Path(run_dir)
    if job:
        if job.get("state") == "queued":
            return "queued"
        if job.get("returncode") is None:
            return "running" if pid_alive(job.get("pid")) else "interrupted"  # the page's server went away
        if job["returncode"] == 0:
            return "finished"
        stopped = job.get("stop_requested") or INTERRUPTED_LINE in log_tail(run_dir)
        return "interrupted" if stopped else "failed"
    now = time.time() if now is None else now
    metrics = run_dir / METRICS
    if metrics.is_file() and now - metrics.stat().st_mtime < RECENT_S and not finished_files(run_dir):
        return "running"
    if max_steps is not None and step is not None and step >= max_steps and finished_files(run_dir):
        return "finished"
    return "interrupted" if checkpoints(run_dir) else "failed"


def load_run(run_dir) -> Run:
    run_dir = Path(run_dir)
    job = read_job(run_dir)
    rows = read_metrics(run_dir)
    saved = checkpoints(run_dir)
    steps = [r["step"] for r in rows[-1:]] + [c["step"] for c in saved[-1:]]
    step = max(steps) if steps else None
    max_steps = max_steps_of(run_dir) or job.get("max_steps")
    return Run(run_dir.name, run_dir, state_of(run_dir, job, step, max_steps), step, max_steps, job)


def is_run(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).exists() for name in ("config.yaml", JOB, METRICS, "checkpoints"))


def discover(outputs) -> list[Run]:
    """Every run directly under `outputs`, newest first."""
    outputs = Path(outputs)
    if not outputs.is_dir():
        return []
    folders = [f for f in outputs.iterdir() if is_run(f)]
    folders.sort(key=lambda f: f.stat().st_mtime, reverse=True)
    return [load_run(f) for f in folders]
