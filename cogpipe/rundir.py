"""The output folder a run owns: a fresh start never lands on another run, and one run at a time writes there.

    claim(out, resume_from, overwrite, log)   on the main process, before anything is written: the lock, then
                                              the used-folder check (refused, or the old run moved aside)
    refusal(out, resume_from, overwrite)      the same checks without taking anything (the page, before launch)
    release(out)                              at the end of the run (also after an error)

A fresh start (no `train.resume_from`) into a folder that already holds anything a run writes (config.yaml,
checkpoints/, export/, lora/, validation/, metrics.jsonl, the trackers' folders, or anything else) is refused with
an `OutputDirInUse` naming the folder and the two ways on: `train.resume_from=latest` continues that run;
`train.overwrite=true` moves the whole old folder aside, as one rename, to the sibling `<name>.replaced-<time>`
(nothing is deleted; remove it when it is no longer needed), so two runs are never mixed in one folder. Not
counted as a run's: the lock, atomic-write temps (cogpipe.atomic), the page's job files (ui_job.json and the
log of the launch that is starting) and data.cache_dir when it lies inside the folder.

The lock is the file `<output_dir>/.cogpipe-run.lock`, created with a hard link (atomic: one of two racing launches
gets it) and holding the owner's host, pid, process start time and wall-clock start. A launch finding it refuses,
naming that holder. A lock whose holder is gone (this host, and no process with that pid and start time) is taken
over, with a line that says so; one held on another host cannot be judged from here: the refusal says which file to
delete once that run has ended. Only the main process of a launch holds the lock: the ranks of one launch are one
run, and they learn the main process's verdict before any of them writes (training.py broadcasts it).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Optional

from cogpipe import atomic
from cogpipe.config import ConfigError

LOCK = ".cogpipe-run.lock"
PAGE_FILES = ("ui_job.json", "ui_train.log")  # written by the page's launcher for the launch now starting


class OutputDirInUse(ConfigError):
    """output_dir holds another run, or a live run holds its lock."""


class RefusedByMainProcess(RuntimeError):
    """On the other ranks of a launch: the main process refused output_dir. Not a ConfigError, which only the first
    process prints: each rank says that it stopped, and why."""


def _holder(out: Path) -> Optional[dict]:
    try:
        return json.loads((out / LOCK).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: treated as held by an unknown owner


def _describe(h: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(h["started"])) if "started" in h else "?"
    return f"pid {h.get('pid', '?')} on host {h.get('host', '?')}, started {started}"


def holder_alive(h: dict) -> Optional[bool]:
    """Whether the lock's holder still runs: False when it is gone (this host), None when that cannot be known."""
    try:
        return atomic.owner_alive(atomic.Temp(LOCK, str(h["host"]), int(h["pid"]), int(h.get("start", 0))))
    except (KeyError, TypeError, ValueError):
        return None


def _mine(h: Optional[dict]) -> bool:
    """Whether a lock's holder is this very process."""
    return bool(h) and (h.get("host"), h.get("pid"), h.get("start")) == atomic._owner()


def _lock_problem(out: Path, h: Optional[dict]) -> Optional[str]:
    """Why a live (or unknowable) holder `h` of out's lock (as read by _holder) keeps this launch out, or None."""
    if h is None:
        return None
    alive = holder_alive(h)
    if alive is False or _mine(h):
        return None  # gone, or this very process (a run it started before has ended)
    if alive is None:
        return (f"output_dir {out}: locked by a run elsewhere ({_describe(h)}; {out / LOCK}) whose state cannot be "
                f"seen from this host. If that run has ended, delete {out / LOCK}; or choose another output_dir")
    return (f"output_dir {out}: a live run writes there ({_describe(h)}). Wait for it to end, stop it (SIGTERM "
            f"saves a checkpoint; then continue it with train.resume_from=latest), or choose another output_dir")


def _run_entries(out: Path, cache_dir=None) -> list[str]:
    """What in `out` belongs to a run (sorted names); [] for a missing or unused folder."""
    if not out.is_dir():
        return []
    cache = Path(cache_dir).expanduser().resolve() if cache_dir else None
    found = []
    for entry in out.iterdir():
        if entry.name in (LOCK, *PAGE_FILES) or atomic.parse(entry.name) or entry.resolve() == cache:
            continue
        found.append(entry.name + ("/" if entry.is_dir() else ""))
    return sorted(found)


def _used_problem(out: Path, entries: list[str]) -> str:
    shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
    return (f"output_dir {out}: holds another run ({shown}); a fresh start there would mix two runs. To continue "
            f"that run: train.resume_from=latest. To replace it: train.overwrite=true (the old folder is moved "
            f"aside whole, to {out.name}.replaced-<time> beside it, before anything is written; nothing is deleted). "
            f"Or choose another output_dir")


def refusal(out, resume_from=None, overwrite: bool = False, cache_dir=None) -> Optional[str]:
    """Why a launch into `out` would be refused now (a live holder; a used folder on a fresh start without
    train.overwrite), or None. Takes nothing: the page asks this before it launches."""
    out = Path(out).expanduser().resolve()
    problem = _lock_problem(out, _holder(out))
    if problem is None and resume_from is None and not overwrite and (entries := _run_entries(out, cache_dir)):
        problem = _used_problem(out, entries)
    return problem


def _link_lock(out: Path) -> bool:
    """Create the lock with this process as holder; False when a lock exists."""
    host, pid, start = atomic._owner()
    tmp = atomic.temp_path(out / LOCK)
    tmp.write_text(json.dumps({"host": host, "pid": pid, "start": start, "started": time.time()}) + "\n")
    try:
        os.link(tmp, out / LOCK)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def _take_lock(out: Path, log: Callable) -> None:
    for _ in range(3):
        if _link_lock(out):
            return
        h = _holder(out)
        problem = _lock_problem(out, h)
        if problem is not None:
            raise OutputDirInUse(problem)
        stale = out / f"{LOCK}.stale-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):  # one of several launches moves the stale lock away
            os.rename(out / LOCK, stale)
            moved = _holder_file(stale)
            if moved != h and holder_alive(moved or {}) is not False:  # another launch's fresh lock: put it back
                os.rename(stale, out / LOCK)
                continue
            stale.unlink()
            log(f"output_dir {out}: took over the lock left by a run that is gone ({_describe(h or {})})")
    raise OutputDirInUse(f"output_dir {out}: could not take {out / LOCK}: other launches keep taking it")


def _holder_file(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _aside(out: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = out.with_name(f"{out.name}.replaced-{stamp}"), 1
    while os.path.lexists(target):
        n += 1
        target = out.with_name(f"{out.name}.replaced-{stamp}-{n}")
    return target


def claim(out, resume_from=None, overwrite: bool = False, cache_dir=None, log: Callable = print) -> None:
    """Make `out` this run's (the main process, before anything is written): take the lock (OutputDirInUse naming
    a live holder), then on a fresh start into a used folder refuse (OutputDirInUse) or, with `overwrite`, move the
    old folder aside whole (one rename) and start in an empty one. Release with `release(out)`."""
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    _take_lock(out, log)
    try:
        entries = _run_entries(out, cache_dir) if resume_from is None else []
        if entries and not overwrite:
            raise OutputDirInUse(_used_problem(out, entries))
        if entries:
            aside = _aside(out)
            os.rename(out, aside)  # the old run, whole, in one step (the lock travels with it)
            out.mkdir()
            for name in PAGE_FILES:  # the page's files of this launch stay with it
                if (aside / name).exists():
                    os.rename(aside / name, out / name)
            if not _link_lock(out):
                raise OutputDirInUse(f"output_dir {out}: another launch took the folder while the old run moved aside")
            (aside / LOCK).unlink(missing_ok=True)
            log(f"train.overwrite: the run that was in {out} is now in {aside} (delete it when no longer needed)")
    except BaseException:
        release(out)
        raise


def release(out) -> None:
    """Remove the lock if this process holds it."""
    out = Path(out).expanduser().resolve()
    if _mine(_holder(out)):
        (out / LOCK).unlink(missing_ok=True)
