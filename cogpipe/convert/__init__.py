"""SAT <-> Diffusers conversion for the CogVideoX family: transformer, VAE, LoRA, whole pipelines.

    from cogpipe.convert import convert
    summary = convert("ckpt/sat", "out/", dtype=None, lora_mode="extract")   # direction and model detected
    print(summary)            # detected model, parameter count, dropped keys with reasons

Command line: `cogpipe convert SRC DST [...]` or `python -m cogpipe.convert SRC DST [...]`.
The key mapping is one table (mapping.py) from which both directions derive; detection rules are in detect.py.
"""

from .core import Summary, convert
from .detect import ConversionError, model_name, transformer_config, vae_config
from .mapping import LORA, TRANSFORMER, VAE

__all__ = ["convert", "Summary", "ConversionError", "transformer_config", "vae_config", "model_name",
           "TRANSFORMER", "VAE", "LORA"]
