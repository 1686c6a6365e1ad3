"""Streaming output: one tensor in memory at a time, written straight to safetensors shards or a torch zip.

An `Out` says how to build one output tensor from pieces of lazily-read source tensors (see mapping.Piece);
`produce_parts(out)` reads its sources. Writers lay out the header from the planned shapes first, then fill
it tensor by tensor, fsync, and the caller renames the finished folder into place (`atomic_dir`, over
cogpipe.atomic.folder).
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
from .detect import ConversionError


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


def _stream(outs: list[Out]):
    """Yield (out, row blocks) in order, one source tensor in memory at a time.

    Outputs are planned in source order, so the outputs cut from one source (q, k, v from qkv; norm1 and norm2
    from the adaLN modulation) follow each other: the source is read once, sequentially, into a buffer reused
    for the whole conversion (fresh allocations per tensor cost page faults: ~40% more system time on 5B).
    Each yielded block is only valid until the next output is requested."""
    scratch = torch.empty(0, dtype=torch.uint8)
    last = (None, None)

    def load(src):
        nonlocal scratch, last
        if last[0] is not src:
            if isinstance(src, LazyTensor) and src.is_contiguous():
                if scratch.numel() < src.nbytes:
                    scratch = torch.empty(src.nbytes, dtype=torch.uint8)
                last = (src, src.load(into=scratch))
            else:
                last = (src, materialize(src))
        return last[1]

    for out in outs:
        single = len({id(src) for src, _, _ in out.pieces}) == 1
        yield out, produce_parts(out, load if single else materialize)


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
    it = _stream(outs)
    for name, shard in zip(names, shards):
        header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
        for out in shard:
            header[out.name] = {"dtype": SAFETENSORS_DTYPE_NAMES[out.dtype], "shape": list(out.shape),
                                "data_offsets": [offset, offset + out.nbytes]}
            offset += out.nbytes
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        with open(folder / name, "wb") as f:
            f.write(struct.pack("<Q", len(head)) + head)
            for out in shard:
                for block in next(it)[1]:
                    f.write(_bytes(block))
    for name in names:  # once at the end: an fsync per shard would stall reading while a shard drains
        atomic.fsync(folder / name)
    if n > 1:
        index = {"metadata": {"total_size": sum(o.nbytes for o in outs)},
                 "weight_map": {o.name: name for name, shard in zip(names, shards) for o in shard}}
        (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return [folder / name for name in names]


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
    """Write a torch.load-able zip whose object is wrap({name: tensor}), streaming one tensor at a time."""
    import io

    refs = collections.OrderedDict((o.name, _TensorRef(str(k), o)) for k, o in enumerate(outs))
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(wrap(refs))
    writer = torch._C.PyTorchFileWriter(str(path))
    writer.write_record("data.pkl", buf.getvalue(), len(buf.getvalue()))
    writer.write_record("byteorder", b"little", 6)
    for k, (out, parts) in enumerate(_stream(outs)):
        t = parts[0] if len(parts) == 1 else torch.cat(parts)
        nbytes = t.numel() * t.element_size()
        if not t.is_contiguous() or t.storage_offset() or t.untyped_storage().nbytes() != nbytes:
            t = t.clone(memory_format=torch.contiguous_format)
        writer.write_record(f"data/{k}", t.untyped_storage() if nbytes else b"", nbytes)
    writer.write_end_of_file()
    del writer
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
