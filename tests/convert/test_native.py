"""ComfyUI core's native CogVideoX layout (cogpipe/convert/mapping.py NATIVE_RULES, `convert --to comfyui`): the map
checked against the real Diffusers class on the meta device and against ComfyUI's port as its source defines it
(tests/fixtures/comfy.py), for every released version; files converted there and back bit for bit; unknown keys
refused by name."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from accelerate import init_empty_weights  # noqa: E402
from diffusers import CogVideoXTransformer3DModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from cogpipe import family  # noqa: E402
from cogpipe.convert import convert  # noqa: E402
from cogpipe.convert.core import _to_native  # noqa: E402
from cogpipe.convert.detect import NATIVE_CONFIG_META, ConversionError, native_config  # noqa: E402
from cogpipe.convert.io import Out  # noqa: E402
from cogpipe.convert.mapping import NATIVE, diffusers_module, native_module  # noqa: E402
from cogpipe.convert.shapes import TRANSFORMER, full_config, transformer_shapes  # noqa: E402
from cogpipe.weights import load_state_dict  # noqa: E402

from fixtures import comfy  # noqa: E402
from fixtures.hub import VERSIONS, write_hub_pipeline  # noqa: E402

RELEASED = ["2b", "5b", "5b-i2v", "1.5-5b", "1.5-5b-i2v"]


def _meta(version):
    cfg = full_config(TRANSFORMER, dict(family.VARIANTS[version].transformer))
    with init_empty_weights(include_buffers=True):  # the 5B-I2V and 2B tables too: shapes, not values
        model = CogVideoXTransformer3DModel.from_config(cfg)
    return model, cfg


@pytest.mark.parametrize("version", RELEASED)
def test_every_module_maps_both_ways_onto_the_ports_names_and_shapes(version):
    model, cfg = _meta(version)
    state = model.state_dict()
    outs = [Out(k, [(v, 0, 1)], v.dtype) for k, v in state.items()]
    if cfg["use_rotary_positional_embeddings"] or cfg["use_learned_positional_embeddings"]:
        native = {o.name: o.shape for o in _to_native(outs, cfg, None, version)}
    else:  # 2B: _to_native adds the 3D sin-cos table (written by the round trips below); here its shape, not 130 MB
        slots, unknown = NATIVE.to_sat(list(state))
        assert not unknown
        native = {n: tuple(state[p[0].source].shape) for n, p in slots.items()}
        native["patch_embed.pos_embedding"] = transformer_shapes(
            {**cfg, "use_learned_positional_embeddings": True, "use_rotary_positional_embeddings": True}
        )["patch_embed.pos_embedding"]
    # the port as ComfyUI builds it from the file: its own detection, then its constructor
    detected = comfy.detect(native)
    port = comfy.port_shapes({**cfg, **detected, "patch_bias": "patch_embed.proj.bias" in native})
    assert native == port  # every tensor of the file is one of the port's, with its shape, and none is missing
    for module, _ in model.named_modules():
        if f"{module}.weight" in state:
            name = native_module(module)
            assert f"{name}.weight" in port and diffusers_module(name) == module, module
    assert comfy.supported_model(detected) == ("CogVideoX_I2V" if family.is_i2v(cfg) else "CogVideoX_T2V")
    same = ("num_attention_heads", "attention_head_dim", "time_embed_dim", "num_layers", "in_channels", "patch_size",
            "text_embed_dim")
    assert {k: detected[k] for k in same} == {k: cfg[k] for k in same}
    assert detected.get("patch_size_t") == cfg["patch_size_t"] and detected.get("ofs_embed_dim") == cfg["ofs_embed_dim"]
    # RoPE as the model has it, except 5B-I2V: its learned table reads as "no RoPE" there (docs/lora_formats.md)
    assert detected["use_rotary_positional_embeddings"] == (cfg["use_rotary_positional_embeddings"]
                                                            and version != "5b-i2v")
    # and cogpipe reads the same shapes back as the Diffusers config, without metadata
    assert full_config(TRANSFORMER, native_config(native)) == cfg


@pytest.fixture(scope="module")
def hubs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubs")
    return {v: write_hub_pipeline(root / v, v) for v in VERSIONS}


@pytest.mark.parametrize("version", VERSIONS)
def test_there_and_back_is_bit_exact(hubs, tmp_path, version):
    base = hubs[version]
    summary = convert(base, tmp_path / "model.safetensors", to="comfyui")  # a pipeline folder: its transformer
    native = load_file(str(tmp_path / "model.safetensors"))
    assert "blocks.0.norm1.linear.weight" in native and not any(k.startswith("transformer_blocks") for k in native)
    assert ("patch_embed.pos_embedding" in native) == (version in ("2b", "5b-i2v"))
    assert summary.direction == "diffusers->comfyui"
    back = convert(tmp_path / "model.safetensors", tmp_path / "back")
    original = load_state_dict(base / "transformer")
    again = load_state_dict(tmp_path / "back")
    assert set(again) == set(original)
    for k in original:
        assert again[k].dtype == original[k].dtype and torch.equal(again[k], original[k]), k
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    want = json.loads((base / "transformer" / "config.json").read_text())
    assert {k: v for k, v in cfg.items() if not k.startswith("_")} == \
        {k: v for k, v in full_config(TRANSFORMER, want).items() if not k.startswith("_")}
    assert back.direction == "comfyui->diffusers"


def test_without_metadata_the_shapes_say_the_config(hubs, tmp_path):
    """A native file from elsewhere (no cogpipe config inside): read by the shape rules, the 5B-I2V table kept."""
    convert(hubs["5b-i2v"], tmp_path / "m.safetensors", to="comfyui")
    save_file(load_file(str(tmp_path / "m.safetensors")), str(tmp_path / "bare.safetensors"))
    summary = convert(tmp_path / "bare.safetensors", tmp_path / "back",
                      transformer_config=dict(sample_height=8, sample_width=8, sample_frames=17))
    assert any("no cogpipe config" in n for n in summary.notes)
    assert summary.config["use_learned_positional_embeddings"] and summary.config["use_rotary_positional_embeddings"]
    original = load_state_dict(hubs["5b-i2v"] / "transformer")
    again = load_state_dict(tmp_path / "back")
    assert all(torch.equal(again[k], original[k]) for k in original) and set(again) == set(original)


def test_unknown_keys_are_an_error_that_names_them(hubs, tmp_path):
    convert(hubs["5b"], tmp_path / "m.safetensors", to="comfyui")
    state = load_file(str(tmp_path / "m.safetensors"))
    state["blocks.0.cross_attn.weight"] = torch.zeros(2)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        meta = f.metadata()
    assert NATIVE_CONFIG_META in meta
    save_file(state, str(tmp_path / "extra.safetensors"), metadata=meta)
    with pytest.raises(ConversionError, match=r"blocks\.0\.cross_attn\.weight"):
        convert(tmp_path / "extra.safetensors", tmp_path / "back")
    assert not (tmp_path / "back").exists()
    # a native LoRA is not a model to convert: said so, rather than "no config.json"
    save_file({"diffusion_model.blocks.0.q.lora_down.weight": torch.zeros(4, 32)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ConversionError, match="a LoRA in ComfyUI keys"):
        convert(tmp_path / "lora.safetensors", tmp_path / "l")
    # and a transformer the port cannot hold is refused, saying why
    config = json.loads((hubs["5b"] / "transformer" / "config.json").read_text())
    with pytest.raises(ConversionError, match="attention_bias"):
        _to_native([], full_config(TRANSFORMER, {**config, "attention_bias": False}), None, "x")


def test_a_sat_transformer_converts_to_native_too(hubs, tmp_path):
    convert(hubs["1.5-5b-i2v"] / "transformer", tmp_path / "sat")
    convert(tmp_path / "sat", tmp_path / "native", to="comfyui")
    native = load_file(str(tmp_path / "native" / "transformer_comfyui_core.safetensors"))
    original = load_state_dict(hubs["1.5-5b-i2v"] / "transformer")
    assert torch.equal(native["blocks.1.attn_out.weight"], original["transformer_blocks.1.attn1.to_out.0.weight"])
    assert torch.equal(native["ofs_embedding_linear_2.bias"], original["ofs_embedding.linear_2.bias"])
    assert len(native) == len(original)
