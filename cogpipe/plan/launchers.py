"""Per launcher of configs/accelerate/ (DDP, ZeRO-2, ZeRO-3, FSDP2): a recipe's per-GPU peak and the host RAM one
machine needs, on N GPUs a machine.

Host RAM is what the processes of one machine hold in CPU memory at once, at the larger of two moments:
  caching    every process with clips or prompts left to encode loads the VAE (on the CPU, then moved to its
             GPU, bf16) and T5 straight onto its GPU one safetensors shard at a time (T5-XXL's shards: 5 GB); none
             once the cache is complete
  loading    every process that reads the pretrained transformer holds a copy in the dtype it is built in (a
             LoRA's frozen base in model.weight_dtype, a full fine-tune's fp32 master weights) before `prepare`
             moves it: all N under DDP and ZeRO-2 (and ZeRO-3 LoRA); the first only under FSDP2 with
             cpu_ram_efficient_loading (the others' storage stays untouched); under ZeRO-3 a full fine-tune is
             built partitioned (deepspeed.zero.Init) and filled one module at a time, so a machine holds one block
A random preset (no model.pretrained) is built where it runs and counts like a read.
"""

from __future__ import annotations

import functools
import json

from cogpipe import family

from .memory import estimate, needed_gb
from .model import GB, model_stats

LAUNCHERS = ("ddp", "zero2", "zero3", "fsdp")
_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@functools.lru_cache(maxsize=4)
def _text_encoder_params(t5_json: str) -> int:
    from accelerate import init_empty_weights
    from transformers import T5Config, T5EncoderModel

    with init_empty_weights():
        return sum(p.numel() for p in T5EncoderModel(T5Config(**json.loads(t5_json))).parameters())


T5_SHARD = 5e9  # the largest safetensors shard of T5-XXL in the released CogVideoX repositories


def encoder_host_bytes(cfg) -> float:
    """Host bytes one encoding process holds at once: the VAE in bf16 and one shard of T5 (the whole T5 in bf16
    where it is smaller than a shard: the tiny models)."""
    preset = cfg.model.preset if cfg.model.preset in family.VARIANTS else "5b"
    t5 = _text_encoder_params(json.dumps(dict(family.variant(preset).text_encoder), sort_keys=True)) * 2
    vae = (215_583_907 if family.variant(preset).released else 2_000_000) * 2  # the full CogVideoX VAE
    return vae + min(t5, T5_SHARD)


def host_ram_gb(cfg, transformer_config: dict, launcher: str, gpus: int) -> dict:
    """{"caching", "loading", "peak"}: GB of host RAM one machine with `gpus` processes needs (see the module)."""
    stats = model_stats(transformer_config)
    lora = cfg.train.mode == "lora"
    build_bytes = _BYTES[cfg.model.weight_dtype] if lora else 4
    model = stats["params"] * build_bytes
    if launcher == "fsdp":
        loading = model  # the first process reads; the others receive shards
    elif launcher == "zero3" and not lora and cfg.model.pretrained:
        loading = stats["block_params"] * build_bytes  # partitioned as built, filled one module at a time
    else:
        loading = gpus * model
    caching = gpus * encoder_host_bytes(cfg)
    return dict(caching=caching / GB, loading=loading / GB, peak=max(caching, loading) / GB)


def per_launcher(cfg, transformer_config: dict, gpus: int = 8) -> dict:
    """{launcher: {"gpu_peak_gb", "gpu_needs_gb", "host_ram_gb": {...}}} for `gpus` GPUs on one machine."""
    out = {}
    for launcher in LAUNCHERS:
        e = estimate(cfg, strategy="ddp" if launcher == "ddp" else launcher, num_gpus=gpus,
                     transformer_config=transformer_config)
        peak = e["gb"]["peak"]
        out[launcher] = dict(gpu_peak_gb=peak, gpu_needs_gb=needed_gb(peak),
                             host_ram_gb=host_ram_gb(cfg, transformer_config, launcher, gpus))
    return out


def format_table(launchers: dict, gpus: int) -> str:
    lines = [f"per launcher on {gpus} GPUs (configs/accelerate/<launcher>.yaml; host RAM per machine: the larger "
             f"of caching and loading)",
             f"  {'launcher':9s} {'GPU needs':>10s} {'host RAM':>9s} {'caching':>8s} {'loading':>8s}  GB"]
    for name, row in launchers.items():
        h = row["host_ram_gb"]
        lines.append(f"  {name:9s} {row['gpu_needs_gb']:10.1f} {h['peak']:9.1f} {h['caching']:8.1f} "
                     f"{h['loading']:8.1f}")
    return "\n".join(lines)
