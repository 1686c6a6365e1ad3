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

Modules: errors (the exceptions), lazy (LazyTensor, safetensors), unpickle (the restricted unpickler),
sources (files, sharded and SAT/DeepSpeed folders, sha256), deepspeed (ZeRO consolidation), diagnose
(mismatch diagnosis, I2V initialisation, load_into). Import the names from here.
"""

from __future__ import annotations

from .diagnose import LoadResult, diagnose, expand_patch_embed_for_i2v, load_into
from .errors import CheckpointError, ChecksumError, CorruptCheckpointError, UnsafeCheckpointError, WeightsMismatchError

# also importable from here, outside __all__: what convert/ and the tests reach for
from .lazy import SAFETENSORS_DTYPE_NAMES, LazyCat, LazyTensor, materialize, read_safetensors, safetensors_metadata  # noqa: F401, E402
from .sources import load_state_dict, open_state_dict, verify_sha256
from .unpickle import INERT_MODULES, STORAGE_NAMES, Inert, read_pickle  # noqa: F401, E402

__all__ = [
    "CheckpointError", "UnsafeCheckpointError", "CorruptCheckpointError", "ChecksumError", "WeightsMismatchError",
    "LazyTensor", "LoadResult", "open_state_dict", "load_state_dict", "read_pickle", "read_safetensors",
    "safetensors_metadata", "verify_sha256", "load_into", "diagnose", "expand_patch_embed_for_i2v",
]
