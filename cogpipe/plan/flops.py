"""FLOPs of the transformer's forward and of a training step (shared with bench/train_step.py)."""

from __future__ import annotations

from cogpipe import family

from .model import lora_targets, model_stats


def forward_flops(transformer_config: dict, shape: dict, lora_rank: int = 0, target_modules=()) -> dict:
    """Forward FLOPs of one step (all samples): 2*in*out per row of every Linear (and the patch conv),
    plus attention 4*S^2*H per layer (QK^T and PV). Elementwise ops are not counted."""
    B, S, Sv, St = shape["batch"], shape["tokens"], shape["video_tokens"], shape["text_tokens"]
    H = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    L = transformer_config["num_layers"]
    linear = 0
    for name, i, o in model_stats(transformer_config)["linears"]:
        if name.startswith("transformer_blocks."):
            rows = B if name.endswith("norm1.linear") or name.endswith("norm2.linear") else B * S
        elif name == "patch_embed.text_proj":
            rows = B * St
        elif name in ("patch_embed.proj", "proj_out"):
            rows = B * Sv
        else:  # time/ofs embeddings, norm_out.linear: once per sample
            rows = B
        linear += 2 * i * o * rows
    if family.version(transformer_config) == "1.0":  # 1.0: patch embedding is a Conv2d (stride = kernel = patch)
        p, c = transformer_config["patch_size"], transformer_config["in_channels"]
        linear += 2 * c * p * p * H * B * Sv
    attention = 4 * S * S * H * L * B
    lora = 0
    if lora_rank:
        for name, i, o in lora_targets(model_stats(transformer_config)["linears"], target_modules):
            rows = B if name.endswith(("norm1.linear", "norm2.linear")) else B * S
            lora += 2 * lora_rank * (i + o) * rows
    return dict(linear=linear, attention=attention, lora=lora, total=linear + attention + lora)


def train_flops(transformer_config: dict, shape: dict, mode: str, lora_rank: int = 0, target_modules=()) -> int:
    """Model FLOPs of one training step, without the recompute of gradient checkpointing.

    full: 3x forward (backward = input gradients + weight gradients, each as costly as the forward).
    lora: the frozen linears need only input gradients (1x), attention has no weights so its backward is
    2x its forward either way, and the LoRA matrices get both gradients (2x)."""
    f = forward_flops(transformer_config, shape, lora_rank if mode == "lora" else 0, target_modules)
    if mode == "full":
        return 3 * f["total"]
    return 2 * f["linear"] + 3 * f["attention"] + 3 * f["lora"]
