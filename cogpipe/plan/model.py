"""The model a plan is for: its transformer config (or a preset standing in for it), parameter counts, every
nn.Linear, and the token counts of a clip."""

from __future__ import annotations

import dataclasses
import functools
import json
import math

from cogpipe import family
from cogpipe.models import component_configs, resolve_configs

GB = 1e9


def resolve_model(model_cfg) -> tuple[dict, str | None]:
    """(transformer config with defaults, stand-in preset or None).

    From model.pretrained when it can be read. A hub id that cannot be read (offline, not cached) stands
    in with the shapes of `model.preset`, or, where the recipe left the preset at tiny, of the released
    model the id names (family.preset_for_hub_id). Planning an unreadable model with the tiny shapes would be
    meaningless: that is an error that says what to set.
    """
    if not model_cfg.pretrained:
        return component_configs(model_cfg)[0], None
    try:
        resolved, error = resolve_configs(model_cfg), None  # says whether model.preset stood in
    except Exception as e:  # a missing local folder, a hub error models.py does not catch, ...
        resolved, error = None, f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
    if resolved is not None and resolved.stand_in is None:
        return resolved.transformer, None
    known = family.preset_for_hub_id(model_cfg.pretrained)
    preset = model_cfg.preset if model_cfg.preset != "tiny" else known
    if preset not in family.VARIANTS:
        raise ValueError(f"model.pretrained: cannot read {model_cfg.pretrained!r}{f' ({error})' if error else ''}; "
                         f"set model.preset to its size ({', '.join(p for p in family.VARIANTS if p != 'tiny')}) "
                         f"or pass model.pretrained=null")
    return component_configs(dataclasses.replace(model_cfg, pretrained=None, preset=preset))[0], preset


def stand_in_note(model_cfg, preset) -> str | None:
    return None if preset is None else (f"model.pretrained {model_cfg.pretrained!r} could not be read here; "
                                        f"planned with the shapes of preset {preset!r}")


def resolve_transformer_config(model_cfg) -> tuple[dict, str | None]:
    """(transformer config, note): `resolve_model` with a sentence saying which preset stood in, if any."""
    transformer_config, preset = resolve_model(model_cfg)
    return transformer_config, stand_in_note(model_cfg, preset)


@functools.lru_cache(maxsize=16)
def _model_stats(transformer_config_json: str) -> dict:
    """Parameter and buffer counts and every nn.Linear of the transformer, from a meta-device build."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import CogVideoXTransformer3DModel

    with init_empty_weights():  # parameters on meta; buffers (position tables) are real but small
        model = CogVideoXTransformer3DModel(**json.loads(transformer_config_json))
    linears = [(name, m.in_features, m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)]
    block = model.transformer_blocks[0]
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    fp8 = sum(p.numel() for p in model.parameters() if p.dtype == torch.float8_e4m3fn)  # what model.fp8_frozen casts
    return dict(fp8_params=fp8,params=sum(p.numel() for p in model.parameters()),
                buffers=sum(b.numel() for b in model.buffers() if b.is_floating_point()),
                block_params=sum(p.numel() for p in block.parameters()),
                block_linear_params=sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear)),
                linears=linears)


def model_stats(transformer_config: dict) -> dict:
    return _model_stats(json.dumps(transformer_config, sort_keys=True, default=list))


def lora_targets(linears, target_modules) -> list[tuple[str, int, int]]:
    """The nn.Linear layers peft wraps: name equal to a target or ending in '.' + target."""
    return [(n, i, o) for n, i, o in linears if any(n == t or n.endswith("." + t) for t in target_modules)]


def token_shape(transformer_config: dict, frames: int, height: int, width: int, batch: int = 1) -> dict:
    """Latent and token counts of one training sample (4x temporal, 8x spatial VAE: cogpipe/family.py)."""
    p, p_t = transformer_config["patch_size"], transformer_config.get("patch_size_t")
    latent_frames = (frames - 1) // family.VAE_TEMPORAL + 1
    if p_t:  # CogVideoX 1.5 pads an odd latent frame count to a multiple of patch_t
        latent_frames = math.ceil(latent_frames / p_t) * p_t
    lh, lw = height // family.VAE_SPATIAL, width // family.VAE_SPATIAL
    video = (latent_frames // (p_t or 1)) * (lh // p) * (lw // p)
    text = transformer_config["max_text_seq_length"]
    return dict(batch=batch, frames=frames, height=height, width=width, latent_frames=latent_frames,
                latent_height=lh, latent_width=lw, video_tokens=video, text_tokens=text, tokens=video + text)


def largest_shape(cfg, transformer_config: dict) -> dict:
    """The training shape with the most tokens: data.frames x height x width, or a larger bucket
    (data.buckets, where the schema has them): the peak is set by the largest batch."""
    shapes = [(cfg.data.frames, cfg.data.height, cfg.data.width)]
    shapes += [tuple(b) for b in getattr(cfg.data, "buckets", None) or []]
    return max((token_shape(transformer_config, f, h, w, cfg.train.batch_size) for f, h, w in shapes),
               key=lambda s: s["tokens"])


def per_gpu_shape(shape: dict, sequence_parallel: int) -> dict:
    """The tokens one GPU holds through the blocks under train.sequence_parallel N: every text token (replicated)
    and 1/N of the video tokens (rounded up: the padding of cogpipe/sequence_parallel.py). The latent shape stays
    the whole sample's (every rank computes the loss on the gathered output)."""
    if sequence_parallel <= 1:
        return shape
    video = math.ceil(shape["video_tokens"] / sequence_parallel)
    return dict(shape, video_tokens=video, tokens=video + shape["text_tokens"])
