"""The page's job queue: one subprocess at a time (`accelerate launch train.py ...`, `cogpipe export RUN`), the
next start waiting its turn. Each job's stdout and stderr go to a log file the page shows as it grows; a training
job's state goes to <output_dir>/ui_job.json (cogpipe.ui.runs reads it).

Stop sends SIGTERM to the training processes themselves (the launcher's children), not to `accelerate launch`:
the trainer finishes the optimizer step in flight, saves a checkpoint and exits (cogpipe.signals), while accelerate's
launcher would give its children only seconds before killing them."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cogpipe import atomic
from cogpipe.ui.runs import JOB

LAUNCHERS = ("default", "ddp", "fsdp", "zero2", "zero3")  # default: no --config_file (one process, or plain DDP)
# what a CPU-only machine needs for several processes of each launcher (docs/multi_gpu.md)
CPU_SWITCH = {"default": {"ACCELERATE_USE_CPU": "1"}, "ddp": {"ACCELERATE_USE_CPU": "1"},
              "zero2": {"DS_ACCELERATOR": "cpu"}, "zero3": {"DS_ACCELERATOR": "cpu"}, "fsdp": {"DS_ACCELERATOR": "cpu"}}
_ids = itertools.count(1)


@dataclass
class Job:
    name: str  # what the page lists: the run's folder name, "export <run>"
    command: list[str]
    log: Path
    run_dir: Path | None = None  # a training job: where ui_job.json goes
    env: dict = field(default_factory=dict)
    max_steps: int | None = None
    id: int = field(default_factory=lambda: next(_ids))
    state: str = "queued"  # queued | running | finished | failed | interrupted
    pid: int | None = None
    returncode: int | None = None
    stop_requested: bool = False
    started: float | None = None
    ended: float | None = None

    @property
    def active(self) -> bool:
        """Queued or running: the folder it writes is taken."""
        return self.state in ("queued", "running")

    def record(self) -> dict:
        return {"name": self.name, "command": self.command, "log": str(self.log), "state": self.state,
                "pid": self.pid, "returncode": self.returncode, "stop_requested": self.stop_requested,
                "started": self.started, "ended": self.ended, "max_steps": self.max_steps}

    def save(self) -> None:
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic.write_text(self.run_dir / JOB, json.dumps(self.record(), indent=1))


def active_job(jobs, *, name: str | None = None, run_dir=None) -> Job | None:
    """The job of `jobs` queued or running under `name` or in `run_dir` (a training run's folder), or None."""
    run_dir = None if run_dir is None else Path(run_dir).resolve()
    for job in jobs:
        if job.active and (job.name == name or run_dir is not None and job.run_dir is not None
                           and Path(job.run_dir).resolve() == run_dir):
            return job
    return None


def train_command(train_py, recipe, overrides=(), launcher: str = "default", num_processes: int = 1,
                  configs_dir=None, port: int | None = None) -> tuple[list[str], dict]:
    """`accelerate launch [--config_file configs/accelerate/L.yaml] --num_processes N train.py --config R k=v...` and
    the environment variables it needs on a CPU-only machine (none beside a GPU)."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
    if int(num_processes) < 1:
        raise ValueError(f"processes must be >= 1, got {num_processes}")
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if launcher != "default":
        cmd += ["--config_file", str(Path(configs_dir) / "accelerate" / f"{launcher}.yaml")]
    elif int(num_processes) > 1:
        cmd += ["--multi_gpu"]
    cmd += ["--num_processes", str(int(num_processes))]
    if int(num_processes) > 1:
        cmd += ["--main_process_port", str(port or free_port())]
    cmd += [str(train_py), "--config", str(recipe), *overrides]
    import torch

    env = {} if torch.cuda.is_available() or int(num_processes) == 1 else dict(CPU_SWITCH[launcher])
    return cmd, env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JobQueue:
    """Jobs run one after another, in a background thread, in the order submitted."""

    def __init__(self, cwd=None):
        self.cwd = cwd
        self.jobs: list[Job] = []
        self._cond = threading.Condition()
        self._proc: subprocess.Popen | None = None
        self._thread = threading.Thread(target=self._work, name="cogpipe-ui-jobs", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Job:
        with self._cond:
            job.log.parent.mkdir(parents=True, exist_ok=True)
            job.log.write_text("")
            job.save()
            self.jobs.append(job)
            self._cond.notify_all()
        return job

    def start(self, job: Job) -> str:
        """Submit `job`; what the page says about it: started, or queued behind the job that runs."""
        with self._cond:
            waiting = any(j.active for j in self.jobs)
        self.submit(job)
        return f"{job.name}: {'queued behind the running job' if waiting else 'started'} ({job.log})"

    def current(self) -> Job | None:
        with self._cond:
            return next((j for j in self.jobs if j.state == "running"), None)

    def queued(self) -> list[Job]:
        with self._cond:
            return [j for j in self.jobs if j.state == "queued"]

    def find(self, run_dir) -> Job | None:
        """The newest job of the training run in `run_dir`."""
        run_dir = Path(run_dir).resolve()
        with self._cond:
            return next((j for j in reversed(self.jobs) if j.run_dir is not None and j.run_dir.resolve() == run_dir),
                        None)

    def stop(self, job: Job) -> str:
        """A queued job leaves the queue; a running one gets SIGTERM in its training processes (a checkpoint, then
        exit). Returns what was done."""
        with self._cond:
            job.stop_requested = True
            if job.state == "queued":
                job.state, job.returncode, job.ended = "interrupted", -signal.SIGTERM, time.time()
                job.save()
                self._cond.notify_all()
                return f"{job.name}: removed from the queue"
            if job.state != "running" or job.pid is None:
                return f"{job.name}: not running ({job.state})"
            job.save()
            return f"{job.name}: {terminate_workers(job.pid)}"

    def wait(self, job: Job, timeout: float | None = None) -> str:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while job.state in ("queued", "running"):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(left)
            return job.state

    def _work(self) -> None:
        while True:
            with self._cond:
                while not any(j.state == "queued" for j in self.jobs):
                    self._cond.wait()
                job = next(j for j in self.jobs if j.state == "queued")
                job.state, job.started = "running", time.time()
                log = open(job.log, "ab")
                try:
                    proc = subprocess.Popen(job.command, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1", **job.env})
                except OSError as e:
                    log.write(f"could not start {job.command[0]}: {e}\n".encode())
                    log.close()
                    job.state, job.returncode, job.ended = "failed", -1, time.time()
                    job.save()
                    self._cond.notify_all()
                    continue
                job.pid = proc.pid
                job.save()
            returncode = proc.wait()
            log.close()
            with self._cond:
                job.returncode, job.ended = returncode, time.time()
                job.state = "finished" if returncode == 0 else "interrupted" if job.stop_requested else "failed"
                job.save()
                self._cond.notify_all()


def signal_workers(pid: int, signum: int, or_itself: bool = True) -> int:
    """`signum` to the processes `accelerate launch` (pid) started (the trainers), or, `or_itself`, to pid itself
    when it has none (yet, or an export); returns how many got it."""
    import psutil

    try:
        parent = psutil.Process(pid)
        children = parent.children()
    except psutil.NoSuchProcess:
        return 0
    targets = children or ([parent] if or_itself else [])
    for proc in targets:
        try:
            proc.send_signal(signum)
        except psutil.NoSuchProcess:
            pass
    return len(targets)


def terminate_workers(pid: int) -> str:
    """SIGTERM to the trainers of `accelerate launch` (pid): each saves a checkpoint, then exits."""
    n = signal_workers(pid, signal.SIGTERM)
    if not n:
        return "already ended"
    return f"SIGTERM sent to {n} process{'es' if n > 1 else ''} (a checkpoint, then exit)"
