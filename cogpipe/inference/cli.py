"""infer.py: generate videos from any CogVideoX checkpoint, at the model's own settings unless told otherwise.

Every check that needs no weights (the frame and size rules of the model's version, image- vs text-to-video, the
flags' values) runs before any weights load; the run ends with the time taken and, on a GPU, the peak memory.

This module imports only the standard library at its top: cogpipe's modules bring torch with them, and
`infer.py --help` (and a flag's error) should answer at once, so they are imported where they are used."""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .pipeline import OFFLOADS, QUANTIZE, SCHEDULERS
from .sampling import DEFAULT_GUIDANCE, DEFAULT_STEPS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (default: the empty prompt)")
    p.add_argument("--model", default=None,
                   help="a Diffusers pipeline folder, a hub id, a SAT checkpoint folder or a single-file transformer "
                        "(.safetensors/.pt/.pth); default: the shipped models/tiny-world")
    p.add_argument("--base", default=None, help="for a SAT or single-file --model: the pipeline folder or hub id "
                                                "that supplies VAE, T5, tokenizer, scheduler (default: the released "
                                                "model of its version)")
    p.add_argument("--lora", action="append", default=None,
                   help="LoRA folder or file in diffusers, peft, SAT or ComfyUI keys (repeatable)")
    p.add_argument("--lora-scale", type=float, action="append", default=None,
                   help="multiplier of each LoRA's own alpha/rank scale (one, or one per --lora; default 1)")
    p.add_argument("--image", default=None, help="first frame, for image-to-video models")
    p.add_argument("--video", default=None, help="a clip to transform (video-to-video, text-to-video 1.0 models)")
    p.add_argument("--strength", type=float, default=0.8, help="video-to-video: how much noise covers the clip")
    p.add_argument("--num-frames", type=int, default=None, help="default: the model's own (1.0: 49, 1.5: 81)")
    p.add_argument("--height", type=int, default=None, help="default: the model's own (1.0: 480, 1.5: 768)")
    p.add_argument("--width", type=int, default=None, help="default: the model's own (1.0: 720, 1.5: 1360)")
    p.add_argument("--fps", type=int, default=None, help="default: the model's own (1.0: 8, 1.5: 16)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--scheduler", choices=SCHEDULERS, default="auto",
                   help="auto: DPM for released models (the official demo's), the folder's own for others")
    p.add_argument("--dynamic-cfg", action=argparse.BooleanOptionalAction, default=None,
                   help="guidance rising over the steps (use_dynamic_cfg); default: on with the DPM scheduler")
    p.add_argument("--num-videos", type=int, default=1, help="videos per prompt: OUTPUT-0.mp4, OUTPUT-1.mp4, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: CUDA, then MPS, then the CPU")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="default: bf16 on a GPU (fp16 for CogVideoX-2B), fp32 on the CPU")
    p.add_argument("--offload", choices=OFFLOADS, default="none",
                   help="model / sequential CPU offload (an accelerator's memory is short)")
    p.add_argument("--quantize", choices=QUANTIZE, default="none",
                   help="weight-only quantization of transformer and T5 (torchao; fp8 needs compute capability 8.9+)")
    from .speed import add_arguments as speed_arguments

    speed_arguments(p)
    p.add_argument("--vae-tiling", action=argparse.BooleanOptionalAction, default=None,
                   help="VAE slicing and tiling (default: on on an accelerator)")
    p.add_argument("--output", default="output.mp4",
                   help="the video file (with --num-videos N: OUTPUT-0.mp4 ... OUTPUT-{N-1}.mp4)")
    p.add_argument("--sequence-parallel", type=int, default=1, metavar="N",
                   help="run each video across N processes (Ulysses attention): launch with `accelerate launch "
                        "--num_processes N infer.py ...` on GPUs, `ACCELERATE_USE_CPU=1 accelerate launch "
                        "--config_file configs/accelerate/ddp.yaml --num_processes N infer.py ...` on CPUs; N divides "
                        "the model's attention heads")


def _fail(message: str) -> int:
    print(f"infer.py: error: {message}", file=sys.stderr)
    return 2


@dataclass(frozen=True)
class Prepared:
    """What the checks settled before any weights load: the model, the first frame, the clip and the device."""
    source: object  # cogpipe.model_sources.Source
    image: object  # the PIL first frame (image-to-video) or None
    clip: object  # cogpipe.inference.settings.Clip
    device: object  # torch.device
    rank: int = 0  # this process's rank in the --sequence-parallel group (0 alone): only rank 0 writes


def prepare(a: argparse.Namespace) -> Prepared:
    """Every check that needs no weights, on parsed infer.py arguments (the web page's Generate tab parses its
    fields with this same parser). Raises ValueError or FileNotFoundError naming the flag and the rule."""
    from cogpipe import devices, family, model_sources, sequence_parallel
    from cogpipe.inference import resolve_clip
    from cogpipe.inference.pipeline import shipped_model
    from cogpipe.inference.sampling import v2v_problem

    if a.num_videos < 1:
        raise ValueError(f"--num-videos must be at least 1, got {a.num_videos}")
    if a.image and a.video:
        raise ValueError("--image and --video: give one (image-to-video or video-to-video)")
    if a.quantize == "fp8" and devices.inference_device(a.device).type != "cuda":  # said first: torchao won't help
        from .pipeline import FP8_CAPABILITY

        raise ValueError(f"--quantize fp8 needs an NVIDIA GPU of compute capability {FP8_CAPABILITY[0]}."
                         f"{FP8_CAPABILITY[1]} or newer (Ada, Hopper); this run is on "
                         f"{devices.inference_device(a.device).type}: use --quantize int8")
    if a.quantize != "none" and importlib.util.find_spec("torchao") is None:
        raise ValueError(f"--quantize {a.quantize} needs torchao, the `quantize` extra: pip install -e \".[quantize]\" "
                         f"(or pip install torchao)")
    for flag, path in (("--image", a.image), ("--video", a.video)):
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: no such file")
    source = model_sources.resolve(shipped_model() if a.model is None else a.model, base=a.base)
    config = source.transformer_config
    i2v = family.is_i2v(config)
    name = family.released_variant(config).title if family.released_variant(config) else "this model"
    if i2v and not a.image:
        raise ValueError(f"--image: {name} is image-to-video: pass its first frame with --image FILE")
    if not i2v and a.image:
        raise ValueError(f"--image: {name} is text-to-video; image-to-video needs an I2V model")
    if a.video and v2v_problem(config):
        raise ValueError(v2v_problem(config))
    image = None
    if a.image:
        from diffusers.utils import load_image

        image = load_image(a.image)
    clip = resolve_clip(config, source.vae_config, a.num_frames, a.height, a.width, a.fps,
                        image.size if image is not None else None,
                        source.folder if source.kind == "diffusers" else None)
    device = devices.inference_device(a.device)
    from cogpipe.inference import speed

    speed.check(speed.from_args(a), device, a.sequence_parallel, a.steps)
    rank = 0
    if a.sequence_parallel != 1:  # every rank runs the same video; the first one writes it
        device = devices.process_device(device)
        rank = sequence_parallel.start_inference(a.sequence_parallel, device, config["num_attention_heads"])
    return Prepared(source, image, clip, device, rank)


def load(a: argparse.Namespace, prepared: Prepared):
    """The pipeline the arguments ask for (cogpipe.inference.load_pipeline), its progress bar over the steps on."""
    from cogpipe import sequence_parallel
    from cogpipe.inference import load_pipeline, speed

    pipe = load_pipeline(prepared.source, a.lora, a.lora_scale or 1.0, a.dtype, prepared.device, base=a.base,
                         scheduler=a.scheduler, offload_mode=a.offload, quantization=a.quantize,
                         vae_tiling=a.vae_tiling)
    pipe.set_progress_bar_config(disable=prepared.rank != 0, desc="denoising")
    if a.sequence_parallel != 1:
        sequence_parallel.enable(pipe.transformer, None)
    speed.apply(pipe, speed.from_args(a), a.steps, log=print if prepared.rank == 0 else lambda *_: None)
    return pipe


def sample(a: argparse.Namespace, prepared: Prepared, pipe) -> list:
    """The videos (uint8 [F, H, W, 3] each) the arguments ask for, from a pipeline `load` gave."""
    from cogpipe.inference import generate_videos

    clip = prepared.clip
    return generate_videos(pipe, a.prompt, clip.frames, clip.height, clip.width, a.steps, a.guidance, a.seed,
                           image=prepared.image, negative_prompt=a.negative_prompt, num_videos=a.num_videos,
                           dynamic_cfg=a.dynamic_cfg, video=a.video, strength=a.strength)


def run(a: argparse.Namespace) -> int:
    import torch

    from cogpipe import devices, sequence_parallel
    from cogpipe.inference.speed import report_of
    from cogpipe.video import write_mp4

    start = time.perf_counter()
    try:  # everything that needs no weights, first
        prepared = prepare(a)
    except (ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    source, clip, device = prepared.source, prepared.clip, prepared.device
    print(f"{source.spec}: {clip.frames} frames at {clip.height}x{clip.width}, {clip.fps} fps "
          f"(defaults from {clip.source}) on {device}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        pipe = load(a, prepared)
        videos = sample(a, prepared, pipe)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        return _fail(str(e))
    if prepared.rank != 0:
        return 0
    out = Path(a.output)
    paths = [out] if len(videos) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(videos))]
    for video, path in zip(videos, paths):
        write_mp4(video, path, fps=clip.fps)
    took = time.perf_counter() - start
    memory = ""
    if device.type == "cuda":
        memory = f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    across = ""
    if a.sequence_parallel != 1:
        across = (f"; across {a.sequence_parallel} processes, {sequence_parallel.COUNTS['all_to_all']} all-to-alls, "
                  f"{sequence_parallel.COUNTS['bytes_sent']} bytes sent by this one")
    print(f"wrote {', '.join(str(p) for p in paths)} ({pipe.cogpipe_scheduler} scheduler, {a.steps} steps, "
          f"{devices.DTYPE_NAMES.get(pipe.transformer.dtype, pipe.transformer.dtype)}) in {took:.1f} s{memory}{across}")
    report = report_of(pipe)
    if report is not None:
        print(report.line())
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infer.py", description="Generate a video with a CogVideoX model (default: the "
                                                             "shipped tiny model, models/tiny-world).")
    add_arguments(p)
    return p


def main(argv=None) -> int:
    return run(parser().parse_args(argv))
