"""cogpipe.convert on synthetic SAT checkpoints (tiny dims, every version, LoRA, fine-tune extras, bf16)."""

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file

from cogpipe import atomic  # noqa: E402
from cogpipe.convert import ConversionError, convert, transformer_config, vae_config  # noqa: E402
from cogpipe.convert.cli import add_arguments, run  # noqa: E402
from cogpipe.convert.core import plan_to_diffusers  # noqa: E402
from cogpipe.convert.mapping import TRANSFORMER, VAE  # noqa: E402
from cogpipe.convert.shapes import expected_shapes  # noqa: E402
from cogpipe.weights import CorruptCheckpointError, load_state_dict  # noqa: E402

from fixtures import sat as F  # noqa: E402
from helpers import REPO  # noqa: E402

P = F.PREFIX


def diffusers_model(cls_name: str, cfg: dict):
    """The real Diffusers class on the meta device (what the converter's shape rules stand in for)."""
    import diffusers

    with torch.device("meta"):
        return getattr(diffusers, cls_name).from_config(cfg)


def diffusers_weights(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def load_checked(cls_name: str, folder: Path):
    """from_pretrained with no missing, unexpected or mismatched keys."""
    import diffusers

    model, info = getattr(diffusers, cls_name).from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model


def bits_equal(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8),
                                                                      b.reshape(-1).view(torch.uint8))


EXPECT = {  # version -> detected config values (docs/design.md: "The CogVideoX family", "SAT checkpoints")
    "2b": dict(in_channels=16, patch_size_t=None, use_rotary_positional_embeddings=False,
               use_learned_positional_embeddings=False, ofs_embed_dim=None),
    "5b": dict(in_channels=16, patch_size_t=None, use_rotary_positional_embeddings=True,
               use_learned_positional_embeddings=False, ofs_embed_dim=None),
    "5b-i2v": dict(in_channels=32, patch_size_t=None, use_rotary_positional_embeddings=True,
                   use_learned_positional_embeddings=True, ofs_embed_dim=None),
    "1.5-5b": dict(in_channels=16, patch_size_t=2, use_rotary_positional_embeddings=True,
                   use_learned_positional_embeddings=False, ofs_embed_dim=None),
    "1.5-5b-i2v": dict(in_channels=32, patch_size_t=2, use_rotary_positional_embeddings=True,
                       use_learned_positional_embeddings=False, ofs_embed_dim=8),
}


@pytest.mark.parametrize("version", list(F.VERSIONS))
def test_transformer_every_version_both_ways(tmp_path, version):
    sat = F.sat_transformer(version, dtype=torch.bfloat16, seed=hash(version) % 1000)
    F.save_sat_folder(tmp_path / "sat", sat)
    s = convert(tmp_path / "sat", tmp_path / "diffusers")  # no flags

    for k, v in EXPECT[version].items():
        assert s.config[k] == v, (k, s.config[k])
    assert s.config["num_layers"] == 2 and s.config["num_attention_heads"] == 2 and s.config["out_channels"] == 16
    model = load_checked("CogVideoXTransformer3DModel", tmp_path / "diffusers")
    assert s.parameters == sum(p.numel() for p in model.state_dict().values())
    assert s.dtypes == ["bfloat16"]

    d = diffusers_weights(tmp_path / "diffusers")
    H = 32
    qkv = sat[P + "transformer.layers.1.attention.query_key_value.weight"]
    assert bits_equal(d["transformer_blocks.1.attn1.to_q.weight"], qkv[:H])
    assert bits_equal(d["transformer_blocks.1.attn1.to_k.weight"], qkv[H:2 * H])
    assert bits_equal(d["transformer_blocks.1.attn1.to_v.weight"], qkv[2 * H:])
    c = sat[P + "mixins.adaln_layer.adaLN_modulations.0.1.weight"].chunk(12)
    assert bits_equal(d["transformer_blocks.0.norm1.linear.weight"], torch.cat([c[i] for i in (0, 1, 2, 6, 7, 8)]))
    assert bits_equal(d["transformer_blocks.0.norm2.linear.weight"], torch.cat([c[i] for i in (3, 4, 5, 9, 10, 11)]))
    cb = sat[P + "mixins.adaln_layer.adaLN_modulations.1.1.bias"].chunk(12)
    assert bits_equal(d["transformer_blocks.1.norm2.linear.bias"], torch.cat([cb[i] for i in (3, 4, 5, 9, 10, 11)]))
    for sat_key, diff_key in [
        ("transformer.layers.0.post_attention_layernorm.weight", "transformer_blocks.0.norm2.norm.weight"),
        ("transformer.layers.1.attention.dense.bias", "transformer_blocks.1.attn1.to_out.0.bias"),
        ("transformer.layers.0.mlp.dense_h_to_4h.weight", "transformer_blocks.0.ff.net.0.proj.weight"),
        ("mixins.adaln_layer.key_layernorm_list.1.weight", "transformer_blocks.1.attn1.norm_k.weight"),
        ("mixins.final_layer.adaLN_modulation.1.weight", "norm_out.linear.weight"),
        ("mixins.final_layer.norm_final.bias", "norm_out.norm.bias"),
        ("transformer.final_layernorm.weight", "norm_final.weight"),
        ("mixins.patch_embed.proj.weight", "patch_embed.proj.weight"),
        ("time_embed.2.weight", "time_embedding.linear_2.weight"),
    ]:
        assert bits_equal(d[diff_key], sat[P + sat_key]), sat_key
    if version == "5b-i2v":
        assert bits_equal(d["patch_embed.pos_embedding"], sat[P + "mixins.pos_embed.pos_embedding"])
    if version == "1.5-5b-i2v":
        assert bits_equal(d["ofs_embedding.linear_2.bias"], sat[P + "ofs_embed.2.bias"])
    dropped = {k for g in s.dropped for k in g["keys"]}
    if version == "5b":
        assert {"mixins.pos_embed.freqs_sin", "mixins.pos_embed.freqs_cos"} <= dropped
    assert ("mixins.pos_embed.pos_embedding" in dropped) == (version == "2b")

    # back to SAT: every key that maps comes back bit for bit, and it reads back as the same model
    s2 = convert(tmp_path / "diffusers", tmp_path / "sat2")
    back = torch.load(tmp_path / "sat2" / "1" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    mapped = {k for k in sat if k[len(P):] not in dropped}
    assert mapped <= set(back)
    for k in mapped:
        assert bits_equal(back[k], sat[k]), k
    if version == "2b":  # the frozen sin-cos table SAT needs is written again, equal to the real one
        assert bits_equal(back[P + "mixins.pos_embed.pos_embedding"], sat[P + "mixins.pos_embed.pos_embedding"])
    assert transformer_config({k[len(P):]: tuple(v.shape) for k, v in back.items()}) == \
        transformer_config({k[len(P):]: tuple(v.shape) for k, v in sat.items()})
    assert s2.model == s.model


def test_full_size_models_match_design_counts():
    """Full-size SAT layouts (shapes only, meta tensors) map onto the real Diffusers classes exactly."""
    for version, dims, params in [("5b", F.FULL_5B, 5_570_283_072), ("2b", F.FULL_2B, 1_693_783_872),
                                  ("5b-i2v", F.FULL_5B, None), ("1.5-5b-i2v", F.FULL_5B, None)]:
        shapes = F.sat_transformer_shapes(version, **dims)
        cfg = transformer_config(shapes)
        meta = {k: torch.empty(s, device="meta", dtype=torch.bfloat16) for k, s in shapes.items()}
        outs, dropped = plan_to_diffusers(TRANSFORMER, meta, cfg, None, version)
        expected, _ = expected_shapes("CogVideoXTransformer3DModel", cfg)
        assert {o.name: o.shape for o in outs} == expected, version
        if params:
            assert sum(torch.Size(s).numel() for s in expected.values()) == params
        assert (cfg["num_layers"], cfg["num_attention_heads"]) == ((30, 30) if version == "2b" else (42, 48))
    shapes = F.sat_vae_shapes(block_out=(128, 256, 256, 512), layers=3)
    cfg = vae_config(shapes)
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    outs, dropped = plan_to_diffusers(VAE, meta, {"n_up": 4}, None, "vae")
    expected, _ = expected_shapes("AutoencoderKLCogVideoX", cfg)
    assert {o.name: o.shape for o in outs} == expected
    assert len(expected) == 436 and sum(torch.Size(s).numel() for s in expected.values()) == 215_583_907
    assert dropped[0]["count"] == 3 and "loss" in dropped[0]["reason"]
    assert tuple(diffusers_model("AutoencoderKLCogVideoX", cfg).config.block_out_channels) == (128, 256, 256, 512)


def test_mapping_names_round_trip_on_every_key():
    for version in ("5b-i2v", "1.5-5b-i2v", "2b"):
        cfg = transformer_config(F.sat_transformer_shapes(version, **F.FULL_5B))
        names = list(diffusers_model("CogVideoXTransformer3DModel", cfg).state_dict())
        slots, unknown = TRANSFORMER.to_sat(names, cfg)
        assert not unknown
        again = [n for s in slots for kind, res in [TRANSFORMER.to_diffusers(s, cfg)] for n, _ in res]
        assert sorted(again) == sorted(names)


def test_vae_both_ways(tmp_path):
    sat = F.sat_vae(dtype=torch.bfloat16)
    torch.save({"state_dict": sat}, tmp_path / "3d-vae.pt")
    s = convert(tmp_path / "3d-vae.pt", tmp_path / "vae")
    vae = load_checked("AutoencoderKLCogVideoX", tmp_path / "vae")
    assert tuple(vae.config.block_out_channels) == (32, 32, 64, 64) and vae.config.layers_per_block == 1
    assert any("scaling" in n for n in s.notes)  # a lone VAE says what it assumed
    d = diffusers_weights(tmp_path / "vae")
    for sat_key, diff_key in [
        ("decoder.up.0.block.1.conv1.conv.weight", "decoder.up_blocks.3.resnets.1.conv1.conv.weight"),
        ("decoder.up.3.upsample.conv.weight", "decoder.up_blocks.0.upsamplers.0.conv.weight"),
        ("decoder.up.1.block.0.nin_shortcut.weight", "decoder.up_blocks.2.resnets.0.conv_shortcut.weight"),
        ("encoder.down.2.block.0.nin_shortcut.bias", "encoder.down_blocks.2.resnets.0.conv_shortcut.bias"),
        ("encoder.down.1.downsample.conv.weight", "encoder.down_blocks.1.downsamplers.0.conv.weight"),
        ("decoder.mid.block_2.norm1.conv_y.conv.weight", "decoder.mid_block.resnets.1.norm1.conv_y.conv.weight"),
        ("encoder.mid.block_1.norm2.weight", "encoder.mid_block.resnets.0.norm2.weight"),
        ("decoder.norm_out.conv_b.conv.bias", "decoder.norm_out.conv_b.conv.bias"),
    ]:
        assert bits_equal(d[diff_key], sat[sat_key]), sat_key
    assert s.dropped[0]["count"] == 3
    convert(tmp_path / "vae", tmp_path / "sat_vae")
    back = torch.load(tmp_path / "sat_vae" / "3d-vae.pt", weights_only=True)["state_dict"]
    assert set(back) == {k for k in sat if not k.startswith("loss.")}
    assert all(bits_equal(back[k], sat[k]) for k in back)


def test_finetune_save_converts_without_running_or_trusting_its_pickle(tmp_path, monkeypatch):
    sat = F.add_finetune_parts(F.sat_transformer("5b", dtype=torch.bfloat16))
    F.save_sat_folder(tmp_path / "ft", sat, extras=F.finetune_extras(sat))

    def no_torch_load(*a, **k):
        raise AssertionError("the converter must not use torch.load on SAT saves")

    monkeypatch.setattr(torch, "load", no_torch_load)
    s = convert(tmp_path / "ft", tmp_path / "out")
    monkeypatch.undo()
    ignored = {g["prefix"]: g["count"] for g in s.ignored}
    assert ignored == {"conditioner.": 2, "first_stage_model.": 2}
    assert all(g["reason"] for g in s.ignored)
    load_checked("CogVideoXTransformer3DModel", tmp_path / "out")


def _tiny_inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2, cfg.in_channels, 4, 4, generator=g)
    text = torch.randn(1, 3, cfg.text_embed_dim, generator=g)
    return dict(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([300]), return_dict=False)


def _sat_formula(model, sat, layers, rank, alpha=1.0):
    """W' = W + (alpha / rank) * B @ A per SAT lora2, written into a Diffusers model (the reference)."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for i in layers:
        L = P + f"transformer.layers.{i}.attention."
        for k, name in enumerate(("to_q", "to_k", "to_v")):
            a, b = sat[L + f"query_key_value.matrix_A.{k}"], sat[L + f"query_key_value.matrix_B.{k}"]
            sd[f"transformer_blocks.{i}.attn1.{name}.weight"] += alpha / rank * (b @ a)
        sd[f"transformer_blocks.{i}.attn1.to_out.0.weight"] += alpha / rank * (
            sat[L + "dense.matrix_B.0"] @ sat[L + "dense.matrix_A.0"])
    model.load_state_dict(sd)
    return model


def test_sat_lora_layers_extract_and_merge_change_output_as_sat_says(tmp_path):
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

    rank, layers = 4, (0, 2)  # LoRA on some of the layers only
    dims = {**F.TINY, "layers": 3}
    sat = F.sat_transformer("5b", dtype=torch.float32, lora_rank=rank, lora_layers=layers, dims=dims, seed=3)
    F.save_sat_folder(tmp_path / "sat", sat)
    s = convert(tmp_path / "sat", tmp_path / "extract")
    assert any("extracted" in n for n in s.notes)
    base = load_checked("CogVideoXTransformer3DModel", tmp_path / "extract")
    inputs = _tiny_inputs(base.config)
    with torch.no_grad():
        out_base = base(**inputs)[0]
    lora_file = tmp_path / "extract" / "lora" / "pytorch_lora_weights.safetensors"
    keys = set(load_file(lora_file))
    assert "transformer.transformer_blocks.2.attn1.to_out.0.lora_B.weight" in keys and len(keys) == 16

    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=base,
                             scheduler=CogVideoXDDIMScheduler())
    pipe.load_lora_weights(tmp_path / "extract" / "lora")
    with torch.no_grad():
        out_lora = pipe.transformer(**inputs)[0]

    ref = _sat_formula(load_checked("CogVideoXTransformer3DModel", tmp_path / "extract"), sat, layers, rank)
    with torch.no_grad():
        out_ref = ref(**inputs)[0]
        out_wrong = _sat_formula(load_checked("CogVideoXTransformer3DModel", tmp_path / "extract"), sat, layers,
                                 rank, alpha=rank)(**inputs)[0]  # the lost-alpha mistake: scale 1
    assert (out_lora - out_base).abs().max() > 1e-2  # the LoRA does something
    torch.testing.assert_close(out_lora, out_ref, rtol=1e-4, atol=1e-5)
    assert (out_lora - out_wrong).abs().max() > 1e-3

    convert(tmp_path / "sat", tmp_path / "merged", lora_mode="merge")
    merged = load_checked("CogVideoXTransformer3DModel", tmp_path / "merged")
    assert not (tmp_path / "merged" / "lora").exists()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs)[0], out_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rank,dtype", [(4, torch.bfloat16), (3, torch.bfloat16), (5, torch.float16)])
def test_sat_lora_file_round_trip_is_exact(tmp_path, rank, dtype):
    sat = F.sat_lora_only(F.sat_transformer("5b", dtype=dtype, lora_rank=rank, lora_layers=(0, 1), seed=rank))
    F.save_sat_folder(tmp_path / "sat_lora", sat)
    s = convert(tmp_path / "sat_lora", tmp_path / "lora")
    lora = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    A = lora["transformer.transformer_blocks.1.attn1.to_v.lora_A.weight"]
    B = lora["transformer.transformer_blocks.1.attn1.to_v.lora_B.weight"]
    a = sat[P + "transformer.layers.1.attention.query_key_value.matrix_A.2"].float()
    b = sat[P + "transformer.layers.1.attention.query_key_value.matrix_B.2"].float()
    torch.testing.assert_close(B.float() @ A.float(), b @ a / rank, rtol=1e-2, atol=1e-3)  # scale 1/rank baked
    assert (A.dtype == dtype) == (rank == 4)  # ranks that are not a power of two go to fp32 to stay exact
    assert (rank == 4) or any("fp32" in n for n in s.notes)
    convert(tmp_path / "lora", tmp_path / "sat_back")
    back = torch.load(tmp_path / "sat_back" / "1" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert set(back) == set(sat)
    for k in sat:
        assert bits_equal(back[k], sat[k]), k


def test_diffusers_lora_with_alpha_metadata_to_sat(tmp_path):
    """A peft/diffusers LoRA (alpha 8, rank 4, q and v only) -> SAT gives the same update under SAT's 1/rank."""
    from diffusers import CogVideoXPipeline
    from peft import LoraConfig

    g = torch.Generator().manual_seed(0)
    r, alpha, H = 4, 8, 32
    layers = {}
    for name in ("to_q", "to_v"):
        layers[f"transformer_blocks.0.attn1.{name}.lora_A.weight"] = torch.randn(r, H, generator=g)
        layers[f"transformer_blocks.0.attn1.{name}.lora_B.weight"] = torch.randn(H, r, generator=g)
    meta = LoraConfig(r=r, lora_alpha=alpha, target_modules=["to_q", "to_v"]).to_dict()
    meta["target_modules"] = sorted(meta["target_modules"])
    CogVideoXPipeline.save_lora_weights(tmp_path / "peft", transformer_lora_layers=layers,
                                        transformer_lora_adapter_metadata=meta)
    tensors = {"transformer." + k: v for k, v in layers.items()}
    s = convert(tmp_path / "peft", tmp_path / "sat")
    back = torch.load(tmp_path / "sat" / "1" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    L = P + "transformer.layers.0.attention.query_key_value."
    for k, name in ((0, "to_q"), (2, "to_v")):
        A = tensors[f"transformer.transformer_blocks.0.attn1.{name}.lora_A.weight"]
        B = tensors[f"transformer.transformer_blocks.0.attn1.{name}.lora_B.weight"]
        torch.testing.assert_close(back[L + f"matrix_B.{k}"] @ back[L + f"matrix_A.{k}"] / r, alpha / r * B @ A)
    assert not back[L + "matrix_B.1"].any()  # k has no LoRA: zeros, no effect
    assert any("zeros" in n for n in s.notes)


def _tiny_text_encoder(folder: Path):
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    T5EncoderModel(T5Config(vocab_size=384, d_model=24, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).save_pretrained(
        folder / "text_encoder")
    ByT5Tokenizer().save_pretrained(folder / "tokenizer")


def test_sat_folder_to_full_pipeline_and_back(tmp_path):
    from diffusers import CogVideoXImageToVideoPipeline

    sat = F.sat_transformer("1.5-5b-i2v", dtype=torch.bfloat16)
    F.save_sat_folder(tmp_path / "sat" / "transformer", sat)
    (tmp_path / "sat" / "vae").mkdir()
    vae = F.sat_vae(dtype=torch.bfloat16)
    torch.save({"state_dict": vae}, tmp_path / "sat" / "vae" / "3d-vae.pt")
    _tiny_text_encoder(tmp_path / "t5")
    s = convert(tmp_path / "sat", tmp_path / "pipe", text_encoder=tmp_path / "t5")
    assert "CogVideoXImageToVideoPipeline" in s.notes[0] and s.parts[0].kind == "transformer"
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(tmp_path / "pipe")
    assert type(pipe.tokenizer).__name__ == "ByT5Tokenizer" and pipe.text_encoder is not None
    sc = pipe.scheduler.config
    assert (sc.prediction_type, sc.beta_schedule, sc.beta_start, sc.beta_end, sc.timestep_spacing,
            sc.rescale_betas_zero_snr, sc.snr_shift_scale) == ("v_prediction", "scaled_linear", 0.00085, 0.012,
                                                               "trailing", True, 1.0)
    assert pipe.vae.config.scaling_factor == 0.7 and pipe.vae.config.invert_scale_latents is True
    assert pipe.transformer.config.ofs_embed_dim == 8

    # without a text encoder: left out with a note, the pipeline still loads
    s2 = convert(tmp_path / "sat", tmp_path / "pipe2")
    assert any("left out" in n for n in s2.notes)
    assert json.loads((tmp_path / "pipe2" / "model_index.json").read_text())["text_encoder"] == [None, None]
    loaded = CogVideoXImageToVideoPipeline.from_pretrained(tmp_path / "pipe2", text_encoder=None, tokenizer=None)
    assert loaded.text_encoder is None and loaded.transformer.config.in_channels == 32

    convert(tmp_path / "pipe", tmp_path / "sat_back")
    back = torch.load(tmp_path / "sat_back" / "transformer" / "1" / "mp_rank_00_model_states.pt", weights_only=True)
    assert all(bits_equal(back["module"][k], v) for k, v in sat.items())
    back_vae = torch.load(tmp_path / "sat_back" / "vae" / "3d-vae.pt", weights_only=True)["state_dict"]
    assert all(bits_equal(back_vae[k], vae[k]) for k in back_vae) and len(back_vae) == len(vae) - 3


def test_2b_scheduler_and_vae_values():
    from cogpipe.convert.detect import family_values, scheduler_config

    cfg = transformer_config(F.sat_transformer_shapes("2b", **F.FULL_2B))
    assert scheduler_config(cfg)["snr_shift_scale"] == 3.0 and family_values(cfg)["scaling_factor"] == 1.15258426
    cfg5 = transformer_config(F.sat_transformer_shapes("1.5-5b", **F.FULL_5B))
    assert scheduler_config(cfg5)["snr_shift_scale"] == 1.0 and family_values(cfg5)["invert_scale_latents"]


def test_sharded_output_loads(tmp_path):
    sat = F.sat_transformer("5b", dtype=torch.float32)
    F.save_sat_folder(tmp_path / "sat", sat)
    s = convert(tmp_path / "sat", tmp_path / "out", max_shard_size=60_000)
    assert len(s.files) > 1 and (tmp_path / "out" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    load_checked("CogVideoXTransformer3DModel", tmp_path / "out")
    convert(tmp_path / "out", tmp_path / "back")  # the reverse reads the sharded folder
    back = load_state_dict(tmp_path / "back")
    assert bits_equal(back[P + "time_embed.0.weight"], sat[P + "time_embed.0.weight"])


def test_errors_name_the_file_key_or_rule(tmp_path):
    sat = F.sat_transformer("5b")
    sat[P + "mixins.mystery.weight"] = torch.zeros(2)
    F.save_sat_folder(tmp_path / "bad", sat)
    with pytest.raises(ConversionError, match=r"mixins\.mystery\.weight"):
        convert(tmp_path / "bad", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial*"))  # nothing half-written
    assert not atomic.temps(tmp_path)  # temporary names are cogpipe.atomic's

    good = F.sat_transformer("5b")
    F.save_sat_folder(tmp_path / "good", good)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep")
    with pytest.raises(ConversionError, match="not empty"):
        convert(tmp_path / "good", tmp_path / "busy")
    f = tmp_path / "good" / "1000" / "mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[:-300])
    with pytest.raises(CorruptCheckpointError, match="mp_rank_00_model_states.pt"):
        convert(tmp_path / "good", tmp_path / "out2")
    wrong = F.sat_transformer("5b-i2v")
    wrong[P + "mixins.pos_embed.pos_embedding"] = torch.zeros(1, 100, 32)
    F.save_sat_folder(tmp_path / "wrong", wrong)
    with pytest.raises(ConversionError, match="pos_embedding.*sample_height"):
        convert(tmp_path / "wrong", tmp_path / "out3")


def test_cli(tmp_path, capsys):
    import argparse

    sat = F.sat_transformer("2b")
    F.save_sat_folder(tmp_path / "sat", sat)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args([str(tmp_path / "sat"), str(tmp_path / "out"), "--json", "--dtype", "fp32"])) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["direction"] == "sat->diffusers" and summary["dtypes"] == ["float32"]
    assert run(parser.parse_args([str(tmp_path / "nothing"), str(tmp_path / "o")])) == 1
    assert "nothing" in capsys.readouterr().err
    assert run(parser.parse_args([str(tmp_path / "sat"), str(tmp_path / "o2"),
                                  "--set", "transformer.sample_frames=17"])) == 0
    assert json.loads((tmp_path / "o2" / "config.json").read_text())["sample_frames"] == 17
    help_ = subprocess.run([sys.executable, "-m", "cogpipe.convert", "--help"], capture_output=True, text=True,
                           cwd=REPO)
    assert help_.returncode == 0 and "--lora-mode" in help_.stdout
