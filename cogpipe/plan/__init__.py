"""`cogpipe plan`: estimate a recipe's peak GPU memory and name the switches that make it fit.

    cogpipe plan --config configs/cogvideox_5b_lora.yaml --gpu-memory 24 [key=value ...] [--json]

Everything is computed from the transformer's config (built on the meta device: no weights, no GPU) and
the clip shape; `estimate(cfg)` returns the numbers as a dict. Memory is what
`torch.cuda.max_memory_allocated` counts (tensors), in GB = 1e9 bytes; the CUDA context and the
allocator's slack come on top (`fits` allows for them). The VAE and T5 are not counted: training encodes
every clip and prompt into the latent cache first and both leave the GPU before the transformer is built.

The activation model follows what autograd really keeps for a CogVideoXBlock (diffusers) under CUDA
autocast; the per-block formula is in `block_activations`, the phases of a step in `estimate`.
tests/test_plan.py checks the formula against the tensors autograd saves for real blocks and the whole
estimate against every tensor's bytes over two training steps (both with the CPU autocast policy, which
keeps LayerNorm in bf16), and against bench/results/ where GPU measurements exist.
The FLOP count (`forward_flops`, `train_flops`) is shared with bench/train_step.py.

Modules: model (the transformer config, counts, token shapes), flops, memory (activations and the estimate),
advice (fit advice), cli (the command). Import the names from here.
"""

from __future__ import annotations

from .advice import fit_advice, switch_on, with_changes  # noqa: F401 (switch_on: tests)
from .cli import add_arguments, load, run
from .flops import forward_flops, train_flops
from .memory import (
                     DEEPSPEED_BUCKETS,
                     RESERVE_FRACTION,
                     RESERVE_GB,
                     STRATEGIES,
                     block_activations,
                     estimate,
                     memory_switches,
                     needed_gb,
                     outside_activations,
                     precision_policy,
                     workspace,
)
from .model import GB, largest_shape, lora_targets, model_stats, resolve_model, resolve_transformer_config, token_shape

__all__ = [
    "GB", "RESERVE_GB", "RESERVE_FRACTION", "DEEPSPEED_BUCKETS", "STRATEGIES",
    "resolve_model", "resolve_transformer_config", "model_stats", "lora_targets", "token_shape", "largest_shape",
    "forward_flops", "train_flops", "precision_policy", "block_activations", "outside_activations", "workspace",
    "estimate", "needed_gb", "memory_switches", "fit_advice", "add_arguments", "load", "run",
]
