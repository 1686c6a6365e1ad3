"""A writer of torch's zip checkpoint format (what torch.load and SAT read), front to back, whose tensor records can
be byte ranges of other files moved by the kernel (fastcopy.Sink.copy) instead of tensors in memory.

The layout follows torch.save: records `<archive>/data.pkl`, `.format_version`, `.storage_alignment`,
`byteorder`, `data/<key>`..., `version`, `.data/serialization_id`, all stored (uncompressed) with their data
aligned to 64 bytes by padding in the local header's extra field, and zip64 end records. Each record's CRC-32 is
computed on a worker thread while the copy goes on, and written into its local header and the central directory
when the file is closed, so the result is a valid zip for any zip tool, not only for torch.
"""

from __future__ import annotations

import concurrent.futures
import secrets
import struct
import zlib
from pathlib import Path

from .fastcopy import Sink, Span, crc32_spans

ALIGN = 64  # torch's storage alignment
_LOCAL, _CENTRAL = 0x04034B50, 0x02014B50
_ZIP64_END, _ZIP64_LOCATOR, _END = 0x06064B50, 0x07064B50, 0x06054B50
_FLAGS = 0x0800  # names are UTF-8
_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01, the earliest zip date (torch writes none)
ZIP64_LIMIT = 0xFFFFFFFF  # sizes and offsets at or past this go to zip64 fields (tests lower it)


class TorchZipWriter:
    """`with TorchZipWriter(path) as z: z.begin(pickle); z.add("data/0", bytes); z.add_spans("data/1", spans)`.

    The archive folder inside the zip is the file name without its extension, as torch names it."""

    def __init__(self, path):
        self.path = Path(path)
        self.archive = self.path.name.rsplit(".", 1)[0] if "." in self.path.name else self.path.name
        self.sink = Sink(self.path)
        self.records: list[dict] = []  # name, offset (of the local header), size, crc (int or future)
        self._crc_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False

    def __enter__(self) -> "TorchZipWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _header(self, name: str, size: int) -> bytes:
        """Local header (CRC filled in on close) with zip64 sizes when needed and padding to align the data."""
        raw = f"{self.archive}/{name}".encode()
        zip64 = size >= ZIP64_LIMIT
        extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
        start = self.sink.pos + 30 + len(raw) + len(extra)
        pad = -(start + 4) % ALIGN
        extra += struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # "FB" padding field, as torch writes it
        return struct.pack("<IHHHHHIIIHH", _LOCAL, 45 if zip64 else 20, _FLAGS, 0, 0, _DOS_DATE, 0, _field(size),
                           _field(size), len(raw), len(extra)) + raw + extra

    def begin(self, pickle: bytes) -> None:
        """The records torch writes before the tensors: the pickle, the format version, alignment, byte order."""
        for name, data in (("data.pkl", pickle), (".format_version", b"1"), (".storage_alignment", str(ALIGN).encode()),
                           ("byteorder", b"little")):
            self.add(name, data)

    def _begin(self, name: str, size: int, crc) -> None:
        self.records.append({"name": name, "offset": self.sink.pos, "size": size, "crc": crc})
        self.sink.write(self._header(name, size))

    def add(self, name: str, data) -> None:
        """A record from memory (bytes, or anything exposing a contiguous buffer)."""
        view = memoryview(data).cast("B")
        self._begin(name, view.nbytes, zlib.crc32(view))
        self.sink.write(view)

    def add_spans(self, name: str, spans: list[Span]) -> None:
        """A record made of byte ranges of other files, copied by the kernel; its CRC-32 is read on a worker."""
        if self._crc_pool is None:
            self._crc_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cogpipe-crc32")
        self._begin(name, sum(s.nbytes for s in spans), self._crc_pool.submit(crc32_spans, list(spans)))
        self.sink.copy(spans)

    def close(self) -> None:
        """Write the records torch adds after the tensors, fill in the CRCs, write the central directory."""
        if self._closed:
            return
        try:
            self.add("version", b"3\n")
            self.add(".data/serialization_id", str(secrets.randbits(128)).zfill(40).encode())
            for r in self.records:
                if not isinstance(r["crc"], int):
                    r["crc"] = r["crc"].result()
                self.sink.pwrite(struct.pack("<I", r["crc"]), r["offset"] + 14)
            self._central_directory()
        finally:
            self._shutdown()

    def abort(self) -> None:
        if self._crc_pool is not None:
            self._crc_pool.shutdown(wait=True, cancel_futures=True)
        self._shutdown()

    def _shutdown(self) -> None:
        if self._crc_pool is not None:
            self._crc_pool.shutdown(wait=True)
        self.sink.close()
        self._closed = True

    def _central_directory(self) -> None:
        start = self.sink.pos
        for r in self.records:
            raw = f"{self.archive}/{r['name']}".encode()
            big = [v for v in (r["size"], r["size"], r["offset"]) if v >= ZIP64_LIMIT]
            extra = struct.pack(f"<HH{len(big)}Q", 1, 8 * len(big), *big) if big else b""
            size, offset = _field(r["size"]), _field(r["offset"])
            self.sink.write(struct.pack("<IHHHHHHIIIHHHHHII", _CENTRAL, 45 if big else 20, 45 if big else 20,
                                        _FLAGS, 0, 0, _DOS_DATE, r["crc"], size, size, len(raw), len(extra), 0, 0,
                                        0, 0, offset) + raw + extra)
        end, n = self.sink.pos, len(self.records)
        self.sink.write(struct.pack("<IQHHIIQQQQ", _ZIP64_END, 44, 45, 45, 0, 0, n, n, end - start, start))
        self.sink.write(struct.pack("<IIQI", _ZIP64_LOCATOR, 0, end, 1))
        self.sink.write(struct.pack("<IHHHHIIH", _END, 0, 0, _field(n, 0xFFFF), _field(n, 0xFFFF),
                                    _field(end - start), _field(start), 0))


def _field(value: int, marker: int = 0xFFFFFFFF) -> int:
    """A 4-byte (or 2-byte) zip field: the value, or the marker that sends readers to the zip64 field."""
    return value if value < min(ZIP64_LIMIT, marker) else marker
