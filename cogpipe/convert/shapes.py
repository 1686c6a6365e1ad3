"""What the Diffusers classes a conversion targets need, as data and arithmetic: constructor defaults, the state
dict's keys and shapes, the config.json `from_config` would write, and the frozen sin-cos table of 2B.

A conversion validates against these instead of instantiating the classes, so it never imports diffusers
(~4 s on a small machine). tests/convert/test_shapes.py checks every rule against the real classes on the meta
device for each CogVideoX version and the VAE; a diffusers release that changes a class fails that test.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import torch

from .detect import ConversionError

TRANSFORMER = "CogVideoXTransformer3DModel"
VAE = "AutoencoderKLCogVideoX"
SCHEDULER = "CogVideoXDDIMScheduler"

# __init__ defaults, in signature order (diffusers 0.3x-0.4x; tests/convert/test_shapes.py compares them)
DEFAULTS: dict[str, dict[str, Any]] = {
    TRANSFORMER: dict(
        num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16, flip_sin_to_cos=True,
        freq_shift=0, time_embed_dim=512, ofs_embed_dim=None, text_embed_dim=4096, num_layers=30, dropout=0.0,
        attention_bias=True, sample_width=90, sample_height=60, sample_frames=49, patch_size=2, patch_size_t=None,
        temporal_compression_ratio=4, max_text_seq_length=226, activation_fn="gelu-approximate",
        timestep_activation_fn="silu", norm_elementwise_affine=True, norm_eps=1e-5, spatial_interpolation_scale=1.875,
        temporal_interpolation_scale=1.0, use_rotary_positional_embeddings=False,
        use_learned_positional_embeddings=False, patch_bias=True),
    VAE: dict(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(128, 256, 256, 512), latent_channels=16,
        layers_per_block=3, act_fn="silu", norm_eps=1e-6, norm_num_groups=32, temporal_compression_ratio=4,
        sample_height=480, sample_width=720, scaling_factor=1.15258426, shift_factor=None, latents_mean=None,
        latents_std=None, force_upcast=True, use_quant_conv=False, use_post_quant_conv=False,
        invert_scale_latents=False),
    SCHEDULER: dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        trained_betas=None, clip_sample=True, set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon",
        clip_sample_range=1.0, sample_max_value=1.0, timestep_spacing="leading", rescale_betas_zero_snr=False,
        snr_shift_scale=3.0),
}

# FeedForward's first projection: activation -> output rows as a multiple of the inner width (GLUs double it)
_FF_PROJ = {"gelu": 1, "gelu-approximate": 1, "geglu": 2, "geglu-approximate": 1, "swiglu": 2, "linear-silu": 1}


def diffusers_version() -> str:
    """The installed diffusers' version, read from its metadata (importing diffusers is what this module avoids)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        return "0.32.0"  # the first release with every CogVideoX class


def full_config(cls_name: str, cfg: Mapping) -> dict:
    """The config `cls.from_config(cfg)` registers: every constructor argument (given or default) plus the keys it
    does not know, which diffusers keeps beside them."""
    used_defaults = set(cfg.get("_use_default_values", ()))
    given = {k: v for k, v in cfg.items() if k not in used_defaults and k != "_use_default_values"}
    init = {k: given.get(k, d) for k, d in DEFAULTS[cls_name].items()}
    extra = {k: v for k, v in given.items() if k not in init and k not in ("_ignore_files", "_pre_quantization_dtype")}
    return {**extra, **init, "_class_name": cls_name, "_diffusers_version": diffusers_version()}


def config_json(cls_name: str, cfg: Mapping) -> str:
    """config.json as `cls.from_config(cfg).save_config()` writes it."""
    return json.dumps(full_config(cls_name, cfg), indent=2, sort_keys=True) + "\n"


def _linear(out: dict, name: str, n_out: int, n_in: int, bias: bool = True) -> None:
    out[f"{name}.weight"] = (n_out, n_in)
    if bias:
        out[f"{name}.bias"] = (n_out,)


def _norm(out: dict, name: str, n: int, affine: bool = True) -> None:
    if affine:
        out[f"{name}.weight"], out[f"{name}.bias"] = (n,), (n,)


def transformer_shapes(cfg: Mapping) -> dict[str, tuple[int, ...]]:
    """CogVideoXTransformer3DModel's state dict, key -> shape, for a full config (see full_config)."""
    c = cfg
    heads, head_dim, t = c["num_attention_heads"], c["attention_head_dim"], c["time_embed_dim"]
    inner, p, pt, affine = heads * head_dim, c["patch_size"], c["patch_size_t"], c["norm_elementwise_affine"]
    if c["use_learned_positional_embeddings"] and not c["use_rotary_positional_embeddings"]:
        raise ConversionError("learned positional embeddings without rotary ones: no CogVideoX model has them "
                              "(Diffusers refuses the config)")
    if c["activation_fn"] not in _FF_PROJ:
        raise ConversionError(f"activation_fn {c['activation_fn']!r}: not one Diffusers' FeedForward knows "
                              f"({', '.join(_FF_PROJ)})")
    s: dict[str, tuple[int, ...]] = {}
    if pt is None:  # 1.0: Conv2d over p x p patches; 1.5: Linear over p_t x p x p (always with a bias)
        s["patch_embed.proj.weight"] = (inner, c["in_channels"], p, p)
        if c["patch_bias"]:
            s["patch_embed.proj.bias"] = (inner,)
    else:
        _linear(s, "patch_embed.proj", inner, c["in_channels"] * p * p * pt)
    _linear(s, "patch_embed.text_proj", inner, c["text_embed_dim"])
    if c["use_learned_positional_embeddings"]:  # the sin-cos table is a non-persistent buffer otherwise
        frames = (c["sample_frames"] - 1) // c["temporal_compression_ratio"] + 1
        patches = (c["sample_height"] // p) * (c["sample_width"] // p) * frames
        s["patch_embed.pos_embedding"] = (1, c["max_text_seq_length"] + patches, inner)
    _linear(s, "time_embedding.linear_1", t, inner)
    _linear(s, "time_embedding.linear_2", t, t)
    if c["ofs_embed_dim"]:
        ofs = c["ofs_embed_dim"]
        _linear(s, "ofs_embedding.linear_1", ofs, ofs)
        _linear(s, "ofs_embedding.linear_2", ofs, ofs)
    ff = 4 * inner
    for i in range(c["num_layers"]):
        b = f"transformer_blocks.{i}."
        for norm in ("norm1", "norm2"):
            _linear(s, b + norm + ".linear", 6 * inner, t)
            _norm(s, b + norm + ".norm", inner, affine)
        _norm(s, b + "attn1.norm_q", head_dim)
        _norm(s, b + "attn1.norm_k", head_dim)
        for proj in ("to_q", "to_k", "to_v"):
            _linear(s, b + "attn1." + proj, inner, inner, c["attention_bias"])
        _linear(s, b + "attn1.to_out.0", inner, inner)
        _linear(s, b + "ff.net.0.proj", _FF_PROJ[c["activation_fn"]] * ff, inner)
        _linear(s, b + "ff.net.2", inner, ff)
    _norm(s, "norm_final", inner, affine)
    _linear(s, "norm_out.linear", 2 * inner, t)
    _norm(s, "norm_out.norm", inner, affine)
    _linear(s, "proj_out", p * p * (pt or 1) * c["out_channels"], inner)
    return s


def _conv(out: dict, name: str, n_out: int, n_in: int, kernel: tuple[int, ...]) -> None:
    out[f"{name}.weight"], out[f"{name}.bias"] = (n_out, n_in, *kernel), (n_out,)


def _resnet(s: dict, name: str, n_in: int, n_out: int, zq: int | None) -> None:
    """CogVideoXResnetBlock3D without a time embedding; zq: the spatial norm's latent channels (decoder)."""
    for norm, n in (("norm1", n_in), ("norm2", n_out)):
        if zq is None:
            _norm(s, f"{name}.{norm}", n)
        else:
            _norm(s, f"{name}.{norm}.norm_layer", n)
            _conv(s, f"{name}.{norm}.conv_y.conv", n, zq, (1, 1, 1))
            _conv(s, f"{name}.{norm}.conv_b.conv", n, zq, (1, 1, 1))
    _conv(s, f"{name}.conv1.conv", n_out, n_in, (3, 3, 3))
    _conv(s, f"{name}.conv2.conv", n_out, n_out, (3, 3, 3))
    if n_in != n_out:
        _conv(s, f"{name}.conv_shortcut", n_out, n_in, (1, 1, 1))


def vae_shapes(cfg: Mapping) -> dict[str, tuple[int, ...]]:
    """AutoencoderKLCogVideoX's state dict, key -> shape, for a full config (see full_config)."""
    channels, layers = list(cfg["block_out_channels"]), cfg["layers_per_block"]
    latent, down, up = cfg["latent_channels"], list(cfg["down_block_types"]), list(cfg["up_block_types"])
    if set(down) - {"CogVideoXDownBlock3D"} or set(up) - {"CogVideoXUpBlock3D"}:
        raise ConversionError(f"block types {sorted(set(down + up))}: Diffusers' CogVideoX VAE has only "
                              f"CogVideoXDownBlock3D and CogVideoXUpBlock3D")
    if not channels or len(down) > len(channels) or len(up) > len(channels):
        raise ConversionError(f"{len(down)} down and {len(up)} up blocks for {len(channels)} block_out_channels")
    s: dict[str, tuple[int, ...]] = {}
    _conv(s, "encoder.conv_in.conv", channels[0], cfg["in_channels"], (3, 3, 3))
    n_out = channels[0]
    for i in range(len(down)):
        n_in, n_out = n_out, channels[i]
        for j in range(layers):
            _resnet(s, f"encoder.down_blocks.{i}.resnets.{j}", n_in if j == 0 else n_out, n_out, None)
        if i != len(channels) - 1:
            _conv(s, f"encoder.down_blocks.{i}.downsamplers.0.conv", n_out, n_out, (3, 3))
    for j in range(2):
        _resnet(s, f"encoder.mid_block.resnets.{j}", channels[-1], channels[-1], None)
    _norm(s, "encoder.norm_out", channels[-1])
    _conv(s, "encoder.conv_out.conv", 2 * latent, channels[-1], (3, 3, 3))
    rev = channels[::-1]
    _conv(s, "decoder.conv_in.conv", rev[0], latent, (3, 3, 3))
    for j in range(2):
        _resnet(s, f"decoder.mid_block.resnets.{j}", rev[0], rev[0], latent)
    n_out = rev[0]
    for i in range(len(up)):
        n_in, n_out = n_out, rev[i]
        for j in range(layers + 1):
            _resnet(s, f"decoder.up_blocks.{i}.resnets.{j}", n_in if j == 0 else n_out, n_out, latent)
        if i != len(channels) - 1:
            _conv(s, f"decoder.up_blocks.{i}.upsamplers.0.conv", n_out, n_out, (3, 3))
    _norm(s, "decoder.norm_out.norm_layer", rev[-1])
    _conv(s, "decoder.norm_out.conv_y.conv", rev[-1], latent, (1, 1, 1))
    _conv(s, "decoder.norm_out.conv_b.conv", rev[-1], latent, (1, 1, 1))
    _conv(s, "decoder.conv_out.conv", cfg["out_channels"], rev[-1], (3, 3, 3))
    oc = cfg["out_channels"]  # sic: Diffusers sizes the quant convs by the image channels
    if cfg["use_quant_conv"]:
        _conv(s, "quant_conv", 2 * oc, 2 * oc, (1, 1, 1))
    if cfg["use_post_quant_conv"]:
        _conv(s, "post_quant_conv", oc, oc, (1, 1, 1))
    return s


_SHAPES = {TRANSFORMER: transformer_shapes, VAE: vae_shapes}


def expected_shapes(cls_name: str, cfg: Mapping) -> tuple[dict[str, tuple[int, ...]], str]:
    """-> ({key: shape} the Diffusers class needs for `cfg`, the config.json it would write)."""
    full = full_config(cls_name, cfg)
    try:
        shapes = _SHAPES[cls_name](full)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ConversionError):
            raise
        raise ConversionError(f"{cls_name} config {dict(cfg)}: {type(e).__name__}: {e}") from None
    return shapes, json.dumps(full, indent=2, sort_keys=True) + "\n"


def scheduler_json(**kwargs) -> str:
    """scheduler_config.json of CogVideoXDDIMScheduler(**kwargs), as save_pretrained writes it."""
    return config_json(SCHEDULER, kwargs)


# --- the frozen 3D sin-cos table (2B), as CogVideoXPatchEmbed computes it ---------------------------------------


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = torch.arange(dim // 2, dtype=torch.float64)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega
    out = torch.outer(pos.reshape(-1), omega)
    return torch.concat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embedding(cfg: Mapping) -> torch.Tensor:
    """[1, max_text_seq_length + patches, hidden] (text rows zero), float64: diffusers' get_3d_sincos_pos_embed
    step for step, so the table SAT keeps comes out bit for bit."""
    c = full_config(TRANSFORMER, cfg)
    dim, p = c["num_attention_heads"] * c["attention_head_dim"], c["patch_size"]
    if dim % 16:
        raise ConversionError(f"a 3D sin-cos table needs a hidden size divisible by 16, not {dim}")
    h, w = c["sample_height"] // p, c["sample_width"] // p
    frames = (c["sample_frames"] - 1) // c["temporal_compression_ratio"] + 1
    spatial, temporal = 3 * dim // 4, dim // 4
    grid_h = torch.arange(h, dtype=torch.float32) / c["spatial_interpolation_scale"]
    grid_w = torch.arange(w, dtype=torch.float32) / c["spatial_interpolation_scale"]
    grid = torch.stack(torch.meshgrid(grid_w, grid_h, indexing="xy"), dim=0).reshape([2, 1, h, w])
    pos_spatial = torch.concat([_sincos_1d(spatial // 2, grid[0]), _sincos_1d(spatial // 2, grid[1])], dim=1)
    pos_t = _sincos_1d(temporal, torch.arange(frames, dtype=torch.float32) / c["temporal_interpolation_scale"])
    pos_spatial = pos_spatial[None].repeat_interleave(frames, dim=0, output_size=frames)
    pos_t = pos_t[:, None, :].repeat_interleave(h * w, dim=1)
    pos = torch.concat([pos_t, pos_spatial], dim=-1).flatten(0, 1)
    table = pos.new_zeros(1, c["max_text_seq_length"] + pos.shape[0], dim)
    table[:, c["max_text_seq_length"]:].copy_(pos)
    return table
