"""Benchmark CogVideoX training steps at real shapes (random init); prints one JSON line.

    python bench/train_step.py --size 5b --mode lora --frames 49 --height 480 --width 720 \
        --dtype bf16 --gradient-checkpointing [--batch 1 --steps 10 --warmup 3 --rank 128] [--out FILE]
    python bench/train_step.py --size tiny        # CPU, a few seconds

A step is what cogpipe/training.py does, without the data loader and accelerate: random latents
(B, F', 16, H/8, W/8) (image-to-video: + first-frame latents on channels -> 32) and random T5 embeddings
(B, 226, 4096), noise and a timestep, the transformer under autocast, the weighted v-prediction loss
(cogpipe.diffusion), backward, gradient clipping, AdamW. LoRA: frozen weights in --dtype, adapter in
fp32 (cogpipe.lora.add_lora); full: fp32 weights, math in --dtype (mixed precision).

Reported: step time (median of the steps after --warmup), samples/s, peak memory
(torch.cuda.max_memory_allocated on a GPU; the process's peak RSS on CPU), model FLOPs per step
(cogpipe.plan.train_flops: linear layers 2*in*out per token, attention 4*S^2*H per layer; training = 3x
forward for full, 2x the frozen linears + 3x attention + 3x the LoRA matrices for LoRA; checkpoint
recompute not counted), and MFU against the device's dense bf16 peak (null on CPU or an unknown GPU).
Measured GPU runs belong in bench/results/ (tests/test_plan.py compares them with `cogpipe plan`).
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import emit  # noqa: E402

from cogpipe import plan  # noqa: E402
from cogpipe.config import LoraConfig, ModelConfig  # noqa: E402
from cogpipe.diffusion import diffusion_loss, noisy_and_target, pad_for_patch_t, rotary_embeddings  # noqa: E402
from cogpipe.family import DTYPES, VARIANTS, is_i2v, scheduler_config  # noqa: E402
from cogpipe.models import component_configs  # noqa: E402

SIZES = ("tiny", *(name for name, v in VARIANTS.items() if v.released))
# structural switches --like copies from a real size onto the tiny model (to run its code path on CPU)
LIKE_KEYS = ("in_channels", "patch_size_t", "patch_bias", "ofs_embed_dim", "use_learned_positional_embeddings",
             "use_rotary_positional_embeddings")
# dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by a substring of torch.cuda.get_device_name()
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
             ("A100", 312e12), ("L40S", 362e12)]


def peak_flops(device_name: str):
    for key, value in PEAK_BF16:
        if key in device_name:
            return value
    return None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=SIZES, default="tiny")
    ap.add_argument("--like", choices=SIZES[1:], default=None,
                    help="with --size tiny: take the structure of this size (I2V channels, patch_t, ofs, positions)")
    ap.add_argument("--mode", choices=("lora", "full"), default="lora")
    ap.add_argument("--frames", type=int, default=None, help="default: 17 (tiny), 49 (1.0), 81 (1.5)")
    ap.add_argument("--height", type=int, default=None, help="default: 64 (tiny), 480 (1.0), 768 (1.5)")
    ap.add_argument("--width", type=int, default=None, help="default: 64 (tiny), 720 (1.0), 1360 (1.5)")
    ap.add_argument("--rank", type=int, default=None, help="LoRA rank; default 8 (tiny), 128")
    ap.add_argument("--alpha", type=float, default=None, help="LoRA alpha; default rank/2 (the official 128/64)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="steps in all; default 5 (tiny), 10")
    ap.add_argument("--warmup", type=int, default=None, help="steps not timed; default 2 (tiny), 3")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, if not known here")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON to this file")
    args = ap.parse_args(argv)
    tiny, variant = args.size == "tiny", VARIANTS[args.size]  # the default clip: the variant's (cogpipe/family.py)
    args.frames = args.frames or variant.frames
    args.height = args.height or variant.height
    args.width = args.width or variant.width
    args.rank = args.rank or (8 if tiny else 128)
    args.alpha = args.alpha or args.rank / 2
    args.steps = args.steps or (5 if tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (2 if tiny else 3)
    if args.steps <= args.warmup:
        ap.error("--steps must be larger than --warmup")
    if args.like and args.size != "tiny":
        ap.error("--like goes with --size tiny")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def build(args, transformer_config: dict, device: torch.device):
    """The transformer with random weights, built directly on the device (fast init on a GPU)."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    with device:
        model = CogVideoXTransformer3DModel(**transformer_config)
    if args.mode == "lora":
        from cogpipe.lora import add_lora

        model.to(DTYPES[args.dtype])
        add_lora(model, LoraConfig(rank=args.rank, alpha=args.alpha))
    else:
        model.requires_grad_(True)  # fp32 master weights; autocast runs the math in --dtype
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model.train()


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    transformer_config, vcfg = component_configs(ModelConfig(preset=args.size))
    if args.like:
        target = VARIANTS[args.like].transformer
        transformer_config.update({k: target[k] for k in LIKE_KEYS if k in target})
        if target.get("ofs_embed_dim"):  # diffusers adds the ofs embedding to the time embedding: same width
            transformer_config["ofs_embed_dim"] = transformer_config["time_embed_dim"]
    shape = plan.token_shape(transformer_config, args.frames, args.height, args.width, args.batch)
    model = build(args, transformer_config, device)
    dtype = DTYPES[args.dtype]
    amp = dtype != torch.float32
    input_dtype = dtype if args.mode == "lora" else torch.float32
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type in ("cuda", "cpu")  # as cogpipe.optim.make_optimizer: one kernel a step
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-4, fused=fused)
    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "fp16")

    from diffusers import CogVideoXDDIMScheduler

    alphas_cumprod = CogVideoXDDIMScheduler(**scheduler_config(args.size)).alphas_cumprod.to(device)
    B, C = args.batch, vcfg["latent_channels"]
    lf, lh, lw = (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8
    i2v = is_i2v(transformer_config)
    g = torch.Generator(device=device).manual_seed(0)

    def batch():
        x0 = torch.randn(B, lf, C, lh, lw, generator=g, device=device)  # (B, F', C, H/8, W/8)
        t = torch.randint(0, len(alphas_cumprod), (B,), generator=g, device=device)
        x0 = pad_for_patch_t(x0, transformer_config.get("patch_size_t"))
        noise = torch.randn(x0.shape, generator=g, device=device)  # fresh in the padding frames too
        noisy, target = noisy_and_target(x0, noise, t, alphas_cumprod)
        inp = noisy
        if i2v:  # first-frame latents, zero over the other frames, concatenated on channels -> 32
            image = torch.zeros_like(noisy)
            image[:, 0] = torch.randn(image[:, 0].shape, generator=g, device=device)
            inp = torch.cat([noisy, image], dim=2)
        text = torch.randn(B, transformer_config["max_text_seq_length"], transformer_config["text_embed_dim"],
                           generator=g, device=device)
        return target, inp, text, t

    rope = rotary_embeddings(transformer_config, shape["latent_frames"], lh, lw, device)
    ofs = torch.full((B,), 2.0, device=device) if transformer_config.get("ofs_embed_dim") else None

    def step():
        target, inp, text, t = batch()
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            v_pred = model(hidden_states=inp.to(input_dtype), encoder_hidden_states=text.to(input_dtype), timestep=t,
                           ofs=ofs, image_rotary_emb=rope, return_dict=False)[0]
        loss = diffusion_loss(v_pred, target)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().float().item()  # .item() waits for the device

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(args.steps):
        tic = time.perf_counter()
        losses.append(step())
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tic)
    timed = times[args.warmup:]
    median = statistics.median(timed)

    if cuda:
        peak_bytes, peak_kind = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
        name = torch.cuda.get_device_name(device)
    else:
        peak_bytes, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS (getrusage)"
        name = platform.processor() or platform.machine()
    flops = plan.train_flops(transformer_config, shape, args.mode, args.rank if args.mode == "lora" else 0,
                             LoraConfig().target_modules)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (peak_flops(name) if cuda else None)
    import diffusers

    result = {
        "bench": "train_step", "size": args.size, "like": args.like, "mode": args.mode,
        "frames": args.frames, "height": args.height, "width": args.width, "batch": B,
        "latent_shape": [B, shape["latent_frames"], transformer_config["in_channels"], lh, lw],
        "tokens": {"video": shape["video_tokens"], "text": shape["text_tokens"], "total": shape["tokens"]},
        "dtype": args.dtype, "grad_scaler": scaler.is_enabled(), "fused_adamw": fused,
        "gradient_checkpointing": args.gradient_checkpointing,
        "lora_rank": args.rank if args.mode == "lora" else None,
        "lora_alpha": args.alpha if args.mode == "lora" else None,
        "steps": args.steps, "warmup": args.warmup,
        "step_time_s_median": median, "step_times_s": times,
        "samples_per_s": B / median,
        "peak_memory_gb": peak_bytes / 1e9, "peak_memory_kind": peak_kind,
        "flops_per_step": flops, "tflops_per_s": flops / median / 1e12,
        "mfu": flops / median / peak if peak else None, "peak_flops": peak,
        "params": sum(p.numel() for p in model.parameters()), "trainable_params": sum(p.numel() for p in params),
        "loss_first": losses[0], "loss_last": losses[-1],
        "device": device.type, "device_name": name,
        "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
        "cuda": torch.version.cuda if cuda else None,
    }
    return emit(result, args.out)


if __name__ == "__main__":
    main()
