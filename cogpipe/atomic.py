"""Atomic writes: a file or folder (config, checkpoint, `latest`, cache entry, export, converter output...) is
built under a temporary sibling name and renamed over its destination once complete, so a reader sees the old
content or the new one, never a partial one.

One temporary name for all of them, a hidden sibling that names its owner:

    .<name>.cogpipe-tmp-<host>-<pid>-<start>

<host> is the host name (with its PID namespace when the process runs in a container), <pid> and <start> the
owner's process id and start time (clock ticks since boot; 0 where unknown), so a reused pid is a different
owner. A process killed mid-write leaves such a temp behind; `sweep(root)` (run when a component starts)
removes every one under root whose owner is gone: same host and that process no longer running, or another
host and untouched for a day. A temp whose owner is alive is never removed: several ranks and several runs
may share a folder.

Fault injection for the tests: `failpoint(name)`; each write calls `failpoint("atomic-write:<name>")` after
its temp is complete and before the rename.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import glob
import json
import os
import re
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Iterator, NamedTuple

TAG = "cogpipe-tmp"
DAY = 24 * 3600.0
_NAME = re.compile(rf"^\.(?P<name>.+)\.{TAG}-(?P<host>.+)-(?P<pid>\d+)-(?P<start>\d+)$")


def failpoints_armed() -> bool:
    """Whether any failpoint is set: a hot loop checks this once rather than naming its points every step."""
    return bool(os.environ.get("COGPIPE_FAILPOINT"))


def failpoint(name: str) -> str | None:
    """Fault injection for the fault tests: COGPIPE_FAILPOINT=<name> sends SIGKILL to this process here,
    COGPIPE_FAILPOINT=<name>=TERM (or any other signal name) that signal, <name>=SLEEP<seconds> a delay (a slow
    process in a race), <name>=NAN returns "NAN" for the caller to poison a value. <name> may hold * wildcards;
    several points are separated by ';' (each that matches acts, in order)."""
    result = None
    for entry in os.environ.get("COGPIPE_FAILPOINT", "").split(";"):
        point, _, action = entry.partition("=")
        if not point or not fnmatch.fnmatchcase(name, point):
            continue
        if action == "NAN":
            result = action
        elif action.startswith("SLEEP"):
            time.sleep(float(action[5:]))
        else:
            os.kill(os.getpid(), getattr(signal, f"SIG{action or 'KILL'}"))
    return result


def _proc_start(pid: int | str) -> int | None:
    """Start time of a process in clock ticks since boot (Linux); None where there is no such process or /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state is field 3, starttime field 22
    return None if fields[0] == "Z" else int(fields[19])  # a zombie has finished


def _host() -> str:
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:64] or "localhost"
    try:
        ns = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]": the host's namespace or a container's
    except OSError:
        return host
    return host if ns == "pid:[4026531836]" else f"{host}.ns{ns[5:-1]}"


class Temp(NamedTuple):
    """What a temporary name says: the destination's name and its owner."""
    name: str
    host: str
    pid: int
    start: int


_OWNER: tuple[int, str, int] | None = None


def _owner() -> tuple[str, int, int]:
    global _OWNER
    if _OWNER is None or _OWNER[0] != os.getpid():  # a forked child is another owner
        _OWNER = (os.getpid(), _host(), _proc_start("self") or 0)
    return _OWNER[1], _OWNER[0], _OWNER[2]


def temp_path(dst) -> Path:
    """The temporary sibling of `dst` that this process writes: .<name>.cogpipe-tmp-<host>-<pid>-<start>."""
    dst = Path(dst)
    host, pid, start = _owner()
    return dst.with_name(f".{dst.name}.{TAG}-{host}-{pid}-{start}")


def parse(path) -> Temp | None:
    """The destination name and owner of a temporary name; None for any other name."""
    m = _NAME.match(Path(path).name)
    return Temp(m["name"], m["host"], int(m["pid"]), int(m["start"])) if m else None


def owner_alive(temp: Temp) -> bool | None:
    """Whether the owner of a temp still runs; None when that cannot be known here (another host)."""
    if temp.host != _owner()[0]:
        return None
    start = _proc_start(temp.pid)
    if start is not None:
        return temp.start in (0, start)
    if Path("/proc/self/stat").exists():
        return False
    try:
        os.kill(temp.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync(path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def publish(tmp, dst, *, sync: bool = False) -> Path:
    """Rename the complete temp `tmp` over `dst`. A folder replaces an existing `dst` by two renames (the old
    one moves aside under a temporary name, then is removed). sync: fsync the parent folder after."""
    tmp, dst = Path(tmp), Path(dst)
    failpoint(f"atomic-write:{dst.name}")
    if tmp.is_dir() and os.path.lexists(dst):
        old = temp_path(dst.with_name(dst.name + ".old"))
        _remove(old)
        os.replace(dst, old)
        try:
            os.replace(tmp, dst)
        except BaseException:
            os.replace(old, dst)
            raise
        _remove(old)
    else:
        os.replace(tmp, dst)
    if sync:
        fsync(dst.parent)
    return dst


class WriteFailed(OSError):
    """An atomic write failed (a full disk, say): the message names the destination, its folder and the cause; the
    partial temp is removed and the destination is as it was. `errno` is the cause's. Every write of this module
    raises it for a storage error (DISK_ERRORS: a full disk, a quota, a read-only or failing filesystem); any other
    error passes unchanged."""


def write_failed(e: OSError, what: str, dst: Path, kept: str) -> WriteFailed:
    """A WriteFailed for the OSError `e` while writing `what` (at `dst`); `kept`: what is still as it was."""
    full = " (the disk is full: free space there, or point the output elsewhere)" if e.errno == errno.ENOSPC else ""
    return WriteFailed(e.errno, f"writing {what} {dst} failed: {e.strerror or e} in {dst.parent}{full}; "
                                f"the partial write was removed and {kept}")


DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS)  # what a write's storage can raise


def disk_error(e: BaseException, folder) -> OSError | None:
    """The OSError behind a failed write into `folder`: `e` itself, or, for the libraries that hide it, one rebuilt:
    safetensors' SafetensorError ("... (os error 28)"), torch.save's RuntimeError from its zip writer ("unexpected
    pos ..."), which names no cause: ENOSPC when the folder's filesystem has (almost) no space left (under 1 MiB, looked
    at before the partial write is removed). None for any other error."""
    if isinstance(e, OSError):
        return e
    if not isinstance(e, Exception):
        return None
    m = re.search(r"os error (\d+)", str(e))
    if m:
        return OSError(int(m[1]), os.strerror(int(m[1])))
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    if st.f_bavail * st.f_frsize < 2 ** 20:
        return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({type(e).__name__}: {e})")
    return None


@contextlib.contextmanager
def _published(tmp: Path, dst: Path, sync: bool) -> Iterator[Path]:
    """Yield `tmp`; on success rename it over `dst` (fsync'd first with `sync`), on error remove it. An OSError
    becomes a WriteFailed naming the destination and its folder (once: nested writes keep the innermost)."""
    try:
        yield tmp
        if sync:
            fsync(tmp)
        publish(tmp, dst, sync=sync)
    except WriteFailed:
        _remove(tmp)
        raise
    except BaseException as e:
        cause, what = disk_error(e, dst.parent), "folder" if tmp.is_dir() else "file"
        _remove(tmp)
        if cause is None or cause.errno not in DISK_ERRORS:
            raise
        kept = f"{dst} is as it was before" if os.path.lexists(dst) else f"no {dst.name} was written"
        raise write_failed(cause, what, dst, kept) from e


def file(dst, *, sync: bool = False):
    """Context manager: the temporary path to write `dst`'s content to; on success it replaces `dst`, on error
    it is removed. sync: fsync the file before the rename and the folder after."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    return _published(temp_path(dst), dst, sync)


def folder(dst, *, sync: bool = False):
    """Context manager: a fresh temporary sibling folder; on success it replaces `dst` (whatever was there), on
    error it is removed. sync: fsync the folder's entries before the rename and its parent after."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dst)
    _remove(tmp)
    tmp.mkdir()
    return _published(tmp, dst, sync)


def write_bytes(path, data: bytes, *, sync: bool = False) -> Path:
    with file(path, sync=sync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path, text: str, *, sync: bool = False) -> Path:
    with file(path, sync=sync) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path, obj, *, indent: int | None = None, sync: bool = False) -> Path:
    return write_text(path, json.dumps(obj, indent=indent) + "\n", sync=sync)


def save_safetensors(path, tensors: dict, metadata: dict[str, str] | None = None, *, sync: bool = False) -> Path:
    """Save tensors (moved to the CPU, made contiguous) and string metadata as one safetensors file."""
    from safetensors.torch import save_file

    with file(path, sync=sync) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)


def temps(root, name: str | None = None) -> list[Path]:
    """Every temporary file or folder under `root` (recursively, not inside another temp), whoever owns it;
    with `name`, only the temps of `root/<name>`."""
    root = Path(root)
    if name is not None:
        return sorted(p for p in root.glob(f".{glob.escape(name)}.{TAG}-*") if (t := parse(p)) and t.name == name)
    found = []
    for folder_, dirs, files in os.walk(root):
        for entry in files + dirs:
            if parse(entry):
                found.append(Path(folder_) / entry)
        dirs[:] = [d for d in dirs if not parse(d)]
    return sorted(found)


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for folder_, dirs, files in os.walk(path):
            for entry in dirs + files:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(folder_, entry)).st_mtime)
    return newest


def sweep(root, name: str | None = None, max_age: float = DAY) -> list[Path]:
    """Remove the temps under `root` (or only those of `root/<name>`) whose owner is gone: on this host a
    process no longer running; on another host, a temp untouched for `max_age` seconds. Returns what was
    removed."""
    removed = []
    for path in temps(root, name):
        alive = owner_alive(parse(path))
        try:
            if alive is None:
                alive = time.time() - _newest_mtime(path) < max_age
        except FileNotFoundError:  # gone meanwhile (another sweep, or its owner finished)
            continue
        if not alive:
            _remove(path)
            removed.append(path)
    return removed
