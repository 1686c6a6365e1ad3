"""What the benchmarks share: writing their JSON, the quantile that stands for a loop's undisturbed speed on a
shared machine, and the synthetic clips they train on. Imported by the scripts beside it (run as
`python bench/<name>.py`, which puts this folder on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional


def write_json(path: Path, result: dict) -> None:
    """`result` indented into `path` (its folder made if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def emit(result: dict, out: Optional[Path] = None) -> dict:
    """Print `result` as one JSON line and, given `out`, also write it there indented."""
    print(json.dumps(result))
    if out:
        write_json(out, result)
    return result


def at_quantile(values: Iterable[float], q: float) -> float:
    """The value at quantile q of `values` (the lower one; q = 0.1 of times: what a loop takes when undisturbed,
    since a shared machine's slowdowns only ever add time)."""
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]


def world_clips(root: Path, n: int, frames: int = 17, size: int = 64) -> Path:
    """n clips of the synthetic world (shapes, colours and directions in turn) in the txt layout; returns root."""
    from cogpipe.world.render import COLOURS, DIRECTIONS, SHAPES

    from helpers import make_clips  # tests/helpers.py: the benches put tests/ on sys.path

    specs = [(SHAPES[i % 3], COLOURS[i % 4], DIRECTIONS[(i // 3) % 4]) for i in range(n)]
    return make_clips(root, specs, frames=frames, size=size, layout="txt")
