"""The CogVideoX family, in one place: a table of its variants and the rules that follow from it.

Each `Variant` holds what is known of one model: the constructor kwargs of its transformer, VAE and T5 encoder,
its schedule shift and latent scaling, its hub id, frame and size rules, default clip and inference dtype.
Everything else reads from here: models.py builds components from the table, config.py checks recipes with
`shape_problems`, convert/ names SAT checkpoints and fills in what they do not store (`family_values`), plan/
and weights/ explain with the same rules. Version and image-to-video are read from a transformer config by one
rule each (`version`, `is_i2v`), so a Diffusers folder and a preset are judged alike.

Adding a variant means one table entry here plus a recipe YAML in configs/.

Import-light on purpose: torch only, never diffusers or transformers (the converter starts with this module).
See docs/design.md, "The CogVideoX family".
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LORA_FILE = "pytorch_lora_weights.safetensors"  # what CogVideoXPipeline.load_lora_weights reads

VAE_TEMPORAL, VAE_SPATIAL = 4, 8  # the VAE compresses 4x in time, 8x in height and width
PATCH = 2  # the transformer's spatial patch
SIZE_MULTIPLE = VAE_SPATIAL * PATCH  # height and width are multiples of 16
LATENT_CHANNELS = 16  # image-to-video transformers take twice that: noisy + first-frame latents

# CogVideoXTransformer3DModel's constructor defaults (the 2B shapes) of the keys the rules read, for partial
# configs such as a table entry's kwargs; tests/test_family.py checks them against diffusers.
_TRANSFORMER_DEFAULTS = dict(num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16,
                             patch_size=2, patch_size_t=None, sample_frames=49, sample_height=60, sample_width=90,
                             use_learned_positional_embeddings=False)

# The CogVideoX DDIM schedule: v-prediction, scaled-linear betas, zero terminal SNR; the shift is per variant.
_DDIM = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
             prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
             clip_sample=False, set_alpha_to_one=True, steps_offset=0)

# --- component kwargs shared by several variants -------------------------------------------------------------

# T5: the tiny byte-level encoder and T5-XXL (what every CogVideoX uses, d_model 4096)
_T5_TINY = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                vocab_size=384)
_T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, vocab_size=32128,
               feed_forward_proj="gated-gelu", is_gated_act=True, dense_act_fn="gelu_new")
_TINY = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, time_embed_dim=32, text_embed_dim=32,
             sample_height=8, sample_width=8, sample_frames=17, max_text_seq_length=48,
             use_rotary_positional_embeddings=True)
_VAE_TINY = dict(block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=4, latent_channels=16,
                 sample_height=64, sample_width=64, scaling_factor=0.7)
# tiny-world: hidden 128 (4 heads x 32), 4 layers; text from the world demo's fixed n-gram T5 (its pretrain module);
# its VAE compresses 4x in space (3 levels): a 64x64 clip is 16x16 latent pixels, 8x8 tokens a frame
_TINY_WORLD = dict(num_attention_heads=4, attention_head_dim=32, num_layers=4, time_embed_dim=64, text_embed_dim=64,
                   sample_height=16, sample_width=16, sample_frames=17, max_text_seq_length=48,
                   use_rotary_positional_embeddings=True)
_T5_WORLD = dict(d_model=64, d_kv=8, d_ff=64, num_layers=1, num_heads=14, relative_attention_num_buckets=32,
                 relative_attention_max_distance=64, vocab_size=384)
_VAE_WORLD = dict(block_out_channels=(16, 32, 32), down_block_types=("CogVideoXDownBlock3D",) * 3,
                  up_block_types=("CogVideoXUpBlock3D",) * 3, layers_per_block=1, norm_num_groups=4,
                  latent_channels=16, sample_height=64, sample_width=64, scaling_factor=1.0)
_VAE_FULL = dict(block_out_channels=(128, 256, 256, 512), layers_per_block=3, latent_channels=16)
_VAE_5B = dict(_VAE_FULL, scaling_factor=0.7)
_VAE_15 = dict(_VAE_FULL, scaling_factor=0.7, invert_scale_latents=True)
_5B = dict(num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True)
_15 = dict(_5B, patch_size_t=2, patch_bias=False, sample_height=300, sample_width=300, sample_frames=81)

_RULES_10 = dict(frame_multiple=8, max_frames=49)  # 8N+1 frames, at most 49
_RULES_15 = dict(frame_multiple=16, max_frames=161)  # 16N+1 frames, at most 161
_TINY_CLIP = dict(frames=17, height=64, width=64, fps=8, dtype="fp32")  # what the tiny models train at


@dataclass(frozen=True, eq=False)
class Variant:
    """One CogVideoX model: a preset (`model.preset`) and, for the released ones, a hub id."""

    name: str  # preset key
    title: str  # the model card's name
    hub_id: str | None  # released weights on the Hugging Face hub; None for the tiny presets
    transformer: Mapping[str, Any]  # CogVideoXTransformer3DModel kwargs (the rest: its defaults)
    vae: Mapping[str, Any]  # AutoencoderKLCogVideoX kwargs, scaling_factor included
    text_encoder: Mapping[str, Any]  # T5Config kwargs
    snr_shift_scale: float  # CogVideoXDDIMScheduler's SNR shift
    frame_multiple: int  # frames are frame_multiple * N + 1 ...
    max_frames: int  # ... and at most this many
    frames: int  # the default clip: what the model card generates (tiny: what it trained at)
    height: int
    width: int
    fps: int
    dtype: str  # inference dtype (a DTYPES key), as the model card runs it
    size: str | None = None  # "2B" | "5B": the size class of its hidden size (released variants)
    min_side: int | None = None  # the shorter side at least this (1.5-I2V)
    max_side: int | None = None  # the longer side at most this (1.5-I2V)

    def __post_init__(self):
        for part in ("transformer", "vae", "text_encoder"):  # read-only: a table entry is not a scratch dict
            object.__setattr__(self, part, MappingProxyType(dict(getattr(self, part))))

    @property
    def version(self) -> str:
        return version(self.transformer)

    @property
    def i2v(self) -> bool:
        return is_i2v(self.transformer)

    @property
    def hidden(self) -> int:
        return hidden_size(self.transformer)

    @property
    def scaling_factor(self) -> float:
        return self.vae["scaling_factor"]

    @property
    def released(self) -> bool:
        return self.hub_id is not None

    def preset(self) -> dict:
        """The entry as plain dicts: {transformer, vae, text_encoder: kwargs, snr_shift_scale}."""
        return dict(transformer=dict(self.transformer), vae=dict(self.vae), text_encoder=dict(self.text_encoder),
                    snr_shift_scale=self.snr_shift_scale)


_TABLE = (
    Variant("tiny", "tiny (CPU tests)", None, transformer=_TINY, vae=_VAE_TINY, text_encoder=_T5_TINY,
            snr_shift_scale=1.0, **_RULES_10, **_TINY_CLIP),
    # image-to-video: 16 noisy + 16 first-frame latent channels in
    Variant("tiny-i2v", "tiny image-to-video (CPU tests)", None, transformer=dict(_TINY, in_channels=32),
            vae=_VAE_TINY, text_encoder=_T5_TINY, snr_shift_scale=1.0, **_RULES_10, **_TINY_CLIP),
    # models/tiny-world: pretrained from scratch on the synthetic world by the demo's pretrain command
    Variant("tiny-world", "tiny-world", None, transformer=_TINY_WORLD, vae=_VAE_WORLD, text_encoder=_T5_WORLD,
            snr_shift_scale=1.0, **_RULES_10, **_TINY_CLIP),
    Variant("2b", "CogVideoX-2B", "THUDM/CogVideoX-2b", size="2B",
            transformer=dict(num_attention_heads=30, num_layers=30),  # 3D sin-cos positions (the defaults)
            vae=dict(_VAE_FULL, scaling_factor=1.15258426), text_encoder=_T5_XXL, snr_shift_scale=3.0,
            **_RULES_10, frames=49, height=480, width=720, fps=8, dtype="fp16"),
    Variant("5b", "CogVideoX-5B", "THUDM/CogVideoX-5b", size="5B",
            transformer=_5B, vae=_VAE_5B, text_encoder=_T5_XXL, snr_shift_scale=1.0,
            **_RULES_10, frames=49, height=480, width=720, fps=8, dtype="bf16"),
    # a learned position table: 49 frames at 480x720 only (see fixed_shape)
    Variant("5b-i2v", "CogVideoX-5B-I2V", "THUDM/CogVideoX-5b-I2V", size="5B",
            transformer=dict(_5B, in_channels=32, use_learned_positional_embeddings=True), vae=_VAE_5B,
            text_encoder=_T5_XXL, snr_shift_scale=1.0,
            **_RULES_10, frames=49, height=480, width=720, fps=8, dtype="bf16"),
    Variant("1.5-5b", "CogVideoX1.5-5B", "THUDM/CogVideoX1.5-5B", size="5B",
            transformer=_15, vae=_VAE_15, text_encoder=_T5_XXL, snr_shift_scale=1.0,
            **_RULES_15, frames=81, height=768, width=1360, fps=16, dtype="bf16"),
    Variant("1.5-5b-i2v", "CogVideoX1.5-5B-I2V", "THUDM/CogVideoX1.5-5B-I2V", size="5B",
            transformer=dict(_15, in_channels=32, ofs_embed_dim=512), vae=_VAE_15, text_encoder=_T5_XXL,
            snr_shift_scale=1.0, **_RULES_15, frames=81, height=768, width=1360, fps=16, dtype="bf16",
            min_side=768, max_side=1360),
)

VARIANTS: dict[str, Variant] = {v.name: v for v in _TABLE}
# the table as plain dicts, preset -> {transformer, vae, text_encoder, snr_shift_scale} (models.PRESETS)
PRESETS: dict[str, dict] = {v.name: v.preset() for v in _TABLE}


def variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise KeyError(f"unknown CogVideoX variant {name!r}: one of {', '.join(VARIANTS)}")
    return VARIANTS[name]


# --- reading a transformer config ------------------------------------------------------------------------------


def _get(transformer_config: Mapping, key: str):
    return transformer_config[key] if key in transformer_config else _TRANSFORMER_DEFAULTS[key]


def version(transformer_config: Mapping) -> str:
    """"1.0" or "1.5": CogVideoX 1.5 patches 2 latent frames together (patch_size_t), 1.0 does not."""
    return "1.0" if _get(transformer_config, "patch_size_t") is None else "1.5"


def is_i2v(transformer_config: Mapping) -> bool:
    """Image-to-video: the transformer takes the noisy and the first-frame latents, twice what it predicts.
    Missing keys (a table entry's kwargs) take the constructor defaults, an out_channels of None its 16."""
    out_channels = _get(transformer_config, "out_channels") or _TRANSFORMER_DEFAULTS["out_channels"]
    return _get(transformer_config, "in_channels") == 2 * out_channels


def hidden_size(transformer_config: Mapping) -> int:
    return _get(transformer_config, "num_attention_heads") * _get(transformer_config, "attention_head_dim")


def variant_for_hidden(hidden: int, version: str | None = None, i2v: bool | None = None) -> Variant | None:
    """The released variant of this hidden size (1920: 2B, 3072: 5B), the closest in version and mode; None for
    a custom size. SAT checkpoints are recognised this way: they store shapes, not scaling or shift."""
    candidates = [v for v in _TABLE if v.released and v.hidden == hidden]
    if not candidates:
        return None
    return max(candidates, key=lambda v: (v.version == version, v.i2v == i2v))  # the first of the best


def family_values(transformer_config: Mapping) -> dict:
    """What a transformer config read from SAT shapes does not say: the VAE's scaling_factor and
    invert_scale_latents and the schedule's snr_shift_scale, taken from the released variant of its hidden size
    (a custom size: CogVideoX-5B's). Every 1.5 VAE inverts its scaling."""
    ver = version(transformer_config)
    v = variant_for_hidden(hidden_size(transformer_config), ver, is_i2v(transformer_config)) or VARIANTS["5b"]
    return dict(scaling_factor=v.scaling_factor, snr_shift_scale=v.snr_shift_scale,
                invert_scale_latents=ver == "1.5")


def scheduler_config(of: float | str | Variant | Mapping) -> dict:
    """CogVideoXDDIMScheduler kwargs for an SNR shift, a variant (or its name) or a transformer config (the
    shift of its hidden size, see family_values)."""
    if isinstance(of, str):
        of = variant(of)
    if isinstance(of, Variant):
        shift = of.snr_shift_scale
    elif isinstance(of, Mapping):
        shift = family_values(of)["snr_shift_scale"]
    else:
        shift = float(of)
    return dict(_DDIM, snr_shift_scale=shift)


# --- frame and size rules --------------------------------------------------------------------------------------


def released_variant(transformer_config: Mapping) -> Variant | None:
    """The released model this transformer config is (same version, mode and hidden size), or None for a custom
    or scaled-down one. Its card's settings (inference dtype, default clip) then apply."""
    ver, i2v, hidden = version(transformer_config), is_i2v(transformer_config), hidden_size(transformer_config)
    return next((v for v in _TABLE if v.released and (v.version, v.i2v, v.hidden) == (ver, i2v, hidden)), None)


def rules(transformer_config: Mapping) -> Variant:
    """The released variant whose frame and size rules a transformer config follows: same version and mode."""
    ver, i2v = version(transformer_config), is_i2v(transformer_config)
    for v in _TABLE:
        if v.released and v.version == ver and v.i2v == i2v:
            return v
    raise ValueError(f"no released CogVideoX {ver}{' image-to-video' if i2v else ''} variant in the table")


def frame_rule(version: str) -> tuple[int, int]:
    """(multiple, max frames) of a version: frames must be multiple*N + 1 and at most max."""
    v = next((v for v in _TABLE if v.released and v.version == version), None)
    if v is None:
        raise ValueError(f"unknown CogVideoX version {version!r}")
    return v.frame_multiple, v.max_frames


def fixed_shape(transformer_config: Mapping) -> tuple[int, int, int] | None:
    """(frames, height, width) a learned position table fixes (CogVideoX-5B-I2V: 49 x 480 x 720), else None."""
    if not _get(transformer_config, "use_learned_positional_embeddings"):
        return None
    return (_get(transformer_config, "sample_frames"), _get(transformer_config, "sample_height") * VAE_SPATIAL,
            _get(transformer_config, "sample_width") * VAE_SPATIAL)


def side_limits(transformer_config: Mapping) -> tuple[int, int] | None:
    """(shorter side at least, longer side at most) where the variant limits them (1.5-I2V), else None. They are
    the model card's trained resolutions, so they bind the released model (its hidden size), not a scaled-down
    model of the same structure (test fixtures, the tiny presets)."""
    v = rules(transformer_config)
    if v.min_side is None or hidden_size(transformer_config) != v.hidden:
        return None
    return v.min_side, v.max_side


def shape_problems(transformer_config: Mapping, frames: int, height: int, width: int) -> list[tuple[str, str]]:
    """What is wrong with a (frames, height, width) clip for this transformer: [("frames" | "size", message)],
    in the order the rules are checked; [] when it fits."""
    ver, kind = version(transformer_config), rules(transformer_config)
    multiple, most = kind.frame_multiple, kind.max_frames
    out = []
    if (frames - 1) % multiple or frames > most:
        out.append(("frames", f"CogVideoX {ver} needs {multiple}N+1 frames, at most {most}; got {frames} "
                              f"(nearest valid: {max(1, (frames - 1) // multiple * multiple + 1)})"))
    if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE or min(height, width) <= 0:
        out.append(("size", f"height and width must be positive multiples of {SIZE_MULTIPLE} (VAE {VAE_SPATIAL}x "
                            f"times patch {PATCH}), got {height}x{width}"))
    limits = side_limits(transformer_config)
    if limits and not (min(height, width) >= limits[0] and max(height, width) <= limits[1]):
        out.append(("size", f"CogVideoX{'1.5' if ver == '1.5' else ''}-I2V needs the shorter side >= {limits[0]} "
                            f"and the longer <= {limits[1]}, got {height}x{width}"))
    fixed = fixed_shape(transformer_config)
    if fixed and (frames, height, width) != fixed:
        out.append(("frames", f"this model's learned positional embeddings fit only {fixed[0]} frames at "
                              f"{fixed[1]}x{fixed[2]}, got {frames} frames at {height}x{width}"))
    return out


def check_shape(transformer_config: Mapping, frames: int, height: int, width: int) -> None:
    """Raise ValueError with every rule the clip breaks (see shape_problems)."""
    problems = shape_problems(transformer_config, frames, height, width)
    if problems:
        raise ValueError("; ".join(message for _, message in problems))


def channel_problem(transformer_config: Mapping, vcfg: Mapping) -> str | None:
    """The transformer must take the VAE's latents (twice as many channels for image-to-video); None if it does."""
    latent = vcfg.get("latent_channels", LATENT_CHANNELS)
    i2v = is_i2v(transformer_config)
    want = latent * (2 if i2v else 1)
    if _get(transformer_config, "in_channels") == want:
        return None
    return (f"the transformer's in_channels ({_get(transformer_config, 'in_channels')}) must equal the VAE's "
            f"latent_channels "
            f"({latent}){' x 2 for image-to-video' if i2v else ''} = {want}")


# --- hub ids ---------------------------------------------------------------------------------------------------


def hub_id(preset: str) -> str | None:
    return variant(preset).hub_id


def preset_for_hub_id(pretrained: str | None) -> str | None:
    """The preset of a released model's hub id (the last path part, any case: a local copy named like it
    counts too); None when it names none."""
    if not pretrained:
        return None
    last = str(pretrained).rstrip("/").split("/")[-1].lower()
    return next((v.name for v in _TABLE if v.released and v.hub_id.split("/")[-1].lower() == last), None)


# --- the clip a model generates by default ---------------------------------------------------------------------


def vae_spatial_scale(vae_config: Mapping) -> int:
    """How many pixels one latent pixel spans: 2 ** (levels - 1), as the diffusers pipelines compute it (8 for the
    released VAE, 4 for tiny-world's three levels)."""
    return 2 ** (len(vae_config.get("block_out_channels", (128, 256, 256, 512))) - 1)


def size_for_image(image_width: int, image_height: int, shorter: int, longest: int) -> tuple[int, int]:
    """(height, width) for an image under the 1.5-I2V card's rule: the shorter side `shorter`, the aspect kept, the
    longer side at most `longest`, both multiples of 16 (the nearest multiple, clamped to the limits)."""
    portrait = image_height > image_width
    short_px, long_px = (image_width, image_height) if portrait else (image_height, image_width)
    other = round(shorter * long_px / short_px / SIZE_MULTIPLE) * SIZE_MULTIPLE
    other = max(shorter, min(longest // SIZE_MULTIPLE * SIZE_MULTIPLE, other))
    return (other, shorter) if portrait else (shorter, other)


def default_clip(transformer_config: Mapping, vae_config: Mapping, image_size: tuple[int, int] | None = None,
                 fps: int | None = None) -> dict:
    """{frames, height, width, fps} a model generates unless told otherwise.

    A released model (its version, mode and hidden size): its card's (1.0: 49 frames at 480x720, 8 fps; 1.5: 81 at
    768x1360, 16 fps); 1.5-I2V takes the size from the image (`image_size` = (width, height)) within its card's
    side limits. Any other model (tiny-world, scaled-down test models): what it was trained at, as its transformer
    config says (sample_frames; sample_height/width x the VAE's spatial scale), at `fps` when its folder records
    one, else its version's."""
    card = released_variant(transformer_config)
    if card is not None:
        clip = dict(frames=card.frames, height=card.height, width=card.width, fps=card.fps)
        limits = side_limits(transformer_config)
        if limits and image_size is not None:
            clip["height"], clip["width"] = size_for_image(*image_size, *limits)
        return clip
    scale = vae_spatial_scale(vae_config)
    return dict(frames=_get(transformer_config, "sample_frames"),
                height=_get(transformer_config, "sample_height") * scale,
                width=_get(transformer_config, "sample_width") * scale, fps=fps or rules(transformer_config).fps)
