"""The one device and dtype policy: every model or pipeline cogpipe builds takes its place from here.

    training     the accelerator's device (one per process); the transformer in the recipe's dtypes
                 (model.weight_dtype for a frozen base, fp32 master weights for a full fine-tune, autocast
                 in train.mixed_precision); the cache encoders (VAE, T5) in bf16 on a GPU, fp32 on the CPU,
                 whatever the recipe trains in, so LoRA and full runs share one cache
    rendering    validation and the end-of-run render on the training device, in the dtype training computes in
    inference    --device, else CUDA, then MPS, then the CPU; --dtype, else bf16 on a GPU (fp16 where the
                 model card says so: CogVideoX-2B), fp16 on MPS, fp32 on the CPU

Nothing else picks a device or a dtype on its own.
"""

from __future__ import annotations

import torch

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def inference_device(requested: str | None = None) -> torch.device:
    """`requested` if given (e.g. "cuda:1", "cpu"), else the best available: CUDA, MPS, the CPU."""
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {requested}: CUDA is not available on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def process_device(device: torch.device) -> torch.device:
    """Under a launcher (LOCAL_RANK set) a CUDA device without an index is this process's own GPU."""
    import os

    if device.type == "cuda" and device.index is None and os.environ.get("LOCAL_RANK"):
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def inference_dtype(device: torch.device, requested: str | None = None, card_dtype: str | None = None) -> torch.dtype:
    """`requested` ("fp32" | "fp16" | "bf16") if given; else on CUDA the model card's (`card_dtype`, bf16 when the
    model has none), fp16 on MPS, fp32 on the CPU (half precision is slow or unsupported there)."""
    names = {v: k for k, v in DTYPE_NAMES.items()}
    if requested:
        if requested not in names:
            raise ValueError(f"--dtype must be one of {sorted(names)}, got {requested!r}")
        return names[requested]
    device = torch.device(device)
    if device.type == "cuda":
        return names[card_dtype or "bf16"]
    if device.type == "mps":
        return torch.float16
    return torch.float32


def encoder_dtype(device: torch.device) -> torch.dtype:
    """The cache encoders' (VAE, T5) dtype: bf16 on a GPU, fp32 on the CPU; the same for every recipe."""
    device = torch.device(device)
    return torch.bfloat16 if device.type == "cuda" else torch.float16 if device.type == "mps" else torch.float32


def compute_dtype(mixed_precision: str, weight_dtype: torch.dtype, mode: str) -> torch.dtype:
    """The dtype a training run computes in, which validation and the end-of-run render use: the autocast dtype
    under mixed precision, else the frozen base's dtype for a LoRA and fp32 for a full fine-tune."""
    if mixed_precision in ("bf16", "fp16"):
        return torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return weight_dtype if mode == "lora" else torch.float32


def loader_workers(device) -> int:
    """DataLoader workers that read cached latents ahead of a training step: 4 beside a GPU (the step must never
    wait for the disk), none on a CPU (the workers would take cores from the step)."""
    return 4 if torch.device(device).type == "cuda" else 0


def cpu_threads(requested: int = 0) -> int:
    """Threads for a training process on a CPU: `requested`, else COGPIPE_CPU_THREADS (set where several jobs share
    one machine, as the test suite's workers do), else the machine's cores shared among its processes (torchrun's
    LOCAL_WORLD_SIZE). `accelerate launch` sets OMP_NUM_THREADS=1 unless told otherwise, which would leave all
    cores but one idle, so that variable is not read here."""
    import os

    if requested:
        return requested
    shared = os.environ.get("COGPIPE_CPU_THREADS", "")
    if shared:
        if not shared.isdigit() or int(shared) < 1:
            raise ValueError(f"COGPIPE_CPU_THREADS: {shared!r} is not a thread count (a whole number >= 1)")
        return int(shared)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
