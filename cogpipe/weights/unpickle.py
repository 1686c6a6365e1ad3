"""torch zip pickles, read by a restricted unpickler: tensors become LazyTensors, metadata classes inert records,
every other global is refused. Legacy (non-zip) files go through torch.load(weights_only=True)."""

from __future__ import annotations

import codecs
import collections
import io
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from typing import Any

import torch

from .errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
from .lazy import LazyTensor

# torch.save names a storage by its legacy class; the class is never touched, only its name.
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}
STORAGE_NAMES = {v: k for k, v in _STORAGE_DTYPES.items() if k != "UntypedStorage"}


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
