"""load_pipeline(): any checkpoint (cogpipe.model_sources) -> a CogVideoX pipeline on the device and in the dtype of
cogpipe.devices, with LoRAs of any key format (cogpipe.lora_formats), the scheduler, VAE slicing/tiling, CPU
offload and weight quantization. infer.py, `cogpipe score` and the end-of-run validation render all load here."""

from __future__ import annotations

import torch

from cogpipe import devices, family, lora_formats, model_sources
from cogpipe.models import pipeline_class
from cogpipe.paths import repo_path

SCHEDULERS = ("auto", "keep", "ddim", "dpm")
OFFLOADS = ("none", "model", "sequential")
QUANTIZE = ("none", "int8", "fp8")
DEFAULT_MODEL = "models/tiny-world"  # the shipped tiny model (pretrained on the synthetic world)
FP8_CAPABILITY = (8, 9)  # float8 matmuls: Ada (8.9), Hopper (9.0) and newer


def shipped_model():
    model = repo_path(DEFAULT_MODEL, "--model (a Diffusers pipeline folder or hub id)")
    if not (model / "model_index.json").is_file():
        raise FileNotFoundError(f"{model}: the shipped tiny model is incomplete (a partial checkout?); pass "
                                f"--model, or rebuild it with `cogpipe world pretrain --ship {model}`")
    return model


def set_scheduler(pipe, choice: str, transformer_config: dict) -> str:
    """Install the sampler: "ddim" (CogVideoXDDIMScheduler), "dpm" (CogVideoXDPMScheduler, the official demo's),
    "keep" (what the folder has) or "auto": DPM for a released model, as its card runs it; the folder's own for
    any other (the tiny models were scored and shown with it). Both keep the folder's schedule (betas, SNR shift)
    with trailing timesteps. Returns the name in use."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

    if choice not in SCHEDULERS:
        raise ValueError(f"--scheduler must be one of {SCHEDULERS}, got {choice!r}")
    if choice == "auto":
        choice = "dpm" if family.released_variant(transformer_config) else "keep"
    if choice != "keep":
        cls = CogVideoXDPMScheduler if choice == "dpm" else CogVideoXDDIMScheduler
        pipe.scheduler = cls.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    return {"CogVideoXDPMScheduler": "dpm", "CogVideoXDDIMScheduler": "ddim"}.get(type(pipe.scheduler).__name__,
                                                                                 type(pipe.scheduler).__name__)


def quantize(pipe, kind: str, device: torch.device, log=print) -> None:
    """Weight-only quantization of the transformer and the T5 encoder through torchao (the `quantize` extra):
    int8 anywhere torchao runs, fp8 (e4m3) on NVIDIA GPUs of compute capability 8.9 or newer. A LoRA must be fused
    first (load_pipeline does)."""
    if kind == "fp8":
        if device.type != "cuda":
            raise ValueError(f"--quantize fp8 needs an NVIDIA GPU of compute capability {FP8_CAPABILITY[0]}."
                             f"{FP8_CAPABILITY[1]} or newer (Ada, Hopper); this run is on {device.type}: use "
                             f"--quantize int8")
        capability = torch.cuda.get_device_capability(device)
        if capability < FP8_CAPABILITY:
            raise ValueError(f"--quantize fp8 needs compute capability {FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]} or "
                             f"newer (Ada, Hopper); {torch.cuda.get_device_name(device)} has "
                             f"{capability[0]}.{capability[1]}: use --quantize int8")
    try:
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise RuntimeError("--quantize needs torchao, the `quantize` extra: pip install 'cogpipe[quantize]' "
                           "(or pip install torchao)") from None
    config = Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig()
    for name in ("transformer", "text_encoder"):
        module = getattr(pipe, name, None)
        if module is not None:
            quantize_(module, config)
    log(f"quantized the transformer and text encoder weights to {kind} (torchao)")


def offload(pipe, mode: str, device: torch.device, log=print):
    """Place the pipeline: all on `device` ("none"), or kept in CPU memory and moved to the accelerator a model
    ("model": enable_model_cpu_offload) or a layer ("sequential": enable_sequential_cpu_offload) at a time. On a
    CPU-only run there is nothing to offload to: the weights already sit in main memory, so it is said and skipped."""
    if mode not in OFFLOADS:
        raise ValueError(f"--offload must be one of {OFFLOADS}, got {mode!r}")
    if mode == "none":
        return pipe.to(device)
    if device.type == "cpu":
        log(f"--offload {mode}: offloading moves weights between CPU memory and an accelerator (CUDA or MPS); "
            f"this run is on the CPU, where every weight already sits in main memory: running without offload")
        return pipe.to(device)
    if mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)
    return pipe


def load_pipeline(model=None, lora=None, lora_scale=1.0, dtype: str | torch.dtype | None = None,
                  device: str | torch.device | None = None, *, base: str | None = None, scheduler: str = "auto",
                  offload_mode: str = "none", quantization: str | None = None, vae_tiling: bool | None = None,
                  log=print):
    """A CogVideoX (text- or image-to-video) pipeline from any checkpoint (cogpipe.model_sources; the shipped tiny
    model when `model` is None), with `lora` (a path or a list, any key format, each at lora_scale times its stored
    alpha/rank). Device and dtype follow cogpipe.devices unless given: the best accelerator, bf16 there (fp16 for
    CogVideoX-2B), fp32 on the CPU. On an accelerator the VAE decodes in slices and tiles (vae_tiling: force)."""
    source = model if isinstance(model, model_sources.Source) else \
        model_sources.resolve(shipped_model() if model is None else model, base=base, log=log)
    transformer_config = source.transformer_config
    device = devices.inference_device(device)
    if not isinstance(dtype, torch.dtype):
        card = family.released_variant(transformer_config)
        dtype = devices.inference_dtype(device, dtype, card.dtype if card else None)
    pipe = pipeline_class(transformer_config).from_pretrained(source.folder, dtype=dtype)
    pipe.cogpipe_source = source
    pipe.cogpipe_vae_config = dict(pipe.vae.config)
    loras = [] if lora is None else [lora] if isinstance(lora, (str, bytes)) or hasattr(lora, "__fspath__") \
        else list(lora)
    scales = list(lora_scale) if isinstance(lora_scale, (list, tuple)) else [lora_scale] * len(loras)
    if len(scales) != len(loras):
        raise ValueError(f"--lora-scale: {len(scales)} scales for {len(loras)} LoRAs (give one, or one per LoRA)")
    if loras:
        lora_formats.load_into(pipe, loras, scales)
    if quantization and quantization != "none":
        if quantization not in QUANTIZE:
            raise ValueError(f"--quantize must be one of {QUANTIZE[1:]}, got {quantization!r}")
        if loras:  # quantized weights take no adapter: fold the LoRA in first
            pipe.fuse_lora(components=["transformer"])
            pipe.unload_lora_weights()
        if offload_mode == "none":
            pipe.to(device)
        quantize(pipe, quantization, device, log)
    pipe.cogpipe_scheduler = set_scheduler(pipe, scheduler, transformer_config)
    if device.type != "cpu" if vae_tiling is None else vae_tiling:
        pipe.vae.enable_slicing()
        pipe.vae.enable_tiling()
    pipe.set_progress_bar_config(disable=True)
    return offload(pipe, offload_mode, device, log)
