"""generate(): a Diffusers CogVideoX pipeline folder (+ optional LoRA) -> frames -> mp4."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cogpipe.family import LORA_FILE
from cogpipe.video import write_mp4

# Sampling defaults of infer.py and `cogpipe score`.
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 6.0
# The shipped tiny model (pretrained on the synthetic world by `cogpipe world pretrain`): the default.
DEFAULT_MODEL = "models/tiny-world"


def load_pipeline(model=None, lora=None, lora_scale: float = 1.0, dtype: str | torch.dtype | None = None,
                  device: str | torch.device | None = None):
    """A CogVideoX (text- or image-to-video) pipeline from a folder or hub id; the shipped tiny model
    (models/tiny-world) when `model` is None. `lora` is a folder or a .safetensors file. Device and dtype follow
    cogpipe.devices unless given: the best accelerator, bf16 there (fp16 for CogVideoX-2B), fp32 on the CPU; on
    a GPU the VAE decodes in slices and tiles."""
    from cogpipe import devices, family, models

    if model is None:
        from cogpipe.paths import repo_path

        model = repo_path(DEFAULT_MODEL, "--model (a Diffusers pipeline folder or hub id)")
        if not (model / "model_index.json").is_file():
            raise FileNotFoundError(f"{model}: the shipped tiny model is incomplete (a partial checkout?); pass "
                                    f"--model, or rebuild it with `cogpipe world pretrain --ship {model}`")
    transformer_config = models._read_component_config(str(model), "transformer")
    device = devices.inference_device(device)
    if not isinstance(dtype, torch.dtype):
        card = family.released_variant(transformer_config)
        dtype = devices.inference_dtype(device, dtype, card.dtype if card else None)
    pipe = models.pipeline_class(transformer_config).from_pretrained(str(model), dtype=dtype)
    if device.type != "cpu":
        pipe.vae.enable_slicing()
        pipe.vae.enable_tiling()
    if lora is not None:
        lora = Path(lora)
        if lora.is_dir():
            pipe.load_lora_weights(str(lora), weight_name=LORA_FILE, adapter_name="lora")
        else:
            pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="lora")
        pipe.set_adapters(["lora"], [lora_scale])
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


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


def generate(pipe, prompt: str, num_frames: int = 17, height: int = 64, width: int = 64, steps: int = 50,
             guidance: float = 6.0, seed: int = 0, image=None, prompt_embeds=None,
             negative_prompt_embeds=None) -> np.ndarray:
    """Frames uint8 [F, H, W, 3]. Same seed, same video. With `prompt_embeds` (and the negative
    ones, for guidance) the pipeline needs no text encoder."""
    kwargs = dict(num_frames=num_frames, height=height, width=width, num_inference_steps=steps,
                  guidance_scale=guidance, max_sequence_length=pipe.transformer.config.max_text_seq_length,
                  generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    if prompt_embeds is None:
        kwargs["prompt"] = prompt
    else:
        kwargs.update(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds)
    if image is not None:
        kwargs["image"] = image
    vae, scale = pipe.vae, pipe.vae_scale_factor_spatial
    tiled = getattr(vae, "use_tiling", False)
    if tiled and tiled_decode_size(vae, height // scale, width // scale, scale) != (height, width):
        vae.disable_tiling()  # its tiles would not partition this size: decode whole
    try:
        frames = pipe(**kwargs).frames[0]  # (F, H, W, 3) floats in [0, 1]
    finally:
        if tiled:
            vae.enable_tiling()
    return (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)


def generate_to_file(output, fps: int = 8, **kwargs) -> Path:
    pipe = load_pipeline(kwargs.pop("model", None), kwargs.pop("lora", None), kwargs.pop("lora_scale", 1.0))
    return write_mp4(generate(pipe, **kwargs), output, fps=fps)
