"""LoRA through peft: inject into the transformer, read the adapter back, save it in diffusers keys.

The saved file is what `CogVideoXPipeline.load_lora_weights` reads: keys
`transformer.transformer_blocks.N.attn1.to_q.lora_A.weight`, with the adapter config (rank, alpha,
target modules) in the safetensors metadata. The alpha/rank scale is baked into lora_B and the stored alpha
set to the rank, so every reader applies the trained strength: diffusers releases before 0.33 ignore the stored
alpha and apply alpha = rank (bench/results/diffusers_compat_cpu.json).
"""

from __future__ import annotations

from pathlib import Path

import torch

from cogpipe.family import LORA_FILE

ADAPTER = "default"


def peft_config(lora_cfg):
    from peft import LoraConfig

    return LoraConfig(r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                      init_lora_weights=True, target_modules=list(lora_cfg.target_modules))


def add_lora(transformer, lora_cfg) -> None:
    """Freeze the transformer and add a trainable LoRA adapter (parameters in fp32)."""
    transformer.requires_grad_(False)
    transformer.add_adapter(peft_config(lora_cfg), adapter_name=ADAPTER)
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def adapter_state_dict(trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's in-model names (`….lora_A.default.weight`) -> adapter names (`….lora_A.weight`)."""
    return {k.replace(f".{ADAPTER}.", "."): v for k, v in trainable.items() if ".lora_" in k}


def save_lora(directory, trainable: dict[str, torch.Tensor], lora_cfg) -> Path:
    from diffusers import CogVideoXPipeline

    directory = Path(directory)
    metadata = peft_config(lora_cfg).to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])
    metadata["lora_alpha"] = lora_cfg.rank  # the scale alpha/rank is in lora_B: 1 for any reader
    scale = lora_cfg.alpha / lora_cfg.rank
    layers = {k: v * scale if ".lora_B." in k else v for k, v in adapter_state_dict(trainable).items()}
    CogVideoXPipeline.save_lora_weights(directory, transformer_lora_layers=layers,
                                        transformer_lora_adapter_metadata=metadata, weight_name=LORA_FILE)
    return directory / LORA_FILE
