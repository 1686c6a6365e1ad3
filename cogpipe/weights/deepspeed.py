"""DeepSpeed ZeRO-1/2/3 (and SAT) folders: the module weights, or the fp32 master weights consolidated from the
optimizer partitions -- what deepspeed/utils/zero_to_fp32.py does, reimplemented without deepspeed."""

from __future__ import annotations

import collections
import math
import re
from pathlib import Path
from typing import Mapping

from .errors import CheckpointError
from .lazy import LazyCat, LazyTensor
from .unpickle import read_pickle


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def open_deepspeed(tag_dir: Path, master_weights: bool) -> dict:
    """{name: tensor} of a DeepSpeed/SAT tag folder: the fp32 master weights consolidated from the
    *_optim_states.pt files when there are any and they are asked for (or the module is partitioned), else the
    module weights as saved."""
    model_files = sorted(map(str, tag_dir.glob("*_model_states.pt")), key=_natural)
    optim_files = sorted(map(str, tag_dir.glob("*_optim_states.pt")), key=_natural)
    states = [read_pickle(f) for f in model_files]
    ms = states[0]
    if not isinstance(ms, Mapping) or "module" not in ms:
        raise CheckpointError(f"{model_files[0]}: not a DeepSpeed/SAT model states file (no 'module')")
    module = dict(ms["module"] or {})
    shapes = _param_shapes(ms)
    complete = bool(module) and all(
        k in module and _numel(module[k]) == math.prod(s) for k, s in shapes.items())
    if optim_files and (master_weights or not complete):
        return _zero_consolidate(tag_dir, states, model_files, optim_files)
    if not complete and shapes:
        raise CheckpointError(f"{model_files[0]}: module weights are partitioned (ZeRO-3) and there are no "
                              f"*_optim_states.pt files in {tag_dir} to consolidate them from")
    return module


def _numel(t) -> int:
    return t.numel if isinstance(t, (LazyTensor, LazyCat)) else t.numel()


def _param_shapes(ms) -> dict[str, tuple]:
    out = {}
    for group in ms.get("param_shapes") or []:
        out.update({k: tuple(v) for k, v in group.items()})
    return out


def _flat_slices(flats: list[LazyTensor], start: int, length: int) -> list[LazyTensor]:
    """Pieces of the virtual concatenation of 1-D `flats` covering [start, start + length)."""
    pieces, base = [], 0
    for t in flats:
        n = t.numel
        lo, hi = max(start, base), min(start + length, base + n)
        if lo < hi:
            pieces.append(t.narrow0(lo - base, hi - lo))
        base += n
    return pieces


def _zero_consolidate(tag_dir, states, model_files, optim_files) -> dict:
    ms = states[0]
    optim = []
    for f in optim_files:
        o = read_pickle(f)
        if not isinstance(o, Mapping) or "optimizer_state_dict" not in o:
            raise CheckpointError(f"{f}: not a DeepSpeed optimizer states file")
        optim.append(o["optimizer_state_dict"])
    osd = optim[0]
    # the bf16 optimizer (ZeRO-1/2) writes no zero_stage; ZeroStageEnum loads as an inert record with int()
    stage = int(osd["zero_stage"]) if "zero_stage" in osd else (3 if "fp32_flat_groups" in osd else 2)
    world = osd.get("partition_count", len(optim))
    world = max(world) if isinstance(world, (list, tuple)) else int(world)
    if world != len(optim):
        raise CheckpointError(f"{tag_dir}: ZeRO partition_count is {world} but there are {len(optim)} "
                              f"*_optim_states.pt files (a rank's file is missing or stale)")
    out = collections.OrderedDict()
    buffers = set(ms.get("buffer_names") or [])
    out.update({k: v for k, v in (ms["module"] or {}).items() if k in buffers})
    frozen = ms.get("frozen_param_shapes") or {}
    for name, shape in frozen.items():
        if stage <= 2:  # frozen parameters are saved whole
            out[name] = ms["frozen_param_fragments"][name]
        else:  # one flat fragment per rank
            frags = tuple(_as_flat(s["frozen_param_fragments"][name]) for s in states)
            out[name] = LazyCat(frags, tuple(shape))
    groups = ms.get("param_shapes") or []
    if stage <= 2:
        key = "single_partition_of_fp32_groups"
        paddings = osd.get("param_alignment_paddings")
        for g, shapes in enumerate(groups):
            flats = [_as_flat(o[key][g]) for o in optim]
            offset, avail = 0, sum(t.numel for t in flats)
            for j, (name, shape) in enumerate(shapes.items()):
                n = math.prod(shape)
                out[name] = LazyCat(tuple(_flat_slices(flats, offset, n)), tuple(shape))
                offset += n + (paddings[g][j] if paddings else 0)
            align = 2 * world
            if align * math.ceil(offset / align) != align * math.ceil(avail / align):
                raise CheckpointError(f"{tag_dir}: ZeRO-2 group {g}: parameters use {offset} elements but the "
                                      f"partitions hold {avail}; the checkpoint is inconsistent")
    elif stage == 3:
        per_rank = [[_as_flat(t) for t in o["fp32_flat_groups"]] for o in optim]
        offset = 0
        for shapes in groups:
            for name, shape in shapes.items():
                n = math.prod(shape)
                part = math.ceil(n / world)
                pieces = tuple(p for r in range(world) for p in _flat_slices(per_rank[r], offset, part))
                out[name] = LazyCat(pieces, tuple(shape))
                offset += part
        avail = sum(t.numel for t in per_rank[0])
        if offset != avail:
            raise CheckpointError(f"{tag_dir}: ZeRO-3 parameters use {offset} elements per rank, partitions hold "
                                  f"{avail}; the checkpoint is inconsistent")
    else:
        raise CheckpointError(f"{optim_files[0]}: unknown ZeRO stage {stage}")
    for a, b in (ms.get("shared_params") or {}).items():
        if b in out:
            out[a] = out[b]
    return dict(out)


def _as_flat(t) -> LazyTensor:
    if not isinstance(t, LazyTensor) or len(t.shape) != 1 or not t.is_contiguous():
        raise CheckpointError(f"DeepSpeed partition is not a flat 1-D tensor: {t!r}")
    return t
