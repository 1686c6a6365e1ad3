"""Any checkpoint in (cogpipe/model_sources.py: SAT folders and single-file transformers converted once into a
content-keyed, verified cache) and LoRAs in any key format (cogpipe/lora_formats.py), through infer.py."""

import json

import numpy as np
import pytest
import torch

from cogpipe import model_sources

from fixtures.hub import write_hub_pipeline

PROMPT = "a purple square moving left"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_hub_pipeline(tmp_path_factory.mktemp("hub") / "5b", "5b")


@pytest.fixture(scope="module")
def sat(base, tmp_path_factory):
    """The fixture's transformer and VAE in the official SAT layout (transformer/latest + 1/mp_rank_00..., vae/)."""
    from cogpipe.convert import convert

    root = tmp_path_factory.mktemp("sat") / "CogVideoX-toy-sat"
    convert(base / "transformer", root / "transformer")
    convert(base / "vae", root / "vae")
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COGPIPE_MODEL_CACHE", str(tmp_path / "model-cache"))
    return tmp_path / "model-cache"


def _frames(model, tmp_path, *args):
    import cogpipe.video
    from cogpipe.inference import cli

    seen, original = [], cogpipe.video.write_mp4
    cogpipe.video.write_mp4 = lambda frames, path, fps=8, **kw: seen.append(np.asarray(frames)) or \
        original(frames, path, fps=fps, **kw)
    try:
        code = cli.main(["--model", str(model), "--prompt", PROMPT, "--steps", "2", "--output",
                         str(tmp_path / "out.mp4"), *args])
    finally:
        cogpipe.video.write_mp4 = original
    return code, (seen[0] if seen else None)


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory):
    """The base pipeline folder's video, what every converted form of it must give bit for bit."""
    code, frames = _frames(base, tmp_path_factory.mktemp("reference"))
    assert code == 0
    return frames


def test_a_sat_folder_converts_once_and_generates_what_the_diffusers_folder_does(base, sat, cache, tmp_path, capsys,
                                                                                 reference):
    before = model_sources.conversions
    code, first = _frames(sat, tmp_path, "--base", str(base))
    assert code == 0 and model_sources.conversions == before + 1
    assert "converting" in capsys.readouterr().out
    np.testing.assert_array_equal(first, reference)  # SAT <-> Diffusers is bit-exact
    code, second = _frames(sat, tmp_path, "--base", str(base))
    assert code == 0 and model_sources.conversions == before + 1  # the cache, not a second conversion
    np.testing.assert_array_equal(second, reference)
    entry, = [p for p in cache.iterdir() if p.is_dir()]
    manifest = json.loads((entry / model_sources.MANIFEST).read_text())
    assert manifest["kind"] == "sat-pipeline" and any(f.startswith("transformer/") for f in manifest["files"])
    assert (entry / "model_index.json").is_file() and (entry / "tokenizer" / "spiece.model").is_file()


def test_a_changed_source_is_converted_anew(base, sat, cache, tmp_path):
    import shutil

    source = tmp_path / "sat"
    shutil.copytree(sat, source)
    first = model_sources.resolve(source, base=str(base))
    assert first.converted
    model_file = source / "transformer" / "1" / "mp_rank_00_model_states.pt"
    sd = torch.load(model_file, weights_only=True)
    key = next(k for k in sd["module"] if k.endswith("final_layernorm.weight"))
    sd["module"][key] = sd["module"][key] + 1
    torch.save(sd, model_file)
    second = model_sources.resolve(source, base=str(base))
    assert second.converted and second.entry != first.entry
    from safetensors.torch import load_file

    weights = {}
    for f in (second.entry / "transformer").glob("*.safetensors"):
        weights.update(load_file(str(f)))
    torch.testing.assert_close(weights["norm_final.weight"], sd["module"][key].to(weights["norm_final.weight"].dtype))
    assert not model_sources.resolve(source, base=str(base)).converted


def test_a_tampered_cache_entry_is_refused_and_rebuilt(base, sat, cache, tmp_path):
    logs = []
    entry = model_sources.resolve(sat, base=str(base), log=logs.append).entry
    shard = sorted((entry / "transformer").glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-8:] = bytes(8)  # a few bytes of a tensor changed, the size kept
    shard.write_bytes(bytes(data))
    again = model_sources.resolve(sat, base=str(base), log=logs.append)
    assert again.converted and any("refusing the cached conversion" in m and "changed" in m for m in logs)
    assert model_sources.verify_entry(again.entry) is None
    (again.entry / "transformer" / "extra.bin").write_bytes(b"x")
    assert "not in the manifest" in model_sources.verify_entry(again.entry)


def test_without_a_base_the_released_model_is_named_when_offline(sat, cache, tmp_path, capsys):
    code, _ = _frames(sat, tmp_path)
    err = capsys.readouterr().err
    assert code == 2 and "THUDM/CogVideoX-5b" in err and "--base PATH" in err and "VAE, T5 text encoder" in err


@pytest.mark.parametrize("form", ["sat-pt", "diffusers-safetensors", "comfyui-native"])
def test_a_single_file_transformer_generates(base, sat, cache, tmp_path, form, reference):
    from safetensors.torch import save_file

    from cogpipe import weights

    if form == "sat-pt":
        file = tmp_path / "transformer.pt"
        file.write_bytes((sat / "transformer" / "1" / "mp_rank_00_model_states.pt").read_bytes())
    elif form == "comfyui-native":  # native -> Diffusers in the cache: the same video, bit for bit
        from cogpipe.convert import convert

        file = convert(base, tmp_path / "model_comfyui_core.safetensors", to="comfyui").files[0]
    else:
        file = tmp_path / "transformer.safetensors"
        save_file(weights.load_state_dict(base / "transformer"), str(file))
    code, frames = _frames(file, tmp_path, "--base", str(base))
    assert code == 0
    np.testing.assert_array_equal(frames, reference)


@pytest.mark.parametrize("form", ["sat", "comfyui-native"])
def test_model_pretrained_in_a_recipe_takes_a_sat_folder_or_native_file(base, sat, cache, tmp_path, form):
    from cogpipe.config import load_config
    from cogpipe.convert import convert
    from cogpipe.weights import load_state_dict

    from helpers import REPO

    source = sat if form == "sat" else convert(base, tmp_path / "m.safetensors", to="comfyui").files[0]
    cfg = load_config(REPO / "configs" / "tiny_lora.yaml", [f"model.pretrained={source}", f"model.base={base}",
                                                            "data.root=data/tiny"])
    assert cfg.model.pretrained.startswith(str(cache))
    index = json.loads((model_sources.Path(cfg.model.pretrained) / "model_index.json").read_text())
    assert index["_class_name"] == "CogVideoXPipeline"
    converted = load_state_dict(model_sources.Path(cfg.model.pretrained) / "transformer")
    original = load_state_dict(base / "transformer")
    assert set(converted) == set(original) and all(torch.equal(converted[k], original[k]) for k in original)


# --- LoRAs -------------------------------------------------------------------------------------------------------


def _comfy(lora, which="wrapper"):
    file, = (lora / "comfyui").glob(f"*_comfyui_{which}.safetensors")
    return file


def test_the_export_writes_every_lora_form_and_a_model_card(trained):
    out, cfg, _ = trained
    lora = out / "lora"
    assert len(list((lora / "comfyui").glob("*.safetensors"))) == 2
    comfy = _comfy(lora)
    assert (lora / "sat" / "latest").is_file() and (lora / "sat" / "1" / "mp_rank_00_model_states.pt").is_file()
    card = (lora / "README.md").read_text()
    assert f"`comfyui/{_comfy(lora, 'core').name}`: for ComfyUI core" in card
    assert f"`comfyui/{comfy.name}`: for kijai's ComfyUI-CogVideoXWrapper" in card
    assert "rank / alpha | 4 / 8" in card and "steps | 4" in card and cfg.validation.prompts[0] in card
    assert (lora / "validation_strip.png").is_file() and "validation_strip.png" in card
    from PIL import Image

    strip = Image.open(lora / "validation_strip.png")
    assert strip.size[1] == 2 * 66  # one 64x64 row (1-pixel borders), scaled 2x
    from safetensors.torch import load_file

    keys = load_file(str(comfy))
    assert "lora_unet_transformer_blocks_0_attn1_to_out_0.alpha" in keys
    assert keys["lora_unet_transformer_blocks_1_attn1_to_v.lora_down.weight"].shape == (4, 32)
    # the trained strength (alpha 8 / rank 4) applies whatever reads it: B x alpha / rank is 2 x the trained B
    from cogpipe import checkpoint

    trained_b = load_file(str(out / "checkpoints" / "checkpoint-000004" / checkpoint.TRAINABLE))[
        "transformer_blocks.0.attn1.to_q.lora_B.default.weight"]
    comfy_b = keys["lora_unet_transformer_blocks_0_attn1_to_q.lora_up.weight"]
    scale = keys["lora_unet_transformer_blocks_0_attn1_to_q.alpha"].item() / 4
    torch.testing.assert_close(comfy_b * scale, 2 * trained_b)
    diffusers_file = load_file(str(lora / "pytorch_lora_weights.safetensors"))
    torch.testing.assert_close(diffusers_file["transformer.transformer_blocks.0.attn1.to_q.lora_B.weight"],
                               2 * trained_b)  # baked, with alpha = rank stored: older diffusers apply it as well


def _peft_copy(lora_dir, tmp_path):
    """The same LoRA as peft's save_pretrained writes it: base_model.model.* keys, adapter_config.json."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    file = lora_dir / "pytorch_lora_weights.safetensors"
    state = load_file(str(file))
    with safe_open(str(file), "pt") as f:  # the alpha the diffusers file stores
        alpha = json.loads(f.metadata()["lora_adapter_metadata"])["transformer.lora_alpha"]
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file({k.replace("transformer.", "base_model.model.", 1): v for k, v in state.items()},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": alpha, "peft_type": "LORA",
                                                             "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}))
    return folder


def test_sat_comfyui_and_peft_loras_give_the_diffusers_loras_video(trained, tmp_path):
    out, _, _ = trained
    lora = out / "lora"
    code, plain = _frames(out / "export", tmp_path)
    videos = {}
    for name, path in (("diffusers", lora), ("sat", lora / "sat"), ("comfyui", _comfy(lora)),
                       ("comfyui-core", _comfy(lora, "core")), ("peft", _peft_copy(lora, tmp_path))):
        code, videos[name] = _frames(out / "export", tmp_path, "--lora", str(path))
        assert code == 0, name
    assert np.abs(videos["diffusers"].astype(int) - plain).max() > 0  # the LoRA does something
    for name in ("sat", "comfyui", "comfyui-core", "peft"):
        np.testing.assert_array_equal(videos[name], videos["diffusers"], err_msg=name)


def test_lora_formats_are_detected_with_their_alpha(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    from cogpipe.inference import load_pipeline
    from cogpipe.lora_formats import read_lora

    out, _, _ = trained
    names = [n for n, _ in load_pipeline(out / "export").transformer.named_modules()]
    comfy, core = _comfy(out / "lora"), _comfy(out / "lora", "core")
    underscored = tmp_path / "core_underscored.safetensors"  # the other native form ComfyUI accepts
    flat = {}
    for k, v in load_file(str(core)).items():  # diffusion_model.blocks.0.q.lora_down.weight -> lora_unet_blocks_0_q...
        elem = next(e for e in ("lora_down.weight", "lora_up.weight", "alpha") if k.endswith("." + e))
        flat["lora_unet_" + k[len("diffusion_model."):-len(elem) - 1].replace(".", "_") + "." + elem] = v
    save_file(flat, str(underscored))
    forms = {lw.format: lw for lw in (read_lora(out / "lora"), read_lora(out / "lora" / "sat"),
                                      read_lora(comfy, names), read_lora(_peft_copy(out / "lora", tmp_path)),
                                      read_lora(core))}
    assert set(forms) == {"diffusers", "sat", "comfyui", "peft", "comfyui-native"}
    again = read_lora(underscored, names)
    assert again.format == "comfyui-native" and again.config == forms["comfyui-native"].config
    assert all(torch.equal(again.state[k], v) for k, v in forms["comfyui-native"].state.items())
    from cogpipe import checkpoint

    trained_state = load_file(str(out / "checkpoints" / "checkpoint-000004" / checkpoint.TRAINABLE))
    for lw in forms.values():  # each gives every module the trained delta: alpha / rank x B = (8 / 4) x trained B
        assert len(lw.modules) == 8
        for m in lw.modules:
            b = lw.state[f"transformer.{m}.lora_B.weight"]
            want = 2 * trained_state[f"{m}.lora_B.default.weight"]
            torch.testing.assert_close(lw.alpha(m) / 4 * b, want, msg=f"{lw.format} {m}")
    assert forms["sat"].alpha(lw.modules[0]) == 1.0  # SAT: alpha 1 (its LoraMixin's default), the rest in B


def test_every_module_of_the_core_lora_is_one_comfyui_core_applies(trained, tmp_path):
    """ComfyUI core's own acceptance (tests/fixtures/comfy.py, from comfy/lora.py): the key map it builds for its
    native CogVideoX model takes every module of the core file, each up @ down of the weight's shape, no key left
    over; the wrapper's and the diffusers file get nothing there (what the issue found). Unknown keys are an error."""
    from safetensors.torch import load_file, save_file

    from cogpipe.convert.mapping import diffusers_module
    from cogpipe.family import LORA_FILE
    from cogpipe.lora_formats import read_lora
    from cogpipe.models import build_transformer

    from fixtures import comfy

    out, cfg, _ = trained
    config = dict(build_transformer(cfg.model, torch.float32).config)
    port = comfy.port_shapes(config)
    key_map = comfy.lora_key_map(port)
    core = load_file(str(_comfy(out / "lora", "core")))
    patches, left = comfy.load_lora(core, key_map)
    modules = read_lora(out / "lora").modules
    assert len(patches) == len(modules) == 8 and not left
    lora = read_lora(out / "lora")
    for weight, (up, down, alpha) in patches.items():
        assert (up.shape[0], down.shape[1]) == port[weight[len("diffusion_model."):]], weight
        module = diffusers_module(weight[len("diffusion_model."):-len(".weight")])
        assert torch.equal(up, lora.state[f"transformer.{module}.lora_B.weight"]) and alpha == lora.alpha(module)
    for other in (load_file(str(_comfy(out / "lora"))), load_file(str(out / "lora" / LORA_FILE))):
        patches, left = comfy.load_lora(other, key_map)
        assert not patches and len(left) == len(other)
    core["diffusion_model.blocks.0.cross_q.lora_down.weight"] = torch.zeros(4, 32)
    save_file(core, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match=r"diffusion_model\.blocks\.0\.cross_q\.lora_down\.weight"):
        read_lora(tmp_path / "extra.safetensors")
