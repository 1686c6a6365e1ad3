"""Inference: any checkpoint -> a CogVideoX pipeline (pipeline.py) -> frames (sampling.py) -> mp4 (cli.py, what
infer.py runs). The end-of-run validation render and `cogpipe score` load and sample through the same functions,
so what training shows is what inference gives.

    pipe = load_pipeline("outputs/run/export", lora="outputs/run/lora")
    frames = generate(pipe, "a purple square moving left", steps=50, seed=0)   # uint8 [F, H, W, 3]
"""

from __future__ import annotations

from cogpipe.video import write_mp4

from .pipeline import DEFAULT_MODEL, load_pipeline
from .sampling import DEFAULT_GUIDANCE, DEFAULT_STEPS, generate, generate_videos, model_clip, tiled_decode_size
from .settings import Clip, resolve_clip

__all__ = ["DEFAULT_MODEL", "DEFAULT_STEPS", "DEFAULT_GUIDANCE", "load_pipeline", "generate", "generate_videos",
           "model_clip", "tiled_decode_size", "Clip", "resolve_clip", "generate_to_file"]


def generate_to_file(output, fps: int | None = None, **kwargs):
    """Load (model, lora, lora_scale), generate one video and write it as mp4 at `fps` (default: the model's)."""
    pipe = load_pipeline(kwargs.pop("model", None), kwargs.pop("lora", None), kwargs.pop("lora_scale", 1.0))
    return write_mp4(generate(pipe, **kwargs), output, fps=fps or model_clip(pipe)["fps"])
