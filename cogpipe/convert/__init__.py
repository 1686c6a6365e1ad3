"""SAT <-> Diffusers conversion for the CogVideoX family: transformer, VAE, LoRA, whole pipelines; and any
transformer <-> ComfyUI core's native single file (`to="comfyui"`).

    from cogpipe.convert import convert
    summary = convert("ckpt/sat", "out/", dtype=None, lora_mode="extract")   # direction and model detected
    print(summary)            # detected model, parameter count, dropped keys with reasons

Command line: `cogpipe convert SRC DST [...]` or `python -m cogpipe.convert SRC DST [...]`.
The key mapping is one table (mapping.py) from which both directions derive; detection rules are in detect.py,
the Diffusers classes' shapes in shapes.py, the file-to-file copy in fastcopy.py and torchzip.py.

The names below load on first use, so the command line can start reading the source before torch is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .core import Summary, convert
    from .detect import ConversionError, model_name, transformer_config, vae_config
    from .mapping import LORA, TRANSFORMER, VAE

_HOME = {"convert": "core", "Summary": "core", "ConversionError": "detect", "transformer_config": "detect",
         "vae_config": "detect", "model_name": "detect", "TRANSFORMER": "mapping", "VAE": "mapping", "LORA": "mapping"}

__all__ = ["convert", "Summary", "ConversionError", "transformer_config", "vae_config", "model_name",
           "TRANSFORMER", "VAE", "LORA"]


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
