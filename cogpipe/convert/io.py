"""Streaming output, written straight to safetensors shards or a torch zip.

An `Out` says how to build one output tensor from pieces of lazily-read source tensors (see mapping.Piece).
When those pieces are byte ranges of the source files in the output's dtype (`direct_spans`: every SAT <->
Diffusers rule without --dtype or a merged LoRA), the kernel copies them file to file (fastcopy.Sink.copy);
otherwise `Producer` builds the tensor in memory, one source tensor at a time. Writers lay out the header from
the planned shapes first, then fill it tensor by tensor, fsync, and the caller renames the finished folder into
place (`atomic_dir`, over cogpipe.atomic.folder).
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .. import atomic
from ..weights import SAFETENSORS_DTYPE_NAMES, STORAGE_NAMES, LazyTensor, materialize, read_safetensors
from . import fastcopy
from .detect import ConversionError
from .fastcopy import Sink, Span
from .torchzip import TorchZipWriter


@dataclass
class Out:
    """Output tensor `name` = concatenation along dim 0 of `pieces` (source, index, count), cast to `dtype`,
    plus sum(scale * B @ A) over `merge` (LoRA folded into the weight, computed in fp32)."""

    name: str
    pieces: list[tuple[Any, int, int]]
    dtype: torch.dtype
    merge: list[tuple[Any, Any, float]] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, ...]:
        src, _, count = self.pieces[0]
        if len(self.pieces) == 1 and count == 1:
            return tuple(src.shape)
        return (sum(s.shape[0] // c for s, _, c in self.pieces), *src.shape[1:])

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _runs(pieces):
    """Coalesce consecutive pieces of one source (index k, k+1, ...) into single reads."""
    run = None
    for src, idx, count in pieces:
        if run and run[0] is src and run[2] == count and run[1] + run[3] == idx:
            run[3] += 1
        else:
            if run:
                yield tuple(run)
            run = [src, idx, count, 1]
    if run:
        yield tuple(run)


def produce_parts(out: Out, load: Callable = materialize) -> list[torch.Tensor]:
    """The output tensor as consecutive row blocks (views where possible); `load(source)` gives a whole source.
    Writers that only need the bytes write the blocks one after the other instead of concatenating them."""
    parts = []
    for src, idx, count, n in _runs(out.pieces):
        full = load(src)
        if count == 1:
            parts.append(full)
            continue
        if full.shape[0] % count:
            raise ConversionError(f"{out.name}: cannot cut {tuple(full.shape)} into {count} parts along dim 0")
        rows = full.shape[0] // count
        parts.append(full[idx * rows:(idx + n) * rows])
    if out.merge:
        t = (parts[0] if len(parts) == 1 else torch.cat(parts)).float()
        for a, b, scale in out.merge:
            t += scale * (materialize(b).float() @ materialize(a).float())
        parts = [t]
    parts = [p.to(out.dtype) for p in parts]
    shape = tuple(parts[0].shape) if len(parts) == 1 else (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
    if shape != out.shape:
        raise ConversionError(f"{out.name}: produced shape {shape}, planned {out.shape}")
    return parts


class Producer:
    """Builds outputs one after the other, one source tensor in memory at a time (the path for outputs that
    `direct_spans` cannot copy: casts, merged LoRA, tensors made in memory).

    Outputs are planned in source order, so the outputs cut from one source (q, k, v from qkv; norm1 and norm2
    from the adaLN modulation) follow each other: the source is read once, into a buffer reused for the whole
    conversion (fresh allocations per tensor cost page faults: ~40% more system time on 5B). The blocks
    returned are only valid until the next call."""

    def __init__(self):
        self.scratch = torch.empty(0, dtype=torch.uint8)
        self.last = (None, None)

    def _load(self, src):
        if self.last[0] is not src:
            if isinstance(src, LazyTensor) and src.is_contiguous():
                if self.scratch.numel() < src.nbytes:
                    self.scratch = torch.empty(src.nbytes, dtype=torch.uint8)
                self.last = (src, src.load(into=self.scratch))
            else:
                self.last = (src, materialize(src))
            fastcopy.consumed(getattr(src, "nbytes", 0))
        return self.last[1]

    def __call__(self, out: Out) -> list[torch.Tensor]:
        single = len({id(src) for src, _, _ in out.pieces}) == 1
        return produce_parts(out, self._load if single else materialize)


def direct_spans(out: Out) -> list[Span] | None:
    """`out`'s bytes as byte ranges of its source files, when it is rows of contiguous on-disk tensors in their
    own dtype (no cast, no merge); else None. Adjacent ranges are merged (to_q, to_k, to_v back into qkv)."""
    if out.merge:
        return None
    spans: list[Span] = []
    for src, idx, count, n in _runs(out.pieces):
        if not isinstance(src, LazyTensor) or src.dtype != out.dtype or not src.is_contiguous() or \
                (count > 1 and (not src.shape or src.shape[0] % count)):
            return None
        part = src.nbytes // count
        start = src.offset + src.elem_offset * src.dtype.itemsize + idx * part
        if spans and spans[-1].path == src.path and spans[-1].offset + spans[-1].nbytes == start:
            spans[-1] = Span(src.path, spans[-1].offset, spans[-1].nbytes + n * part)
        elif n * part:
            spans.append(Span(src.path, start, n * part))
    if sum(s.nbytes for s in spans) != out.nbytes:
        return None  # the shapes do not add up: the tensor path says why
    return spans


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


# --- safetensors ------------------------------------------------------------------------------------------------


def parse_size(size) -> int:
    if isinstance(size, int):
        return size
    s = str(size).strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                       ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def write_safetensors(folder: Path, outs: list[Out], *, prefix: str, max_shard_size="5GB",
                      metadata: dict[str, str] | None = None) -> list[Path]:
    """Write `outs` as `<prefix>.safetensors`, or shards `<prefix>-0000i-of-0000n.safetensors` + index json."""
    limit = parse_size(max_shard_size)
    shards, size = [[]], 0
    for out in outs:
        if shards[-1] and size + out.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(out)
        size += out.nbytes
    n = len(shards)
    names = [f"{prefix}.safetensors"] if n == 1 else [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    produce = Producer()
    for name, shard in zip(names, shards):
        _write_shard(folder / name, shard, metadata, produce)
    for name in names:  # once at the end: an fsync per shard would stall reading while a shard drains
        atomic.fsync(folder / name)
    if n > 1:
        index = {"metadata": {"total_size": sum(o.nbytes for o in outs)},
                 "weight_map": {o.name: name for name, shard in zip(names, shards) for o in shard}}
        (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return [folder / name for name in names]


def _write_shard(path: Path, outs: list[Out], metadata: dict[str, str] | None, produce: Producer) -> None:
    header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
    for out in outs:
        header[out.name] = {"dtype": SAFETENSORS_DTYPE_NAMES[out.dtype], "shape": list(out.shape),
                            "data_offsets": [offset, offset + out.nbytes]}
        offset += out.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with Sink(path) as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for out in outs:
            spans = direct_spans(out)
            if spans is not None:
                f.copy(spans)
            else:
                for block in produce(out):
                    f.write(_bytes(block))


def write_safetensors_file(path: Path, outs: list[Out], metadata: dict[str, str] | None = None) -> Path:
    """Write `outs` as the one safetensors file `path` (a single-file checkpoint, unsharded), fsync'd."""
    _write_shard(Path(path), outs, metadata, Producer())
    atomic.fsync(path)
    return Path(path)


def check_written(files: list[Path], outs: list[Out]) -> None:
    """Re-read the headers just written: every planned tensor present with its shape and dtype, nothing else."""
    seen = {}
    for f in files:
        seen.update(read_safetensors(f)[0])
    planned = {o.name: (o.shape, o.dtype) for o in outs}
    bad = [k for k, (s, d) in planned.items() if k not in seen or (seen[k].shape, seen[k].dtype) != (s, d)]
    if bad or len(seen) != len(planned):
        raise ConversionError(f"{files[0].parent}: written files do not match the plan: {bad[:5]} "
                              f"({len(seen)} written, {len(planned)} planned)")


# --- torch zip (what SAT loads) -------------------------------------------------------------------------------------


class _StorageRef:
    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """Pickles exactly as torch.save pickles a contiguous tensor whose storage is record data/<key>."""

    def __init__(self, key: str, out: Out):
        self.storage = _StorageRef(key, out.dtype, math.prod(out.shape))
        self.shape = out.shape

    def __reduce__(self):
        stride = [math.prod(self.shape[i + 1:]) for i in range(len(self.shape))]
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, tuple(self.shape), tuple(stride), False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", getattr(torch, STORAGE_NAMES[obj.dtype]), obj.key, "cpu", obj.numel)
        return None


def write_torch(path: Path, outs: list[Out], wrap: Callable[[dict], Any]) -> None:
    """Write a torch.load-able zip whose object is wrap({name: tensor}), one tensor at a time: byte ranges of the
    sources copied by the kernel where possible (direct_spans), else built in memory."""
    import io

    refs = collections.OrderedDict((o.name, _TensorRef(str(k), o)) for k, o in enumerate(outs))
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(wrap(refs))
    produce = Producer()
    with TorchZipWriter(path) as z:
        z.begin(buf.getvalue())
        for k, out in enumerate(outs):
            spans = direct_spans(out)
            if spans is not None:
                z.add_spans(f"data/{k}", spans)
                continue
            parts = produce(out)
            t = parts[0] if len(parts) == 1 else torch.cat(parts)
            z.add(f"data/{k}", _bytes(t) if t.numel() else b"")
    atomic.fsync(path)


# --- atomic outputs ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_dir(dst: Path, overwrite: bool = False):
    """Yield a temporary sibling folder; on success it replaces `dst`, on error it is removed. A `dst` that is
    a file, or a non-empty folder unless `overwrite`, is refused before anything is written."""
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"{dst}: exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise ConversionError(f"{dst}: exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    with atomic.folder(dst, sync=True) as tmp:
        yield tmp
