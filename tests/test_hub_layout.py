"""The real path on pipeline folders laid out as the hub's CogVideoX repositories (fixtures/hub.py: SentencePiece
tokenizer without tokenizer.json, sharded weights), for all five versions: train a LoRA and a full fine-tune,
export, generate with infer.py, convert with `cogpipe convert`, plan with `cogpipe plan`."""

import json

import pytest
import torch
from safetensors.torch import load_file

from cogpipe.config import load_config

from fixtures.hub import PIPELINES, VERSIONS, write_hub_pipeline
from helpers import REPO, tiny_overrides

RECIPE = REPO / "configs" / "tiny_lora.yaml"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return {v: write_hub_pipeline(root / v, v) for v in VERSIONS}


def _train(hub_folder, clips, base, mode: str):
    from cogpipe.training import train

    overrides = tiny_overrides(clips, base / "out", base / "cache", **{
        "model.pretrained": hub_folder, "train.mode": mode, "train.max_steps": 2, "train.checkpoint_every": 0})
    cfg = load_config(RECIPE, overrides)
    return train(cfg)


def _generate(model, tmp_path, name, *extra) -> "torch.Tensor":
    import infer
    from cogpipe.video import read_video

    out = tmp_path / f"{name}.mp4"
    assert infer.main(["--model", str(model), "--prompt", "a purple square moving left", "--steps", "2",
                       "--output", str(out), *extra]) == 0
    return read_video(out)


def _first_frame(clips, tmp_path):
    from PIL import Image

    from cogpipe.video import read_video

    path = tmp_path / "first.png"
    Image.fromarray(read_video(next((clips / "videos").glob("*.mp4")))[0]).save(path)
    return ["--image", str(path)]


@pytest.mark.parametrize("version", VERSIONS)
def test_lora_trains_exports_and_generates(hub, clips, tmp_path, version):
    out = _train(hub[version], clips, tmp_path, "lora")
    export = out / "export"
    index = json.loads((export / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINES[version]
    assert (export / "tokenizer" / "spiece.model").is_file()  # the SentencePiece tokenizer travels with it
    from transformers import AutoTokenizer

    ids = [AutoTokenizer.from_pretrained(folder, subfolder="tokenizer")("a purple square").input_ids
           for folder in (hub[version], export)]
    assert ids[0] == ids[1] and len(ids[0]) > 3
    lora = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert lora and all(k.startswith("transformer.") and ".lora_" in k for k in lora)
    image = _first_frame(clips, tmp_path) if version.endswith("i2v") else []
    video = _generate(export, tmp_path, version, "--lora", str(out / "lora"), *image)
    assert video.shape == (17, 64, 64, 3)
    base = _generate(hub[version], tmp_path, f"{version}-base", *image)  # the hub folder itself, as downloaded
    assert base.shape == (17, 64, 64, 3)


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_full_fine_tune_trains_and_exports(hub, clips, tmp_path, version):
    from diffusers import CogVideoXTransformer3DModel

    out = _train(hub[version], clips, tmp_path, "full")
    trained = CogVideoXTransformer3DModel.from_pretrained(out / "export" / "transformer")
    before = CogVideoXTransformer3DModel.from_pretrained(hub[version] / "transformer")
    changed = [n for n, p in trained.state_dict().items() if not torch.equal(p, before.state_dict()[n])]
    assert len(changed) > len(trained.state_dict()) // 2  # every weight trains (a few get no gradient at 2 steps)
    assert not (out / "lora").exists()
    # the same transformer in ComfyUI core's native single file, read back exactly by the command line
    from cogpipe import weights
    from cogpipe.cli import main

    native, = (out / "export" / "comfyui").glob("*_comfyui_core.safetensors")
    assert main(["convert", str(native), str(tmp_path / "back")]) == 0
    a, b = weights.load_state_dict(out / "export" / "transformer"), weights.load_state_dict(tmp_path / "back")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("version", VERSIONS)
def test_convert_round_trip_and_plan(hub, tmp_path, capsys, version):
    from cogpipe.cli import main

    src = hub[version] / "transformer"
    assert main(["convert", str(src), str(tmp_path / "sat")]) == 0
    # SAT files do not store the sample shape; a learned position table (5B-I2V) needs the toy's, as any custom size
    shape = ["--set", "transformer.sample_frames=17", "--set", "transformer.sample_height=8", "--set",
             "transformer.sample_width=8", "--set", f"transformer.max_text_seq_length={16}"]
    extra = shape if version == "5b-i2v" else []
    assert main(["convert", str(tmp_path / "sat"), str(tmp_path / "back"), *extra]) == 0
    from cogpipe import weights

    a, b = weights.load_state_dict(src), weights.load_state_dict(tmp_path / "back")
    assert set(a) <= set(b) and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert main(["plan", "--config", str(RECIPE), f"model.pretrained={hub[version]}", "data.root=data/tiny",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model = plan["estimate"]["model"]
    assert model["layers"] == 2 and model["hidden"] == 32 and model["i2v"] == version.endswith("i2v")
    assert model["version"] == ("1.5" if version.startswith("1.5") else "1.0") and model["note"] is None


def test_lora_export_keeps_the_base_dtype_or_skips_the_base(hub, clips, tmp_path):
    """A bf16 base stays bf16 in the export (the base's own files, not fp32 copies); export.copy_base=false
    leaves the LoRA alone, and the end-of-run render loads it onto the base."""
    import shutil

    from diffusers import CogVideoXTransformer3DModel
    from transformers import T5EncoderModel

    from cogpipe.training import train

    base = tmp_path / "bf16"
    shutil.copytree(hub["5b"], base)
    for part, cls in (("transformer", CogVideoXTransformer3DModel), ("text_encoder", T5EncoderModel)):
        model = cls.from_pretrained(base / part, dtype=torch.bfloat16)
        shutil.rmtree(base / part)
        model.save_pretrained(base / part)
    overrides = {"model.pretrained": base, "model.weight_dtype": "bf16", "train.max_steps": 1,
                 "train.checkpoint_every": 0}
    out = train(load_config(RECIPE, tiny_overrides(clips, tmp_path / "a", tmp_path / "c", **overrides)))
    for part in ("transformer", "text_encoder"):
        for f in (out / "export" / part).glob("*.safetensors"):
            assert {t.dtype for t in load_file(str(f)).values()} == {torch.bfloat16}, f
            assert f.read_bytes() == (base / part / f.name).read_bytes()
    out = train(load_config(RECIPE, tiny_overrides(clips, tmp_path / "b", tmp_path / "c",
                                                    **overrides, **{"export.copy_base": "false"})))
    assert not (out / "export").exists() and (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert len(list((out / "validation").glob("*.mp4"))) == 1  # rendered from the base + the LoRA
