"""Open any checkpoint safely, verify it, and explain why it does not fit a model.

    load_state_dict(path, *, sha256=None, device="cpu", dtype=None, master_weights=True) -> {name: Tensor}
    open_state_dict(path, *, sha256=None, master_weights=True) -> {name: LazyTensor | Tensor}   (nothing read yet)
    load_into(model, state_dict_or_path, *, strict=True, init_i2v=False, ...) -> LoadResult
    expand_patch_embed_for_i2v(state_dict, in_channels=None) -> state_dict
    verify_sha256(path, digest=None)

`path` may be a .safetensors file, a .pt/.pth/.bin file, a sharded Diffusers/transformers folder (index json),
a folder with one weights file, a SAT checkpoint folder (`latest` + `<iter>/mp_rank_00_model_states.pt`) or a
DeepSpeed ZeRO-1/2/3 folder (`latest` + `<tag>/*_model_states.pt` + `*_optim_states.pt`), whose fp32 master
weights are consolidated here (what DeepSpeed's zero_to_fp32.py does) without DeepSpeed installed.

Pickles are read by a restricted unpickler over the torch zip file, never by `pickle.load`: tensors become
`LazyTensor`s (file, byte offset, dtype, shape) that read only their own bytes; the usual plain types, torch
sizes/dtypes and OrderedDict are rebuilt; classes that checkpoints carry as metadata (numpy RNG state,
DeepSpeed config/enums/loss scaler, argparse.Namespace, omegaconf) become inert records: never imported, never
called. Every other global (os.system, eval, subprocess, ...) is refused with an error naming the file.
Files in the legacy (non-zip) torch format go through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import codecs
import collections
import hashlib
import json
import math
import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = [
    "CheckpointError", "UnsafeCheckpointError", "CorruptCheckpointError", "ChecksumError", "WeightsMismatchError",
    "LazyTensor", "LoadResult", "open_state_dict", "load_state_dict", "read_pickle", "read_safetensors",
    "safetensors_metadata", "verify_sha256", "load_into", "diagnose", "expand_patch_embed_for_i2v",
]


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and the rule."""


class UnsafeCheckpointError(CheckpointError):
    """The pickle names code to run (a global outside the allowlist); nothing of it was executed."""


class CorruptCheckpointError(CheckpointError):
    """Truncated or malformed file."""


class ChecksumError(CheckpointError):
    """sha256 of the file differs from the expected digest."""


class WeightsMismatchError(CheckpointError):
    """Weights do not fit the model; the message names each key, both shapes, the likely cause and the fix."""


# ----------------------------------------------------------------------------------------------------------------
# Lazy tensors: where the bytes are, read on demand.

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_DTYPE_NAMES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}

# torch.save names a storage by its legacy class; the class is never touched, only its name.
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}
STORAGE_NAMES = {v: k for k, v in _STORAGE_DTYPES.items() if k != "UntypedStorage"}


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


# ----------------------------------------------------------------------------------------------------------------
# torch zip pickles, read by a restricted unpickler


class Inert:
    """Stands in for a class a checkpoint names as metadata. cogpipe never imports or calls the real one."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.items = args, kwargs, None, []
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def append(self, x):
        self.items.append(x)

    def extend(self, xs):
        self.items.extend(xs)

    def __setitem__(self, k, v):
        self.items.append((k, v))

    def __int__(self):  # enum members such as DeepSpeed's ZeroStageEnum(2)
        if len(self.args) == 1 and isinstance(self.args[0], int):
            return self.args[0]
        raise TypeError(f"{self.qualname} record has no integer value")

    __index__ = __int__

    def __repr__(self):
        return f"<inert {self.qualname}{self.args!r}>"


# Top-level modules whose classes checkpoints carry as metadata; they load as inert records.
INERT_MODULES = ("numpy", "deepspeed", "argparse", "omegaconf", "sat", "pytorch_lightning", "lightning_fabric")
_inert_classes: dict[tuple[str, str], type] = {}


def _inert(module: str, name: str) -> type:
    key = (module, name)
    if key not in _inert_classes:
        _inert_classes[key] = type(name, (Inert,), {"qualname": f"{module}.{name}"})
    return _inert_classes[key]


class _StorageType:
    def __init__(self, dtype):
        self.dtype = dtype


@dataclass
class _Storage:
    key: str
    dtype: torch.dtype
    numel: int


def _encode_bytes(s: str, encoding: str = "latin1") -> bytes:
    if encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise UnsafeCheckpointError(f"refused _codecs.encode with codec {encoding!r}")
    return codecs.encode(s, encoding)


_TENSOR_TYPES = {("torch", "Tensor"), ("torch.nn.parameter", "Parameter"), ("torch.nn.parameter", "Buffer")}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str, records: dict[str, tuple[int, int]]):
        super().__init__(file, encoding="utf-8")
        self.path, self.records = path, records
        self.safe = {
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_tensor"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): lambda data, *a: data,
            ("torch._utils", "_rebuild_parameter_with_state"): lambda data, *a: data,
            ("torch._tensor", "_rebuild_from_type_v2"): self._rebuild_from_type,
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch", "Size"): torch.Size,
            ("torch", "device"): torch.device,
            ("_codecs", "encode"): _encode_bytes,  # how protocol 2 stores bytes
            ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "slice"): slice,
            ("builtins", "complex"): complex, ("builtins", "bytearray"): bytearray,
        }

    def find_class(self, module, name):
        if (module, name) in self.safe:
            return self.safe[(module, name)]
        if (module, name) in _TENSOR_TYPES:
            return (module, name)  # only meaningful as the type argument of _rebuild_from_type_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.split(".")[0] in INERT_MODULES:
            return _inert(module, name)
        raise UnsafeCheckpointError(
            f"{self.path}: refused to load: the pickle names the global {module}.{name}, which would run code. "
            f"cogpipe loads checkpoints like torch.load(weights_only=True) and never executes code from them; "
            f"re-save the weights as a plain state dict or safetensors from a trusted environment.")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise CorruptCheckpointError(f"{self.path}: unsupported persistent id {pid!r}")
        _, stype, key, _location, numel = pid
        return _Storage(str(key), stype.dtype, int(numel))

    def _rebuild_tensor(self, storage, storage_offset, size, stride, *args):
        if not isinstance(storage, _Storage):
            raise CorruptCheckpointError(f"{self.path}: tensor without storage")
        if storage.key not in self.records:
            raise CorruptCheckpointError(f"{self.path}: storage record data/{storage.key} is missing")
        offset, nbytes = self.records[storage.key]
        t = LazyTensor(self.path, offset, storage.dtype, tuple(size), tuple(stride), int(storage_offset))
        if min((*t.shape, *t.stride, t.elem_offset), default=0) < 0 or \
                (t.elem_offset + t._span()) * t.dtype.itemsize > nbytes:
            raise CorruptCheckpointError(
                f"{self.path}: tensor of shape {t.shape} reaches past its storage record data/{storage.key}")
        return t

    def _rebuild_from_type(self, func, new_type, args, state):
        if new_type not in _TENSOR_TYPES:
            raise UnsafeCheckpointError(f"{self.path}: refused tensor subclass {new_type!r}")
        return func(*args)


def _zip_records(path: str, zf: zipfile.ZipFile, prefix: str) -> dict[str, tuple[int, int]]:
    """{storage key: (byte offset of its data in the file, size)}; every storage must be stored uncompressed."""
    records, size = {}, os.path.getsize(path)
    with open(path, "rb") as f:
        for info in zf.infolist():
            if not info.filename.startswith(prefix + "data/"):
                continue
            if info.compress_type != zipfile.ZIP_STORED:
                raise CorruptCheckpointError(f"{path}: {info.filename} is compressed; torch never writes that")
            f.seek(info.header_offset)
            local = f.read(30)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise CorruptCheckpointError(f"{path}: corrupt zip entry {info.filename}")
            n, e = struct.unpack("<HH", local[26:30])
            start = info.header_offset + 30 + n + e
            if start + info.file_size > size:
                raise CorruptCheckpointError(f"{path}: truncated: {info.filename} ends past the end of the file")
            records[info.filename[len(prefix) + 5:]] = (start, info.file_size)
    return records


def read_pickle(path) -> Any:
    """Unpickle a torch checkpoint with the restricted unpickler; tensors come back as LazyTensor."""
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":
        return _legacy_torch_load(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CorruptCheckpointError(f"{path}: corrupt or truncated torch checkpoint ({e})") from None
    with zf:
        pkl = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise CorruptCheckpointError(f"{path}: zip file without a torch data.pkl record")
        prefix = pkl[0][: -len("data.pkl")]
        if prefix + "byteorder" in zf.namelist() and zf.read(prefix + "byteorder") != b"little":
            raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
        records = _zip_records(path, zf, prefix)
        try:
            data = zf.read(pkl[0])
        except (zipfile.BadZipFile, OSError) as e:
            raise CorruptCheckpointError(f"{path}: corrupt data.pkl ({e})") from None
    import io

    try:
        return _RestrictedUnpickler(io.BytesIO(data), path, records).load()
    except CheckpointError:
        raise
    except Exception as e:  # malformed pickle stream
        raise CorruptCheckpointError(f"{path}: corrupt pickle ({type(e).__name__}: {e})") from None


_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # torch's pre-zip format


def _legacy_torch_load(path: str):
    with open(path, "rb") as f:
        if f.read(len(_LEGACY_MAGIC)) != _LEGACY_MAGIC:
            raise CorruptCheckpointError(f"{path}: not a torch checkpoint (neither zip nor legacy format) or corrupt")
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    allow = [np.dtype, np.ndarray, core.multiarray._reconstruct, core.multiarray.scalar,
             *(getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType"))]
    try:
        with torch.serialization.safe_globals(allow):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Unsupported global" in msg or "GLOBAL" in msg:
            raise UnsafeCheckpointError(f"{path}: refused to load: torch.load(weights_only=True) rejects a global "
                                        f"that would run code ({msg.split(chr(10))[1] if chr(10) in msg else msg})"
                                        ) from None
        raise CorruptCheckpointError(f"{path}: corrupt or truncated checkpoint ({msg.splitlines()[0]})") from None
    except (EOFError, RuntimeError, ValueError, struct.error) as e:
        raise CorruptCheckpointError(f"{path}: corrupt or truncated checkpoint ({e})") from None


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


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


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
        return _open_deepspeed(tag_dir, master_weights)
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


# DeepSpeed ZeRO layout (what deepspeed/utils/zero_to_fp32.py reads), reimplemented without deepspeed.


def _open_deepspeed(tag_dir: Path, master_weights: bool) -> dict:
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


# ----------------------------------------------------------------------------------------------------------------
# Fitting weights to a model: diagnosis, I2V initialisation, loading

_SIZE_NAMES = {1920: "CogVideoX-2B", 3072: "CogVideoX-5B"}


def _patch_in_channels(shape) -> int:
    return shape[1] if len(shape) == 4 else shape[1] // 8  # 1.5: Linear over (C, patch_t=2, 2, 2)


def diagnose(key: str, file_shape, model_shape) -> str:
    """One message for a shape mismatch: key, both shapes, the likely cause and the fix."""
    fs, mshape = tuple(file_shape), tuple(model_shape)
    head = f"{key}: the file has shape {fs}, the model expects {mshape}."
    version = {4: "CogVideoX 1.0 (Conv2d patch embedding, patch_size_t=None)",
               2: "CogVideoX1.5 (Linear patch embedding, patch_size_t=2)"}
    if key.endswith("patch_embed.proj.weight"):
        if len(fs) != len(mshape):
            return (f"{head} Likely cause: 1.0 vs 1.5 patch embedding: the file is {version.get(len(fs), fs)}, "
                    f"the model is {version.get(len(mshape), mshape)}. Fix: build the model with the config of the "
                    f"checkpoint's version (its config.json, or patch_size_t={'2' if len(fs) == 2 else 'None'}).")
        fc, mc = _patch_in_channels(fs), _patch_in_channels(mshape)
        if fs[0] == mshape[0] and fc == 2 * mc:
            return (f"{head} Likely cause: image-to-video weights (in_channels={fc}: noisy + image latents) "
                    f"loaded into a text-to-video model (in_channels={mc}). Fix: build an I2V model "
                    f"(in_channels={fc}, e.g. the -I2V preset) or use text-to-video weights.")
        if fs[0] == mshape[0] and mc == 2 * fc:
            return (f"{head} Likely cause: text-to-video weights (in_channels={fc}) loaded into an image-to-video "
                    f"model (in_channels={mc}). Fix: to start I2V fine-tuning from T2V weights, initialise the "
                    f"image-latent channels at zero with cogpipe.weights.expand_patch_embed_for_i2v(state_dict) "
                    f"or load_into(model, ..., init_i2v=True).")
    if key.endswith("pos_embedding"):
        return (f"{head} Likely cause: the learned positional embedding covers {fs[1] if len(fs) > 1 else fs} "
                f"positions, the model {mshape[1] if len(mshape) > 1 else mshape}: sample_height/sample_width/"
                f"sample_frames or max_text_seq_length differ (CogVideoX-5B-I2V: 60x90x49, 226 text tokens). "
                f"Fix: use the checkpoint's config.json values.")
    for a, b in zip(fs, mshape):
        if a != b and (a in _SIZE_NAMES or b in _SIZE_NAMES):
            return (f"{head} Likely cause: wrong model size: the file has hidden {a} ({_SIZE_NAMES.get(a, 'custom')}),"
                    f" the model {b} ({_SIZE_NAMES.get(b, 'custom')}). Fix: build the model from the checkpoint's "
                    f"config.json or the matching preset.")
    if key.endswith(("proj_out.weight", "proj_out.bias")):
        return (f"{head} Likely cause: out_channels or patch_size_t differ (1.5 predicts 2 frames per patch). "
                f"Fix: use the checkpoint's config.json.")
    return (f"{head} Likely cause: wrong model size or variant for this checkpoint. Fix: build the model from "
            f"the checkpoint's config.json (or the matching preset) instead of a hand-written config.")


def _diagnose_keys(missing: list[str], unexpected: list[str]) -> list[str]:
    notes = []
    if any(k.startswith(("model.diffusion_model.", "transformer.layers.", "mixins.")) for k in unexpected):
        notes.append("the file holds SAT keys (model.diffusion_model.*, transformer.layers.*): convert it first "
                     "with `cogpipe convert SRC DST`")
    if any(".lora_A." in k or ".lora_B." in k or "matrix_A" in k for k in unexpected):
        notes.append("the file holds LoRA weights: load them with pipe.load_lora_weights(...) / "
                     "cogpipe.lora, not as model weights")
    for pre in ("module.", "transformer.", "model.", "base_model.model.", "_orig_mod."):
        if unexpected and missing and all(k.startswith(pre) for k in unexpected) and \
                any(k[len(pre):] in set(missing) for k in unexpected):
            notes.append(f"every key carries the prefix {pre!r}: strip it (it comes from a wrapper such as "
                         f"DDP, a pipeline or torch.compile)")
            break
    if "patch_embed.pos_embedding" in missing:
        notes.append("patch_embed.pos_embedding is missing: only CogVideoX-5B-I2V has learned positional "
                     "embeddings; when starting I2V from T2V weights build the model with "
                     "use_learned_positional_embeddings=False")
    if any(k.startswith("ofs_embedding.") for k in missing):
        notes.append("ofs_embedding is missing: only CogVideoX1.5-I2V has it; set ofs_embed_dim=None for other "
                     "checkpoints")
    return notes


def expand_patch_embed_for_i2v(state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None) -> dict:
    """Initialise a text-to-video state dict for image-to-video fine-tuning.

    The patch embedding gets `in_channels` input channels (default: twice the file's): the first channels keep
    their weights, the image-latent channels start at zero, so the model's output is unchanged until training
    moves them. Works on Diffusers and SAT key names, CogVideoX 1.0 (Conv2d) and 1.5 (Linear over C x 2 x 2 x 2).
    """
    out = dict(state_dict)
    keys = [k for k in out if k.endswith("patch_embed.proj.weight")]
    if not keys:
        raise CheckpointError("expand_patch_embed_for_i2v: no '*patch_embed.proj.weight' in the state dict")
    for k in keys:
        w = out[k]
        c = _patch_in_channels(tuple(w.shape))
        target = in_channels or 2 * c
        if target == c:
            continue
        if target < c:
            raise CheckpointError(f"{k}: has {c} input channels, cannot shrink to {target}")
        if w.dim() == 4:  # [H, C, p, p]
            new = w.new_zeros(w.shape[0], target, *w.shape[2:])
            new[:, :c] = w
        else:  # [H, C * 8], channel-major
            per = w.shape[1] // c
            new = w.new_zeros(w.shape[0], target * per)
            new[:, : c * per] = w
        out[k] = new
    return out


@dataclass
class LoadResult:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def load_into(model: torch.nn.Module, source, *, strict: bool = True, init_i2v: bool = False,
              sha256: str | bool | None = None, assign: bool = False) -> LoadResult:
    """Load `source` (a state dict or any path load_state_dict reads) into `model`.

    Before anything is copied every shape is checked; mismatches raise WeightsMismatchError with one diagnosis
    per key (see `diagnose`). strict: missing or unexpected keys also raise, with hints. init_i2v: expand a
    text-to-video patch embedding to the model's input channels first (see expand_patch_embed_for_i2v).
    """
    name = source if isinstance(source, (str, os.PathLike)) else "state dict"
    sd = dict(source) if isinstance(source, Mapping) else load_state_dict(source, sha256=sha256)
    expected = model.state_dict()
    if init_i2v:
        k = next((k for k in expected if k.endswith("patch_embed.proj.weight")), None)
        if k is None or k not in sd:
            raise WeightsMismatchError(f"{name}: init_i2v needs patch_embed.proj.weight in model and file")
        sd = expand_patch_embed_for_i2v(sd, _patch_in_channels(tuple(expected[k].shape)))
    problems = [diagnose(k, v.shape, expected[k].shape) for k, v in sd.items()
                if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if problems or (strict and (missing or unexpected)):
        lines = [f"{name} does not fit {type(model).__name__}:"] + problems
        if strict and missing:
            lines.append(f"missing keys ({len(missing)}): {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if strict and unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
        lines += [f"hint: {n}" for n in _diagnose_keys(missing, unexpected)]
        raise WeightsMismatchError("\n".join(lines))
    model.load_state_dict(sd, strict=strict, assign=assign)
    return LoadResult(missing, unexpected)
