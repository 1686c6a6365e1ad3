"""Moving bytes from file to file at the speed of copying (docs/design.md, "SAT checkpoints").

Most converted tensors are byte ranges of the source file: a SAT tensor is one record of a torch zip stored
uncompressed, a Diffusers tensor a range of a safetensors file, and every mapping rule is a cut or a reordering
of rows. `Sink.copy` moves such ranges into the output inside the kernel (os.copy_file_range, else os.sendfile,
else through one reused buffer where the OS or file system supports neither). `Readahead` asks the kernel to read
the source ahead of the copy, from the moment the command starts, so reading overlaps the interpreter's imports.

Import-light on purpose (no torch): the command line starts the read-ahead before anything heavy is imported.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

# errors after which the next, more portable method is tried (nothing was copied by the failed call)
_UNSUPPORTED = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOTSOCK,
                errno.EBADF, errno.ETXTBSY, errno.EPERM}
_METHODS = ("copy_file_range", "sendfile", "read")
BUFFER = 8 << 20


@dataclass(frozen=True)
class Span:
    """`nbytes` bytes of file `path` from byte `offset`."""

    path: str
    offset: int
    nbytes: int


def _truncated(span: Span, at: int):
    """A source file ends before the byte range the plan reads (it changed since it was opened)."""
    from ..weights.errors import CorruptCheckpointError  # torch is imported by then; this module stays light

    return CorruptCheckpointError(f"{span.path}: truncated: needed {span.nbytes} bytes at offset {span.offset}, "
                                  f"the file ends at {at}")


def _method_available(name: str) -> bool:
    return name == "read" or hasattr(os, name)


class Sink:
    """An output file written front to back from memory (`write`) and from byte ranges of other files (`copy`).

    `methods` is the preference order; a method the OS refuses for these files is dropped for the rest of the
    sink's life (each fallback is recorded in `fallbacks`)."""

    def __init__(self, path, methods: tuple[str, ...] = _METHODS):
        self.path = str(path)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.pos = 0
        self.methods = [m for m in methods if _method_available(m)] or ["read"]
        self.fallbacks: list[str] = []
        self.copied = {m: 0 for m in _METHODS}
        self._sources: dict[str, int] = {}
        self._buf: bytearray | None = None

    def __enter__(self) -> "Sink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._sources.values():
            os.close(fd)
        self._sources.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        _write_all(self.fd, view)
        self.pos += view.nbytes

    def pwrite(self, data: bytes, offset: int) -> None:
        """Overwrite bytes already written (a header field known only later)."""
        if os.pwrite(self.fd, data, offset) != len(data):
            raise OSError(errno.EIO, f"{self.path}: short write at {offset}")

    def _source(self, path: str) -> int:
        if path not in self._sources:
            self._sources[path] = os.open(path, os.O_RDONLY)
        return self._sources[path]

    def copy(self, spans: list[Span]) -> None:
        for span in spans:
            src, offset, left = self._source(span.path), span.offset, span.nbytes
            while left:
                method = self.methods[0]
                try:
                    n = self._copy_once(method, src, offset, left)
                except OSError as e:
                    if e.errno not in _UNSUPPORTED or len(self.methods) == 1:
                        raise
                    n, why = 0, os.strerror(e.errno)
                else:
                    why = "copied nothing"  # a file system that cannot; the buffer tells truncation apart
                if n == 0:
                    if len(self.methods) == 1:
                        raise _truncated(span, offset)
                    self.fallbacks.append(f"{method}: {why}")
                    self.methods.pop(0)
                    continue
                self.copied[method] += n
                offset, left, self.pos = offset + n, left - n, self.pos + n
                consumed(n)

    def _copy_once(self, method: str, src: int, offset: int, count: int) -> int:
        count = min(count, 1 << 30)
        if method == "copy_file_range":
            return os.copy_file_range(src, self.fd, count, offset)
        if method == "sendfile":
            return os.sendfile(self.fd, src, offset, count)
        if self._buf is None:
            self._buf = bytearray(BUFFER)
        view = memoryview(self._buf)[:min(count, BUFFER)]
        n = os.preadv(src, [view], offset)
        _write_all(self.fd, view[:n])
        return n


def _write_all(fd: int, view: memoryview) -> None:
    while view.nbytes:
        view = view[os.write(fd, view):]


def crc32_spans(spans: list[Span], value: int = 0) -> int:
    """CRC-32 of the concatenated byte ranges (zip's checksum), read through a memory map (no copy out of the page
    cache; zlib releases the GIL), else through one reused buffer."""
    for span in spans:
        fd = os.open(span.path, os.O_RDONLY)
        try:
            if os.fstat(fd).st_size < span.offset + span.nbytes:
                raise _truncated(span, os.fstat(fd).st_size)
            try:
                value = _crc32_mapped(fd, span, value)
            except (OSError, ValueError):  # a file that cannot be mapped
                value = _crc32_read(fd, span, value)
        finally:
            os.close(fd)
    return value


def _crc32_mapped(fd: int, span: Span, value: int) -> int:
    if not span.nbytes:
        return value
    start = span.offset - span.offset % mmap.ALLOCATIONGRANULARITY
    with mmap.mmap(fd, span.offset + span.nbytes - start, offset=start, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            for at in range(span.offset - start, len(mm), BUFFER):
                value = zlib.crc32(view[at:at + BUFFER], value)
        finally:
            view.release()
    return value


def _crc32_read(fd: int, span: Span, value: int) -> int:
    view = memoryview(bytearray(min(BUFFER, span.nbytes) or 1))
    offset, left = span.offset, span.nbytes
    while left:
        n = os.preadv(fd, [view[:min(left, len(view))]], offset)
        if n == 0:
            raise _truncated(span, offset)
        value = zlib.crc32(view[:n], value)
        offset, left = offset + n, left - n
    return value


# --- read-ahead -----------------------------------------------------------------------------------------------------


def weight_files(src) -> list[Path]:
    """The weight files a conversion of `src` reads, in the order it reads them (best effort, never raises)."""
    try:
        src = Path(src)
        if src.is_file():
            return [src]
        if not src.is_dir():
            return []
        if (src / "model_index.json").is_file() or (src / "transformer").is_dir() or (src / "vae").is_dir():
            return [f for part in ("transformer", "vae") for f in weight_files(src / part)]
        if (src / "latest").is_file():
            return sorted((src / (src / "latest").read_text().strip()).glob("*model_states.pt"))
        files = sorted(src.glob("*.safetensors"))
        return files or sorted(f for f in src.iterdir() if f.suffix in (".pt", ".pth", ".ckpt", ".bin"))
    except OSError:
        return []


class Readahead:
    """A thread that asks the kernel (posix_fadvise WILLNEED, in read-ahead-sized steps) to read `files` in order,
    at most `window` bytes ahead of what the conversion has consumed (`consumed`)."""

    STEP = 4 << 20  # larger WILLNEED requests are cut to the device's read-ahead size by Linux

    def __init__(self, files: list[Path], window: int):
        self.files, self.window = [str(f) for f in files], window
        self.issued = self.used = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="cogpipe-readahead", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for path in self.files:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                size, offset = os.fstat(fd).st_size, 0
                while offset < size and not self._stop.is_set():
                    if self.issued - self.used > self.window:
                        time.sleep(0.005)
                        continue
                    n = min(self.STEP, size - offset)
                    os.posix_fadvise(fd, offset, n, os.POSIX_FADV_WILLNEED)
                    offset += n
                    self.issued += n
            except OSError:
                pass
            finally:
                os.close(fd)
            if self._stop.is_set():
                return

    def stop(self) -> None:
        self._stop.set()
        self.thread.join()


_active: Readahead | None = None
DEFAULT_WINDOW = 2 << 30


def start(src) -> Readahead | None:
    """Start reading `src`'s weight files ahead (once per process; $COGPIPE_CONVERT_READAHEAD bytes ahead,
    default 2 GiB, 0 turns it off). Returns None where posix_fadvise does not exist or it is off or running."""
    global _active
    try:
        window = int(os.environ.get("COGPIPE_CONVERT_READAHEAD", DEFAULT_WINDOW))
    except ValueError:
        window = DEFAULT_WINDOW
    if _active is not None or window <= 0 or not hasattr(os, "posix_fadvise"):
        return None
    files = weight_files(src)
    _active = Readahead(files, window) if files else None
    return _active


def consumed(nbytes: int) -> None:
    """The conversion read `nbytes` more of its sources: the read-ahead may move on."""
    if _active is not None:
        _active.used += nbytes


def stop(handle: Readahead | None) -> None:
    """Stop the read-ahead that `start` returned (None: nothing to stop)."""
    global _active
    if handle is not None:
        handle.stop()
        if _active is handle:
            _active = None
