"""Fitting weights to a model: one diagnosis per mismatched key, I2V initialisation, loading."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping

import torch

from .. import family
from .errors import CheckpointError, WeightsMismatchError
from .sources import load_state_dict


def _size_name(hidden: int) -> str | None:
    """"CogVideoX-2B" for 1920, "CogVideoX-5B" for 3072 (the family table's released sizes), else None."""
    v = family.variant_for_hidden(hidden)
    return f"CogVideoX-{v.size}" if v else None


def _patch_in_channels(shape) -> int:
    return shape[1] if len(shape) == 4 else shape[1] // 8  # 1.5: Linear over (C, patch_t=2, 2, 2)


def diagnose(key: str, file_shape, model_shape) -> str:
    """One message for a shape mismatch: key, both shapes, the likely cause and the fix."""
    fs, mshape = tuple(file_shape), tuple(model_shape)
    head = f"{key}: the file has shape {fs}, the model expects {mshape}."
    version = {4: "CogVideoX 1.0 (Conv2d patch embedding, patch_size_t=None)",
               2: "CogVideoX1.5 (Linear patch embedding, patch_size_t=2)"}
    if key.endswith("patch_embed.proj.weight"):
        if len(fs) != len(mshape):
            return (f"{head} Likely cause: 1.0 vs 1.5 patch embedding: the file is {version.get(len(fs), fs)}, "
                    f"the model is {version.get(len(mshape), mshape)}. Fix: build the model with the config of the "
                    f"checkpoint's version (its config.json, or patch_size_t={'2' if len(fs) == 2 else 'None'}).")
        fc, mc = _patch_in_channels(fs), _patch_in_channels(mshape)
        if fs[0] == mshape[0] and fc == 2 * mc:
            return (f"{head} Likely cause: image-to-video weights (in_channels={fc}: noisy + image latents) "
                    f"loaded into a text-to-video model (in_channels={mc}). Fix: build an I2V model "
                    f"(in_channels={fc}, e.g. the -I2V preset) or use text-to-video weights.")
        if fs[0] == mshape[0] and mc == 2 * fc:
            return (f"{head} Likely cause: text-to-video weights (in_channels={fc}) loaded into an image-to-video "
                    f"model (in_channels={mc}). Fix: to start I2V fine-tuning from T2V weights, initialise the "
                    f"image-latent channels at zero with cogpipe.weights.expand_patch_embed_for_i2v(state_dict) "
                    f"or load_into(model, ..., init_i2v=True).")
    if key.endswith("pos_embedding"):
        return (f"{head} Likely cause: the learned positional embedding covers {fs[1] if len(fs) > 1 else fs} "
                f"positions, the model {mshape[1] if len(mshape) > 1 else mshape}: sample_height/sample_width/"
                f"sample_frames or max_text_seq_length differ (CogVideoX-5B-I2V: 60x90x49, 226 text tokens). "
                f"Fix: use the checkpoint's config.json values.")
    for a, b in zip(fs, mshape):
        if a != b and (_size_name(a) or _size_name(b)):
            return (f"{head} Likely cause: wrong model size: the file has hidden {a} ({_size_name(a) or 'custom'}),"
                    f" the model {b} ({_size_name(b) or 'custom'}). Fix: build the model from the checkpoint's "
                    f"config.json or the matching preset.")
    if key.endswith(("proj_out.weight", "proj_out.bias")):
        return (f"{head} Likely cause: out_channels or patch_size_t differ (1.5 predicts 2 frames per patch). "
                f"Fix: use the checkpoint's config.json.")
    return (f"{head} Likely cause: wrong model size or variant for this checkpoint. Fix: build the model from "
            f"the checkpoint's config.json (or the matching preset) instead of a hand-written config.")


def _diagnose_keys(missing: list[str], unexpected: list[str]) -> list[str]:
    notes = []
    if any(k.startswith(("model.diffusion_model.", "transformer.layers.", "mixins.")) for k in unexpected):
        notes.append("the file holds SAT keys (model.diffusion_model.*, transformer.layers.*): convert it first "
                     "with `cogpipe convert SRC DST`")
    if any(".lora_A." in k or ".lora_B." in k or "matrix_A" in k for k in unexpected):
        notes.append("the file holds LoRA weights: load them with pipe.load_lora_weights(...) / "
                     "cogpipe.lora, not as model weights")
    for pre in ("module.", "transformer.", "model.", "base_model.model.", "_orig_mod."):
        if unexpected and missing and all(k.startswith(pre) for k in unexpected) and \
                any(k[len(pre):] in set(missing) for k in unexpected):
            notes.append(f"every key carries the prefix {pre!r}: strip it (it comes from a wrapper such as "
                         f"DDP, a pipeline or torch.compile)")
            break
    if "patch_embed.pos_embedding" in missing:
        notes.append("patch_embed.pos_embedding is missing: only CogVideoX-5B-I2V has learned positional "
                     "embeddings; when starting I2V from T2V weights build the model with "
                     "use_learned_positional_embeddings=False")
    if any(k.startswith("ofs_embedding.") for k in missing):
        notes.append("ofs_embedding is missing: only CogVideoX1.5-I2V has it; set ofs_embed_dim=None for other "
                     "checkpoints")
    return notes


def expand_patch_embed_for_i2v(state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None) -> dict:
    """Initialise a text-to-video state dict for image-to-video fine-tuning.

    The patch embedding gets `in_channels` input channels (default: twice the file's): the first channels keep
    their weights, the image-latent channels start at zero, so the model's output is unchanged until training
    moves them. Works on Diffusers and SAT key names, CogVideoX 1.0 (Conv2d) and 1.5 (Linear over C x 2 x 2 x 2).
    """
    out = dict(state_dict)
    keys = [k for k in out if k.endswith("patch_embed.proj.weight")]
    if not keys:
        raise CheckpointError("expand_patch_embed_for_i2v: no '*patch_embed.proj.weight' in the state dict")
    for k in keys:
        w = out[k]
        c = _patch_in_channels(tuple(w.shape))
        target = in_channels or 2 * c
        if target == c:
            continue
        if target < c:
            raise CheckpointError(f"{k}: has {c} input channels, cannot shrink to {target}")
        if w.dim() == 4:  # [H, C, p, p]
            new = w.new_zeros(w.shape[0], target, *w.shape[2:])
            new[:, :c] = w
        else:  # [H, C * 8], channel-major
            per = w.shape[1] // c
            new = w.new_zeros(w.shape[0], target * per)
            new[:, : c * per] = w
        out[k] = new
    return out


@dataclass
class LoadResult:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def load_into(model: torch.nn.Module, source, *, strict: bool = True, init_i2v: bool = False,
              sha256: str | bool | None = None, assign: bool = False) -> LoadResult:
    """Load `source` (a state dict or any path load_state_dict reads) into `model`.

    Before anything is copied every shape is checked; mismatches raise WeightsMismatchError with one diagnosis
    per key (see `diagnose`). strict: missing or unexpected keys also raise, with hints. init_i2v: expand a
    text-to-video patch embedding to the model's input channels first (see expand_patch_embed_for_i2v).
    """
    name = source if isinstance(source, (str, os.PathLike)) else "state dict"
    sd = dict(source) if isinstance(source, Mapping) else load_state_dict(source, sha256=sha256)
    expected = model.state_dict()
    if init_i2v:
        k = next((k for k in expected if k.endswith("patch_embed.proj.weight")), None)
        if k is None or k not in sd:
            raise WeightsMismatchError(f"{name}: init_i2v needs patch_embed.proj.weight in model and file")
        sd = expand_patch_embed_for_i2v(sd, _patch_in_channels(tuple(expected[k].shape)))
    problems = [diagnose(k, v.shape, expected[k].shape) for k, v in sd.items()
                if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if problems or (strict and (missing or unexpected)):
        lines = [f"{name} does not fit {type(model).__name__}:"] + problems
        if strict and missing:
            lines.append(f"missing keys ({len(missing)}): {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if strict and unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
        lines += [f"hint: {n}" for n in _diagnose_keys(missing, unexpected)]
        raise WeightsMismatchError("\n".join(lines))
    model.load_state_dict(sd, strict=strict, assign=assign)
    return LoadResult(missing, unexpected)
