"""Attention kernels for CogVideoX, pluggable: the one-process processor (`KernelAttnProcessor`, diffusers'
CogVideoXAttnProcessor2_0 with the kernel call swapped) and the sequence-parallel one
(cogpipe.sequence_parallel.UlyssesAttnProcessor) both call `processor.kernel(q, k, v)` on (B, heads, tokens, d)
tensors. diffusers' CogVideoX processor calls F.scaled_dot_product_attention directly, so its attention-backend
switch does not reach CogVideoX: this module is how `--attention` does.

    sdpa   torch's scaled_dot_product_attention (the fused kernel torch picks: flash, memory-efficient or math)
    sage   SageAttention (`pip install sageattention`, NVIDIA GPUs): INT8 QK^T and FP8/FP16 PV, about 2x SDPA
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

KERNELS = ("sdpa", "sage")


class Kernel:
    """A kernel by name, counting its calls (the run's report: attention evaluations done)."""

    def __init__(self, name: str = "sdpa"):
        problem = kernel_problem(name)
        if problem:
            raise ValueError(problem)
        self.name = name
        self.calls = 0
        self._fn = None

    def __call__(self, q, k, v):
        self.calls += 1
        if self.name == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
        if self._fn is None:
            from sageattention import sageattn

            self._fn = sageattn
        return self._fn(q, k, v, tensor_layout="HND", is_causal=False)


def kernel_problem(name: str, device: torch.device | None = None) -> str | None:
    """Why kernel `name` cannot run here (None: it can): checked before any weights load."""
    if name not in KERNELS:
        return f"--attention must be one of {', '.join(KERNELS)}, got {name!r}"
    if name == "sage":
        if importlib.util.find_spec("sageattention") is None:
            return ("--attention sage needs SageAttention, which is not installed: pip install sageattention "
                    "(NVIDIA GPUs; see docs/inference.md), or use --attention sdpa")
        if device is not None and torch.device(device).type != "cuda":
            return f"--attention sage runs on NVIDIA GPUs only; this run is on {torch.device(device).type}: " \
                   f"use --attention sdpa"
    return None


def _processor_base():
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

    return CogVideoXAttnProcessor2_0


class KernelAttnProcessor(_processor_base()):
    """diffusers' CogVideoXAttnProcessor2_0 (joint text + video attention, qk-norm, rotary on the video tokens),
    the same operations in the same order, with `self.kernel` for the attention itself."""

    def __init__(self, kernel: Kernel | None = None):
        super().__init__()
        self.kernel = kernel or Kernel("sdpa")

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            raise ValueError("cogpipe's CogVideoX attention takes no attention_mask (CogVideoX passes none)")
        text_seq_length = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query[:, :, text_seq_length:] = apply_rotary_emb(query[:, :, text_seq_length:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_seq_length:] = apply_rotary_emb(key[:, :, text_seq_length:], image_rotary_emb)
        hidden_states = self.kernel(query, key, value)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1)
        return hidden_states, encoder_hidden_states


def attention_modules(transformer) -> list:
    """Every CogVideoX block's attention module."""
    from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

    return [m.attn1 for m in transformer.modules() if isinstance(m, CogVideoXBlock)]


def set_kernel(transformer, kernel: Kernel) -> None:
    """Route every attention of `transformer` through `kernel`: the sequence-parallel processor where
    cogpipe.sequence_parallel.enable installed one, cogpipe's KernelAttnProcessor elsewhere."""
    for attn in attention_modules(transformer):
        processor = attn.processor
        if hasattr(processor, "kernel"):
            processor.kernel = kernel
        else:
            attn.set_processor(KernelAttnProcessor(kernel))
