"""What a checkpoint is, from its files and tensor shapes alone (docs/design.md, "SAT checkpoints").

What the shapes do not say (VAE scaling, schedule shift) comes from the family table: cogpipe/family.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .. import family
from ..family import family_values, is_i2v, scheduler_config  # noqa: F401 (detect's API, read from the table)
from ..weights import open_state_dict, read_safetensors
from .mapping import SAT_PREFIX


class ConversionError(ValueError):
    """The input cannot be converted; the message names the file, key or rule."""


# --- what the source is ------------------------------------------------------------------------------------------


def is_lora_key(k: str) -> bool:
    return ".matrix_A." in k or ".matrix_B." in k or ".lora_A." in k or ".lora_B." in k


def _sat_dir(p: Path) -> bool:
    return (p / "latest").is_file() or any(p.glob("*/mp_rank_00_model_states.pt"))


NATIVE_MARK = "blocks.0.norm1.linear.weight"  # what ComfyUI's model_detection recognises its CogVideoX port by
NATIVE_PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # checkpoint / LoRA prefixes ComfyUI strips
NATIVE_CONFIG_META = "cogpipe_diffusers_config"  # safetensors metadata: the Diffusers config a native file came from


def native_prefix(keys) -> str | None:
    """The prefix under which `keys` hold ComfyUI's native CogVideoX transformer ("" for bare keys); None when
    they do not."""
    keys = set(keys)
    return next((p for p in ("", *NATIVE_PREFIXES) if p + NATIVE_MARK in keys), None)


def source_kind(src: Path) -> tuple[str, str]:
    """-> (format, kind): format "sat" | "diffusers" | "comfyui" (ComfyUI core's native keys), kind "transformer" |
    "vae" | "lora" | "pipeline"."""
    if not src.exists():
        raise ConversionError(f"{src}: no such file or folder")
    if src.is_dir():
        if (src / "model_index.json").is_file():
            return "diffusers", "pipeline"
        if (src / "config.json").is_file():
            cls = json.loads((src / "config.json").read_text()).get("_class_name")
            kinds = {"CogVideoXTransformer3DModel": "transformer", "AutoencoderKLCogVideoX": "vae"}
            if cls not in kinds:
                raise ConversionError(f"{src / 'config.json'}: _class_name {cls!r} is not a CogVideoX "
                                      f"transformer or VAE")
            return "diffusers", kinds[cls]
        if (src / "transformer").is_dir() or (src / "vae").is_dir():
            return "sat", "pipeline"
        if _sat_dir(src):
            return "sat", sat_kind(open_state_dict(src, master_weights=False), src)
        files = [f for f in src.iterdir() if f.suffix in (".safetensors", ".pt", ".pth", ".ckpt", ".bin")]
        if len(files) == 1:
            return source_kind(files[0])
        raise ConversionError(f"{src}: not a SAT checkpoint folder (no `latest`), Diffusers folder (no config.json "
                              f"or model_index.json) or single weights file")
    if src.suffix == ".safetensors":
        keys = read_safetensors(src)[0]
        if keys and all(is_lora_key(k) for k in keys):
            return "diffusers", "lora"
        if native_prefix(keys) is not None:
            return "comfyui", "transformer"
        if any(k.startswith(("lora_unet_", "diffusion_model.")) for k in keys):
            raise ConversionError(f"{src}: a LoRA in ComfyUI keys; pass it to infer.py --lora as it is (cogpipe "
                                  f"convert writes LoRAs from SAT and Diffusers keys)")
        raise ConversionError(f"{src}: a Diffusers weights file without its config.json: pass the folder holding "
                              f"both (transformer/ or vae/)")
    return "sat", sat_kind(open_state_dict(src, master_weights=False), src)


def sat_kind(module: dict, src) -> str:
    keys = list(module)
    if any(k.startswith(SAT_PREFIX) or k.startswith(("transformer.layers.", "mixins.")) for k in keys):
        body = [k for k in keys if k.startswith(SAT_PREFIX)] or keys
        return "lora" if all(is_lora_key(k) for k in body) else "transformer"
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in keys):
        return "vae"
    raise ConversionError(f"{src}: not a CogVideoX SAT checkpoint: no model.diffusion_model.* transformer keys and "
                          f"no encoder.down.*/decoder.up.* VAE keys (first keys: {keys[:5]})")


# Parts of a SAT engine save that are not the transformer: ignored by prefix, with the reason.
SAT_EXTRAS = {
    "conditioner.": "T5 text encoder of the SAT engine; the Diffusers pipeline takes it from --text-encoder",
    "first_stage_model.": "VAE inside the SAT engine save; the VAE converts from vae/3d-vae.pt",
}


def split_sat(module: dict) -> tuple[dict, list[dict]]:
    """SAT module -> ({transformer key without prefix: tensor}, ignored groups [{prefix, count, reason}])."""
    if not any(k.startswith(SAT_PREFIX) for k in module):  # a bare transformer state dict
        return dict(module), []
    return split_prefixed(module, SAT_PREFIX, SAT_EXTRAS)


def split_prefixed(tensors: dict, prefix: str, extras: dict) -> tuple[dict, list[dict]]:
    """({key under `prefix`, prefix removed: tensor}, ignored groups [{prefix, count, reason}]): every other key is
    counted in its group, a known one of `extras` (prefix -> why it is not the transformer's) or its first part."""
    body, ignored = {}, {}
    for k, v in tensors.items():
        if k.startswith(prefix):
            body[k[len(prefix):]] = v
        else:
            group = next((p for p in extras if k.startswith(p)), k.split(".")[0] + ".")
            ignored[group] = ignored.get(group, 0) + 1
    reasons = [{"prefix": p, "count": n, "reason": extras.get(p, f"not under {prefix or 'the model'}; not part of "
                                                                 f"the transformer")} for p, n in ignored.items()]
    return body, reasons


# --- transformer config from SAT shapes ----------------------------------------------------------------------------


def _need(shapes: dict, key: str, src) -> tuple:
    if key not in shapes:
        raise ConversionError(f"{src}: not a CogVideoX SAT transformer: {key} is missing")
    return shapes[key]


def transformer_config(shapes: dict[str, tuple], src="checkpoint") -> dict:
    """Diffusers CogVideoXTransformer3DModel kwargs from SAT key -> shape (prefix removed, no LoRA keys)."""
    proj = _need(shapes, "mixins.patch_embed.proj.weight", src)
    v15 = len(proj) == 2  # 1.0: Conv2d [H, C, p, p]; 1.5: Linear [H, C * p_t * p * p]
    hidden = proj[0]
    patch, patch_t = (2, 2) if v15 else (proj[2], None)
    in_ch = proj[1] // (patch * patch * patch_t) if v15 else proj[1]
    out_ch = _need(shapes, "mixins.final_layer.linear.weight", src)[0] // (patch * patch * (patch_t or 1))
    head_dim = _need(shapes, "mixins.adaln_layer.query_layernorm_list.0.weight", src)[0]
    layers = 1 + max((int(m.group(1)) for k in shapes if (m := re.match(r"transformer\.layers\.(\d+)\.", k))),
                     default=-1)
    if layers == 0:
        raise ConversionError(f"{src}: not a CogVideoX SAT transformer: no transformer.layers.N keys")
    has_table = "mixins.pos_embed.pos_embedding" in shapes
    # A sin-cos (2B) model always stores its table; RoPE models store freqs or SAT's unused position table.
    rope = v15 or "mixins.pos_embed.freqs_sin" in shapes or any(
        k.startswith("transformer.position_embeddings.") for k in shapes) or not has_table
    ofs = shapes.get("ofs_embed.0.weight")
    cfg = dict(
        num_attention_heads=hidden // head_dim, attention_head_dim=head_dim, in_channels=in_ch,
        out_channels=out_ch, time_embed_dim=_need(shapes, "time_embed.0.weight", src)[0],
        ofs_embed_dim=ofs[1] if ofs else None,
        text_embed_dim=_need(shapes, "mixins.patch_embed.text_proj.weight", src)[1], num_layers=layers,
        patch_size=patch, patch_size_t=patch_t, max_text_seq_length=226,
        use_rotary_positional_embeddings=rope, use_learned_positional_embeddings=bool(not v15 and rope and has_table),
        attention_bias="transformer.layers.0.attention.query_key_value.bias" in shapes,
        patch_bias=False if v15 else "mixins.patch_embed.proj.bias" in shapes,
    )
    cfg.update(dict(sample_height=300, sample_width=300, sample_frames=81) if v15
               else dict(sample_height=60, sample_width=90, sample_frames=49))
    return cfg


def model_name(cfg: dict) -> str:
    """E.g. "CogVideoX1.5-5B-I2V (RoPE)": version, size (by hidden size), mode and position embedding."""
    hidden = family.hidden_size(cfg)
    name = "CogVideoX1.5" if family.version(cfg) == "1.5" else "CogVideoX"
    known = family.variant_for_hidden(hidden)
    size = known.size if known else f"custom(hidden={hidden}, layers={cfg['num_layers']})"
    i2v = "-I2V" if is_i2v(cfg) else ""
    pos = "RoPE" if cfg.get("use_rotary_positional_embeddings") else "3D sin-cos"
    if cfg.get("use_learned_positional_embeddings"):
        pos += " + learned"
    return f"{name}-{size}{i2v} ({pos})"


# --- transformer config from ComfyUI-native shapes -----------------------------------------------------------------


def native_config(shapes: dict[str, tuple], metadata: dict | None = None, src="checkpoint",
                  given: dict | None = None) -> dict:
    """Diffusers CogVideoXTransformer3DModel kwargs of a ComfyUI-native transformer (key -> shape, no prefix).

    A file cogpipe wrote carries its Diffusers config in the metadata (NATIVE_CONFIG_META): that is used. Otherwise
    the shapes say it, as ComfyUI's model_detection reads them, except that the head width is read from norm_q
    (ComfyUI assumes 64) and the position table is read as the Diffusers models use it: none -> RoPE; a table in
    an image-to-video 1.0 model -> learned table + RoPE (CogVideoX-5B-I2V); a table otherwise -> 3D sin-cos
    (CogVideoX-2B, whose table Diffusers recomputes). `given`: values that override what is read."""
    given = dict(given or {})
    if metadata and NATIVE_CONFIG_META in metadata:
        try:
            return {**json.loads(metadata[NATIVE_CONFIG_META]), **given}
        except ValueError as e:
            raise ConversionError(f"{src}: metadata {NATIVE_CONFIG_META} is not JSON: {e}") from None
    norm1 = _need(shapes, NATIVE_MARK, src)
    proj = _need(shapes, "patch_embed.proj.weight", src)
    v15 = len(proj) == 2  # 1.0: Conv2d [H, C, p, p]; 1.5: Linear [H, C * p_t * p * p]
    patch, patch_t = (2, 2) if v15 else (proj[2], None)
    in_ch = proj[1] // (patch * patch * patch_t) if v15 else proj[1]
    head_dim = _need(shapes, "blocks.0.norm_q.weight", src)[0]
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k)))
    ofs = shapes.get("ofs_embedding_linear_1.weight")
    table = shapes.get("patch_embed.pos_embedding")
    learned = table is not None and not v15 and in_ch > family.LATENT_CHANNELS
    cfg = dict(
        num_attention_heads=norm1[0] // 6 // head_dim, attention_head_dim=head_dim, in_channels=in_ch,
        out_channels=_need(shapes, "proj_out.weight", src)[0] // (patch * patch * (patch_t or 1)),
        time_embed_dim=norm1[1], ofs_embed_dim=ofs[1] if ofs else None,
        text_embed_dim=_need(shapes, "patch_embed.text_proj.weight", src)[1], num_layers=layers,
        patch_size=patch, patch_size_t=patch_t, use_rotary_positional_embeddings=table is None or learned,
        use_learned_positional_embeddings=learned,
        patch_bias=False if v15 else "patch_embed.proj.bias" in shapes,
    )
    cfg.update(dict(sample_height=300, sample_width=300, sample_frames=81) if v15
               else dict(sample_height=60, sample_width=90, sample_frames=49))
    cfg.update(given)
    if learned and "max_text_seq_length" not in given:  # the table: the text length plus the sample size's patches
        frames = (cfg["sample_frames"] - 1) // family.VAE_TEMPORAL + 1
        patches = frames * (cfg["sample_height"] // patch) * (cfg["sample_width"] // patch)
        cfg["max_text_seq_length"] = table[1] - patches
    return cfg


# --- VAE config from SAT shapes ------------------------------------------------------------------------------------


def vae_config(shapes: dict[str, tuple], src="checkpoint") -> dict:
    down = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    up = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"decoder\.up\.(\d+)\.", k))})
    if not down or len(up) != len(down):
        raise ConversionError(f"{src}: not a CogVideoX SAT VAE: {len(down)} encoder.down blocks, "
                              f"{len(up)} decoder.up blocks")
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    return dict(
        in_channels=_need(shapes, "encoder.conv_in.conv.weight", src)[1],
        out_channels=_need(shapes, "decoder.conv_out.conv.weight", src)[0],
        down_block_types=["CogVideoXDownBlock3D"] * len(down), up_block_types=["CogVideoXUpBlock3D"] * len(up),
        block_out_channels=[_need(shapes, f"encoder.down.{i}.block.0.conv1.conv.weight", src)[0] for i in down],
        latent_channels=_need(shapes, "decoder.conv_in.conv.weight", src)[1], layers_per_block=len(blocks),
    )
