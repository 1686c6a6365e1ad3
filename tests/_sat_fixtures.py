"""Synthetic SAT checkpoints for the converter and weights tests.

Key names and shapes are written here from the SAT layout (DESIGN.md §5 and the SAT modules), independently of
cogpipe's mapping table, so the tests check the table rather than repeat it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import random
import sys
import types
from pathlib import Path

import numpy as np
import torch

PREFIX = "model.diffusion_model."
# tiny dims of the same architecture: hidden 32 = 2 heads x 16, 2 layers, time 16, text 24, ofs 8
TINY = dict(hidden=32, heads=2, layers=2, time=16, text=24, ofs=8, out=16)
FULL_5B = dict(hidden=3072, heads=48, layers=42, time=512, text=4096, ofs=512, out=16)
FULL_2B = dict(hidden=1920, heads=30, layers=30, time=512, text=4096, ofs=512, out=16)

# version -> (CogVideoX 1.5?, I2V?, position encoding stored in the file)
VERSIONS = {
    "2b": (False, False, "sincos"),
    "5b": (False, False, "freqs"),  # RoPE marked by its freqs tables (older SAT)
    "5b-i2v": (False, True, "position_embeddings+learned"),  # RoPE marked by SAT's unused position table
    "1.5-5b": (True, False, None),
    "1.5-5b-i2v": (True, True, None),
}
NUM_PATCHES = (60 // 2) * (90 // 2) * 13  # 480x720x49 after the VAE and the 2x2 patch
TEXT_LEN = 226


def sat_transformer_shapes(version: str, hidden, heads, layers, time, text, ofs, out,
                           lora_rank=None, lora_layers=()) -> dict[str, tuple]:
    """SAT transformer key (without model.diffusion_model.) -> shape."""
    v15, i2v, pos = VERSIONS[version]
    c, hd, s = (2 * out if i2v else out), hidden // heads, {}
    s["mixins.patch_embed.proj.weight"] = (hidden, c * 8) if v15 else (hidden, c, 2, 2)
    s["mixins.patch_embed.proj.bias"] = (hidden,)
    s["mixins.patch_embed.text_proj.weight"], s["mixins.patch_embed.text_proj.bias"] = (hidden, text), (hidden,)
    s["time_embed.0.weight"], s["time_embed.0.bias"] = (time, hidden), (time,)
    s["time_embed.2.weight"], s["time_embed.2.bias"] = (time, time), (time,)
    if v15 and i2v:
        for n in (0, 2):
            s[f"ofs_embed.{n}.weight"], s[f"ofs_embed.{n}.bias"] = (ofs, ofs), (ofs,)
    for i in range(layers):
        L = f"transformer.layers.{i}."
        base = L + "attention.query_key_value." + ("original." if i in lora_layers else "")
        dense = L + "attention.dense." + ("original." if i in lora_layers else "")
        s[L + "input_layernorm.weight"], s[L + "input_layernorm.bias"] = (hidden,), (hidden,)
        s[base + "weight"], s[base + "bias"] = (3 * hidden, hidden), (3 * hidden,)
        s[dense + "weight"], s[dense + "bias"] = (hidden, hidden), (hidden,)
        s[L + "post_attention_layernorm.weight"], s[L + "post_attention_layernorm.bias"] = (hidden,), (hidden,)
        s[L + "mlp.dense_h_to_4h.weight"], s[L + "mlp.dense_h_to_4h.bias"] = (4 * hidden, hidden), (4 * hidden,)
        s[L + "mlp.dense_4h_to_h.weight"], s[L + "mlp.dense_4h_to_h.bias"] = (hidden, 4 * hidden), (hidden,)
        if i in lora_layers:
            for k in range(3):
                s[L + f"attention.query_key_value.matrix_A.{k}"] = (lora_rank, hidden)
                s[L + f"attention.query_key_value.matrix_B.{k}"] = (hidden, lora_rank)
            s[L + "attention.dense.matrix_A.0"], s[L + "attention.dense.matrix_B.0"] = (lora_rank, hidden), \
                (hidden, lora_rank)
        A = "mixins.adaln_layer."
        s[A + f"adaLN_modulations.{i}.1.weight"], s[A + f"adaLN_modulations.{i}.1.bias"] = (12 * hidden, time), \
            (12 * hidden,)
        for n in ("query_layernorm_list", "key_layernorm_list"):
            s[A + f"{n}.{i}.weight"], s[A + f"{n}.{i}.bias"] = (hd,), (hd,)
    s["transformer.final_layernorm.weight"], s["transformer.final_layernorm.bias"] = (hidden,), (hidden,)
    s["mixins.final_layer.norm_final.weight"], s["mixins.final_layer.norm_final.bias"] = (hidden,), (hidden,)
    s["mixins.final_layer.adaLN_modulation.1.weight"] = (2 * hidden, time)
    s["mixins.final_layer.adaLN_modulation.1.bias"] = (2 * hidden,)
    s["mixins.final_layer.linear.weight"] = ((8 if v15 else 4) * out, hidden)
    s["mixins.final_layer.linear.bias"] = ((8 if v15 else 4) * out,)
    if pos == "sincos" or (pos and "learned" in pos):
        s["mixins.pos_embed.pos_embedding"] = (1, TEXT_LEN + NUM_PATCHES, hidden)
    if pos == "freqs":
        s["mixins.pos_embed.freqs_sin"] = s["mixins.pos_embed.freqs_cos"] = (13, 30, 45, hd)
    if pos and pos.startswith("position_embeddings"):
        s["transformer.position_embeddings.weight"] = (64, hidden)
    return s


def sincos_table(hidden: int) -> torch.Tensor:
    """The real frozen table of a sin-cos model (what SAT stores): computed with Diffusers' function."""
    from diffusers.models.embeddings import CogVideoXPatchEmbed

    pe = CogVideoXPatchEmbed(in_channels=1, embed_dim=hidden, text_embed_dim=1, use_positional_embeddings=True,
                             use_learned_positional_embeddings=False)
    return pe.pos_embedding.clone()


def sat_transformer(version: str, *, dtype=torch.bfloat16, seed=0, lora_rank=None, lora_layers=(), dims=None,
                    prefix=PREFIX) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = sat_transformer_shapes(version, **(dims or TINY), lora_rank=lora_rank, lora_layers=lora_layers)
    out = {}
    for k, shape in shapes.items():
        t = torch.randn(shape, generator=g)
        if "freqs" in k:
            t = t.float()
        out[prefix + k] = t.to(torch.float32 if "freqs" in k else dtype)
    if VERSIONS[version][2] == "sincos":
        out[prefix + "mixins.pos_embed.pos_embedding"] = sincos_table((dims or TINY)["hidden"]).to(dtype)
    return out


def sat_lora_only(module: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.items() if ".matrix_" in k}


def sat_vae_shapes(block_out=(32, 32, 64, 64), layers=1, latent=16, cin=3, cout=3, loss=True) -> dict[str, tuple]:
    """SAT 3d-vae.pt keys: encoder.down.i.block.j / downsample, mid.block_1/2; decoder.up.i counted the SAT way
    (up.{n-1} runs first, with the widest channels), SpatialNorm3D norms (norm_layer/conv_y/conv_b)."""
    s, n = {}, len(block_out)

    def conv(name, o, i, k=(3, 3, 3)):
        s[name + ".weight"], s[name + ".bias"] = (o, i, *k), (o,)

    def norm(name, c, spatial):
        if spatial:
            s[name + ".norm_layer.weight"], s[name + ".norm_layer.bias"] = (c,), (c,)
            conv(name + ".conv_y.conv", c, latent, (1, 1, 1))
            conv(name + ".conv_b.conv", c, latent, (1, 1, 1))
        else:
            s[name + ".weight"], s[name + ".bias"] = (c,), (c,)

    def resnet(name, i, o, spatial):
        norm(name + ".norm1", i, spatial)
        conv(name + ".conv1.conv", o, i)
        norm(name + ".norm2", o, spatial)
        conv(name + ".conv2.conv", o, o)
        if i != o:
            conv(name + ".nin_shortcut", o, i, (1, 1, 1))

    conv("encoder.conv_in.conv", block_out[0], cin)
    prev = block_out[0]
    for i, c in enumerate(block_out):
        for j in range(layers):
            resnet(f"encoder.down.{i}.block.{j}", prev if j == 0 else c, c, False)
        prev = c
        if i < n - 1:
            conv(f"encoder.down.{i}.downsample.conv", c, c, (3, 3))
    for b in ("block_1", "block_2"):
        resnet(f"encoder.mid.{b}", prev, prev, False)
    norm("encoder.norm_out", prev, False)
    conv("encoder.conv_out.conv", 2 * latent, prev)
    conv("decoder.conv_in.conv", block_out[-1], latent)
    for b in ("block_1", "block_2"):
        resnet(f"decoder.mid.{b}", block_out[-1], block_out[-1], True)
    prev = block_out[-1]
    for i in reversed(range(n)):
        c = block_out[i]
        for j in range(layers + 1):
            resnet(f"decoder.up.{i}.block.{j}", prev if j == 0 else c, c, True)
        prev = c
        if i > 0:
            conv(f"decoder.up.{i}.upsample.conv", c, c, (3, 3))
    norm("decoder.norm_out", block_out[0], True)
    conv("decoder.conv_out.conv", cout, block_out[0])
    if loss:
        s["loss.logvar"] = ()
        s["loss.discriminator.main.0.weight"] = (8, 3, 4, 4)
        s["loss.perceptual_loss.net.slice1.0.weight"] = (8, 3, 3, 3)
    return s


def sat_vae(*, dtype=torch.float32, seed=0, **kw) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(s, generator=g) * 0.1).to(dtype) for k, s in sat_vae_shapes(**kw).items()}


# --- files ----------------------------------------------------------------------------------------------------------


class ZeroStageEnum(int, __import__("enum").Enum):
    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


class DeepSpeedConfig:
    def __init__(self):
        self.train_batch_size, self.zero_config = 8, {"stage": 2}


class LossScaler:
    def __init__(self):
        self.cur_scale = 1.0


# Classes DeepSpeed pickles into its checkpoints, under their real module names (deepspeed is not installed).
_DS_CLASSES = {"deepspeed.runtime.zero.config": ZeroStageEnum, "deepspeed.runtime.config": DeepSpeedConfig,
               "deepspeed.runtime.fp16.loss_scaler": LossScaler}
for _mod, _cls in _DS_CLASSES.items():
    _cls.__module__ = _mod


@contextlib.contextmanager
def fake_deepspeed():
    """While active, pickle can save the DeepSpeed classes above; cogpipe must load them as inert records."""
    names = ["deepspeed", "deepspeed.runtime", "deepspeed.runtime.zero", "deepspeed.runtime.fp16", *_DS_CLASSES]
    mods = {n: types.ModuleType(n) for n in names}
    for mod, cls in _DS_CLASSES.items():
        setattr(mods[mod], cls.__name__, cls)
    saved = {n: sys.modules.get(n) for n in names}
    sys.modules.update(mods)
    try:
        yield
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def finetune_extras(module: dict) -> dict:
    """What a SAT fine-tune save (DeepSpeed engine + SAT client state) carries beside `module`."""
    return dict(
        iteration=1000, random_rng_state=random.getstate(), np_rng_state=np.random.get_state(),
        torch_rng_state=torch.get_rng_state(), client_lr_scheduler={"last_epoch": 1000},
        args=argparse.Namespace(lr=1e-4, mode="finetune"), ds_config=DeepSpeedConfig(),
        ds_version="0.14.4", buffer_names=[], shared_params={}, global_steps=1000,
        param_shapes=[collections.OrderedDict((k, v.shape) for k, v in module.items())],
        optimizer={"state": {0: {"exp_avg": torch.zeros(4)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
        zero_stage=ZeroStageEnum.gradients,
    )


def save_sat_folder(folder: Path, module: dict, *, iteration=1000, extras: dict | None = None) -> Path:
    """folder/latest + folder/<iteration>/mp_rank_00_model_states.pt, like SAT/DeepSpeed write them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / str(iteration)).mkdir(exist_ok=True)
    obj = {"module": module, **(extras or {})}
    with fake_deepspeed():
        torch.save(obj, folder / str(iteration) / "mp_rank_00_model_states.pt")
    (folder / "latest").write_text(str(iteration))
    return folder


def add_finetune_parts(module: dict, seed=1) -> dict:
    """conditioner.* (T5) and first_stage_model.* (VAE) tensors of a full SAT engine save."""
    g = torch.Generator().manual_seed(seed)
    extra = {
        "conditioner.embedders.0.transformer.shared.weight": torch.randn(10, 8, generator=g),
        "conditioner.embedders.0.transformer.encoder.block.0.layer.0.SelfAttention.q.weight": torch.randn(8, 8),
        "first_stage_model.encoder.conv_in.conv.weight": torch.randn(4, 3, 3, 3, 3),
        "first_stage_model.decoder.conv_out.conv.bias": torch.randn(3),
    }
    return {**module, **extra}
