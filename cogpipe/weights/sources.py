"""What a checkpoint path stands for (a file, a sharded folder, a SAT or DeepSpeed folder), opened lazily,
and sha256 verification."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Mapping

import torch

from .deepspeed import open_deepspeed
from .errors import CheckpointError, ChecksumError, CorruptCheckpointError
from .lazy import LazyCat, LazyTensor, materialize, read_safetensors
from .unpickle import read_pickle


def _is_tensor(v) -> bool:
    return isinstance(v, (LazyTensor, LazyCat, torch.Tensor))


def _state_dict_in(obj, path) -> dict:
    """The state dict inside a checkpoint object: itself, or under 'module' / 'state_dict' / 'model'."""
    if isinstance(obj, Mapping):
        for k in ("module", "state_dict", "model"):
            if isinstance(obj.get(k), Mapping) and obj[k] and all(_is_tensor(v) for v in obj[k].values()):
                return dict(obj[k])
        tensors = {k: v for k, v in obj.items() if _is_tensor(v)}
        if tensors and len(tensors) == len(obj):
            return tensors
        if isinstance(obj.get("module"), Mapping) and not obj["module"]:
            return {}
    keys = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(f"{path}: no state dict found (top level: {keys})")


# ----------------------------------------------------------------------------------------------------------------
# Checksums


def verify_sha256(path, digest: str | None = None) -> str:
    """Check `path` against `digest`, or against the `<path>.sha256` file beside it. Returns the digest."""
    path = str(path)
    if digest is None:
        side = path + ".sha256"
        if not os.path.isfile(side):
            raise ChecksumError(f"{path}: no digest given and no {os.path.basename(side)} beside it")
        digest = Path(side).read_text().split()[0] if Path(side).read_text().split() else ""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    actual = h.hexdigest()
    if actual != digest.strip().lower():
        raise ChecksumError(f"{path}: sha256 mismatch: expected {digest.strip().lower()}, file has {actual}")
    return actual


# ----------------------------------------------------------------------------------------------------------------
# Folders: sharded, SAT, DeepSpeed


def _tag_dir(p: Path) -> Path:
    if (p / "latest").is_file():
        tag = (p / "latest").read_text().strip()
        if not (p / tag).is_dir():
            raise CheckpointError(f"{p / 'latest'} names {tag!r} but {p / tag} does not exist")
        return p / tag
    return p


def _files_of(path: Path) -> list[Path]:
    """The weight files a checkpoint path stands for (for sha256 checks and loading)."""
    if path.is_file():
        return [path]
    for index in sorted(path.glob("*.index.json")):
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CorruptCheckpointError(f"{index}: not a valid index json ({e})") from None
        return [path / f for f in dict.fromkeys(wm.values())]
    return []


def open_state_dict(path, *, sha256: str | bool | None = None, master_weights: bool = True) -> dict:
    """Name -> LazyTensor (or Tensor for consolidated DeepSpeed weights) without reading tensor data.

    sha256: a hex digest (single files), True to require and check a `<file>.sha256` beside every file read,
    or None to skip. master_weights: for DeepSpeed folders with ZeRO optimizer states, return the consolidated
    fp32 master weights (False: the module weights as saved, in the training dtype, when they are complete).
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")

    def check(f: Path):
        if sha256 is True:
            verify_sha256(f)
        elif isinstance(sha256, str):
            if not p.is_file():
                raise ChecksumError(f"{p}: a single digest can only verify a single file; use sha256=True "
                                    f"with a .sha256 file beside each file of the folder")
            verify_sha256(f, sha256)

    if p.is_file():
        check(p)
        return _open_file(p)
    shards = _files_of(p)
    if shards:
        out, index = {}, next(iter(sorted(p.glob("*.index.json"))))
        wm = json.loads(index.read_text())["weight_map"]
        for f in shards:
            if not f.is_file():
                raise CheckpointError(f"{index}: lists {f.name}, which is missing")
            check(f)
            out.update(_open_file(f))
        missing = [k for k in wm if k not in out]
        if missing:
            raise CorruptCheckpointError(f"{index}: keys listed but absent from their shard: {missing[:5]}")
        return out
    tag_dir = _tag_dir(p)
    if list(tag_dir.glob("*_model_states.pt")):
        for f in sorted(tag_dir.glob("*_states.pt")):
            check(f)
        return open_deepspeed(tag_dir, master_weights)
    singles = [f for f in sorted(p.iterdir()) if f.suffix in (".safetensors", ".pt", ".pth", ".bin", ".ckpt")]
    if len(singles) > 1 and sum(f.suffix == ".safetensors" for f in singles) == 1:
        singles = [f for f in singles if f.suffix == ".safetensors"]  # the same weights in two formats
    if len(singles) == 1:
        check(singles[0])
        return _open_file(singles[0])
    raise CheckpointError(f"{p}: no checkpoint found (expected a weights file, an index json, or a SAT/DeepSpeed "
                          f"folder with `latest`); found {[f.name for f in singles] or 'no weight files'}")


def _open_file(f: Path) -> dict:
    if f.suffix == ".safetensors":
        return read_safetensors(f)[0]
    return _state_dict_in(read_pickle(f), f)


def load_state_dict(path, *, sha256: str | bool | None = None, device="cpu", dtype: torch.dtype | None = None,
                    master_weights: bool = True) -> dict[str, torch.Tensor]:
    """Read a whole checkpoint (see open_state_dict) into tensors on `device` (floating ones cast to `dtype`)."""
    return {k: materialize(v, device, dtype) for k, v in open_state_dict(
        path, sha256=sha256, master_weights=master_weights).items()}
