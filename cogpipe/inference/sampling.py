"""generate(): a loaded pipeline -> uint8 frames. Text-to-video, image-to-video (image=) and video-to-video
(video=, through diffusers' CogVideoXVideoToVideoPipeline as the official demo), with the model's own clip by
default (cogpipe.family.default_clip). Same seed, same video."""

from __future__ import annotations

import numpy as np
import torch

from cogpipe import family
from cogpipe.data.folders import load_clip

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 6.0


def tiled_decode_size(vae, latent_height: int, latent_width: int, scale: int) -> tuple[int, int]:
    """The frame size AutoencoderKLCogVideoX.tiled_decode gives for a latent grid: overlapping tiles, each cut to
    its row/column limit. Real sizes (480 x 720, 768 x 1360) come out exact; small ones, whose tiles do not
    partition the grid, come out larger."""
    def side(n, tile_latent, tile_sample, overlap_factor):
        step = int(tile_latent * (1 - overlap_factor))
        limit = tile_sample - int(tile_sample * overlap_factor)
        return sum(min(scale * min(tile_latent, n - i), limit) for i in range(0, n, step))

    return (side(latent_height, vae.tile_latent_min_height, vae.tile_sample_min_height, vae.tile_overlap_factor_height),
            side(latent_width, vae.tile_latent_min_width, vae.tile_sample_min_width, vae.tile_overlap_factor_width))


def model_clip(pipe) -> dict:
    """The pipeline's own default clip {frames, height, width, fps} (family.default_clip)."""
    vae_config = getattr(pipe, "cogpipe_vae_config", None) or dict(pipe.vae.config)
    return family.default_clip(dict(pipe.transformer.config), vae_config)


def video_frames(path, num_frames: int, height: int, width: int) -> list:
    """The frames of a clip for video-to-video: `num_frames` sampled evenly, resized and center-cropped to
    height x width (as training reads clips), as PIL images."""
    from PIL import Image

    clip = load_clip(path, num_frames, height, width)  # [F, 3, H, W] in [-1, 1]
    pixels = ((clip.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    return [Image.fromarray(frame) for frame in pixels]


def v2v_problem(config: dict) -> str | None:
    """Why this transformer cannot do video-to-video, or None."""
    if config.get("patch_size_t") is not None:
        return ("--video: diffusers' CogVideoXVideoToVideoPipeline does not pad the latent frames of "
                         "CogVideoX 1.5 (patch_size_t 2), whose 16N+1 frames always give an odd latent count it "
                         "refuses; use a CogVideoX 1.0 text-to-video model (2B, 5B) for video-to-video")
    if config["in_channels"] != (config.get("out_channels") or 16):
        return "--video: video-to-video needs a text-to-video model; this one is image-to-video (--image)"
    return None


def _v2v(pipe):
    from diffusers import CogVideoXVideoToVideoPipeline

    problem = v2v_problem(dict(pipe.transformer.config))
    if problem:
        raise ValueError(problem)
    return CogVideoXVideoToVideoPipeline(**{k: getattr(pipe, k) for k in
                                            ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")})


def generate_videos(pipe, prompt: str, num_frames: int | None = None, height: int | None = None,
                    width: int | None = None, steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
                    seed: int = 0, image=None, prompt_embeds=None, negative_prompt_embeds=None,
                    negative_prompt: str | None = None, num_videos: int = 1, dynamic_cfg: bool | None = None,
                    video=None, strength: float = 0.8) -> list[np.ndarray]:
    """`num_videos` videos, each uint8 [F, H, W, 3], video i from seed + i. Frames and size default to the
    model's own. With `prompt_embeds` (and the negative ones, for guidance) the pipeline needs no text encoder.
    `video`: a clip path (video-to-video from it, `strength` of noise: 1 ignores the clip, 0 returns it).
    dynamic_cfg: guidance rising over the steps (None: on with the DPM scheduler, as the official demo samples)."""
    clip = model_clip(pipe)
    if dynamic_cfg is None:  # the official demo's guidance schedule comes with its DPM sampler
        dynamic_cfg = type(pipe.scheduler).__name__ == "CogVideoXDPMScheduler"
    num_frames, height, width = (num_frames or clip["frames"]), (height or clip["height"]), (width or clip["width"])
    kwargs = dict(height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                  max_sequence_length=pipe.transformer.config.max_text_seq_length, output_type="np",
                  use_dynamic_cfg=dynamic_cfg)
    if prompt_embeds is None:
        kwargs.update(prompt=prompt, negative_prompt=negative_prompt)
    else:
        kwargs.update(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds)
    runner = pipe
    if video is not None:
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"--strength must be in [0, 1], got {strength}")
        runner = _v2v(pipe)
        runner.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
        kwargs.update(video=video_frames(video, num_frames, height, width), strength=strength)
    else:
        kwargs["num_frames"] = num_frames
    if image is not None:
        kwargs["image"] = image
    vae, scale = pipe.vae, pipe.vae_scale_factor_spatial
    tiled = getattr(vae, "use_tiling", False)
    if tiled and tiled_decode_size(vae, height // scale, width // scale, scale) != (height, width):
        vae.disable_tiling()  # its tiles would not partition this size: decode whole
    videos = []
    from .speed import Timer, begin

    report = begin(pipe, steps)  # the speed settings' report (cogpipe.inference.speed), when installed
    try:  # diffusers' CogVideoX pipelines make one video per prompt (they reset num_videos_per_prompt to 1)
        for i in range(num_videos):
            with Timer(report):
                frames = runner(**kwargs, generator=torch.Generator("cpu").manual_seed(seed + i)).frames[0]
            videos.append((np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8))  # [F, H, W, 3]
    finally:
        if tiled:
            vae.enable_tiling()
    return videos


def generate(pipe, prompt: str, num_frames: int | None = None, height: int | None = None, width: int | None = None,
             steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, seed: int = 0, image=None,
             prompt_embeds=None, negative_prompt_embeds=None, **kwargs) -> np.ndarray:
    """One video, uint8 [F, H, W, 3] (see generate_videos)."""
    return generate_videos(pipe, prompt, num_frames, height, width, steps, guidance, seed, image, prompt_embeds,
                           negative_prompt_embeds, **kwargs)[0]
