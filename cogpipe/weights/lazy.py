"""Lazy tensors (where the bytes are, read on demand) and the safetensors reader built on them."""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import torch

from .errors import CorruptCheckpointError

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_DTYPE_NAMES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= n
    return tuple(reversed(stride))


@dataclass(frozen=True)
class LazyTensor:
    """A tensor stored in `path`: element (elem_offset + sum(i*stride)) of a storage starting at byte `offset`."""

    path: str
    offset: int  # byte offset of the storage in the file
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    elem_offset: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def is_contiguous(self) -> bool:
        return self.numel <= 1 or self.stride == _contiguous_stride(self.shape)

    def _span(self) -> int:  # elements between the first and one past the last element read
        if self.numel == 0:
            return 0
        return 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride))

    def load(self, into: torch.Tensor | None = None) -> torch.Tensor:
        """Read exactly this tensor's bytes into a fresh CPU tensor, or into the start of `into` (a uint8 buffer
        reused across calls: the result is a view of it, valid until the buffer is read into again)."""
        isz = self.dtype.itemsize
        n = self._span() * isz
        buf = into[:n] if into is not None and into.numel() >= n else torch.empty(n, dtype=torch.uint8)
        start = self.offset + self.elem_offset * isz
        _pread_into(self.path, start, buf)
        flat = buf.view(self.dtype) if buf.numel() else torch.empty(0, dtype=self.dtype)
        if self.is_contiguous():
            return flat.view(self.shape) if self.numel else torch.empty(self.shape, dtype=self.dtype)
        return flat.as_strided(self.shape, self.stride).contiguous()

    def narrow0(self, start: int, length: int) -> "LazyTensor":
        """Rows [start, start+length) along dim 0 (a contiguous byte range when the tensor is contiguous)."""
        if not self.shape or not self.is_contiguous():
            raise ValueError(f"narrow0 needs a contiguous tensor with a first dim ({self.path})")
        row = math.prod(self.shape[1:])
        shape = (length, *self.shape[1:])
        return LazyTensor(self.path, self.offset, self.dtype, shape, _contiguous_stride(shape),
                          self.elem_offset + start * row)


def _pread_into(path: str, offset: int, buf: torch.Tensor) -> None:
    n = buf.numel()
    if n == 0:
        return
    view = memoryview(buf.numpy()).cast("B")
    fd = os.open(path, os.O_RDONLY)
    try:
        got = 0
        while got < n:
            k = os.preadv(fd, [view[got:]], offset + got)
            if k <= 0:
                raise CorruptCheckpointError(
                    f"{path}: truncated: needed {n} bytes at offset {offset}, file ends after {got}")
            got += k
    finally:
        os.close(fd)


def materialize(t, device="cpu", dtype=None) -> torch.Tensor:
    """A tensor from a LazyTensor/LazyCat (or anything with .load()), or the tensor itself."""
    out = t if isinstance(t, torch.Tensor) else t.load()
    if dtype is not None and out.is_floating_point():
        out = out.to(dtype)
    return out.to(device) if str(device) != "cpu" else out


@dataclass(frozen=True)
class LazyCat:
    """Concatenation of 1-D lazy pieces, cut to `shape` (a DeepSpeed parameter spread over ranks)."""

    pieces: tuple[LazyTensor, ...]
    shape: tuple[int, ...]

    @property
    def dtype(self):
        return self.pieces[0].dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def load(self) -> torch.Tensor:
        flat = torch.cat([p.load() for p in self.pieces]) if self.pieces else torch.empty(0)
        return flat[: self.numel].view(self.shape).clone()


# ----------------------------------------------------------------------------------------------------------------
# safetensors (own header parser: validates offsets, reads lazily with plain file reads)


def read_safetensors(path) -> tuple[dict[str, LazyTensor], dict[str, str]]:
    """Returns ({name: LazyTensor}, metadata). Raises CorruptCheckpointError naming the file when malformed."""
    path = str(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptCheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CorruptCheckpointError(f"{path}: truncated or corrupt: header of {n} bytes, file has {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptCheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    meta = header.pop("__metadata__", None) or {}
    out, end_max, start = {}, 0, 8 + n
    for name, info in header.items():
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CorruptCheckpointError(f"{path}: corrupt safetensors entry {name!r}: {info}") from None
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise CorruptCheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape}")
        end_max = max(end_max, end)
        out[name] = LazyTensor(path, start + begin, dtype, shape, _contiguous_stride(shape))
    if start + end_max > size:
        raise CorruptCheckpointError(
            f"{path}: truncated: tensors need {start + end_max} bytes, the file has {size}")
    return out, meta


def safetensors_metadata(path) -> dict[str, str]:
    return read_safetensors(path)[1]
