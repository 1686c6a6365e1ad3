"""infer.py as users run it, on the hub-layout fixtures of the five versions (tests/fixtures/hub.py) and the
shipped model: the model's own settings by default, checks before any weights load, schedulers, v2v, offload,
quantization, several videos, and the end of the run (time, peak memory)."""

import numpy as np
import pytest
from PIL import Image

from cogpipe import family

from fixtures.hub import VERSIONS, transformer_config, vae_config, write_hub_pipeline
from helpers import REPO, same_video, video_difference

PROMPT = "a purple square moving left"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return {v: write_hub_pipeline(root / v, v) for v in VERSIONS}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    from cogpipe.video import write_mp4
    from cogpipe.world.render import render

    root = tmp_path_factory.mktemp("media")
    clip = render("square", "red", "left", frames=17, size=64, seed=1)
    write_mp4(clip, root / "clip.mp4")
    Image.fromarray(clip[0]).save(root / "first.png")
    return root


def _infer(tmp_path, name, *args, prompt=PROMPT, steps="2"):
    """Run infer.main in this process; returns (exit code, the videos it wrote as arrays, their paths)."""
    import cogpipe.video
    import infer  # noqa: F401 (the entry point imports)
    from cogpipe.inference import cli

    written, original = {}, cogpipe.video.write_mp4

    def keep(frames, path, fps=8, **kw):
        written[str(path)] = (np.asarray(frames), fps)
        return original(frames, path, fps=fps, **kw)

    cogpipe.video.write_mp4 = keep
    try:
        code = cli.main(["--prompt", prompt, *(["--steps", steps] if steps else []), "--output",
                         str(tmp_path / f"{name}.mp4"), *args])
    finally:
        cogpipe.video.write_mp4 = original
    return code, written


def _media_args(version, media):
    return ["--image", str(media / "first.png")] if version.endswith("i2v") else []


# --- the model's own settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["2b", "5b", "5b-i2v", "1.5-5b", "1.5-5b-i2v"])
def test_released_models_default_to_their_card(name):
    v = family.VARIANTS[name]
    clip = family.default_clip(dict(v.transformer), dict(v.vae))
    assert (clip["frames"], clip["height"], clip["width"], clip["fps"]) == \
        ((81, 768, 1360, 16) if name.startswith("1.5") else (49, 480, 720, 8))


def test_1_5_i2v_takes_the_size_from_the_image_within_the_card_rules():
    t, vae = dict(family.VARIANTS["1.5-5b-i2v"].transformer), dict(family.VARIANTS["1.5-5b-i2v"].vae)
    size = {}
    for image in [(1280, 720), (720, 1280), (1000, 1000), (3000, 1000), (1024, 768)]:  # (width, height)
        clip = family.default_clip(t, vae, image)
        size[image] = (clip["height"], clip["width"])
    assert size[(1280, 720)] == (768, 1360) and size[(720, 1280)] == (1360, 768)  # 16:9 either way
    assert size[(1000, 1000)] == (768, 768)
    assert size[(3000, 1000)] == (768, 1360)  # the longer side capped at 1360
    assert size[(1024, 768)] == (768, 1024)  # 4:3 kept
    for h, w in size.values():
        assert not family.shape_problems(t, 81, h, w)


def test_scaled_down_and_tiny_models_report_what_they_were_trained_at():
    from cogpipe.inference.settings import folder_fps

    tiny_world = REPO / "models" / "tiny-world"
    import json

    t = json.loads((tiny_world / "transformer" / "config.json").read_text())
    vae = json.loads((tiny_world / "vae" / "config.json").read_text())
    assert family.default_clip(t, vae, fps=folder_fps(tiny_world)) == dict(frames=17, height=64, width=64, fps=8)
    for version in VERSIONS:  # hidden 32: not the released model, whatever its structure
        clip = family.default_clip(transformer_config(version), vae_config(version))
        assert clip == dict(frames=17, height=64, width=64, fps=16 if version.startswith("1.5") else 8)


@pytest.mark.parametrize("version", VERSIONS)
def test_hub_fixtures_generate_at_their_own_settings_with_dpm(hub, media, tmp_path, version):
    code, written = _infer(tmp_path, version, "--model", str(hub[version]), "--scheduler", "dpm",
                           *_media_args(version, media))
    assert code == 0
    (frames, fps), = written.values()
    assert frames.shape == (17, 64, 64, 3) and fps == (16 if version.startswith("1.5") else 8)
    from cogpipe.video import read_video

    assert read_video(next(iter(written))).shape == (17, 64, 64, 3)


def test_dpm_and_ddim_sample_differently_and_the_same_seed_repeats(hub, tmp_path):
    from cogpipe.inference import generate, load_pipeline

    pipe = load_pipeline(hub["5b"], scheduler="dpm")
    assert type(pipe.scheduler).__name__ == "CogVideoXDPMScheduler"
    assert pipe.scheduler.config.timestep_spacing == "trailing" and pipe.scheduler.config.snr_shift_scale == 1.0
    a = generate(pipe, PROMPT, steps=3, seed=4)
    np.testing.assert_array_equal(a, generate(pipe, PROMPT, steps=3, seed=4))
    ddim = generate(load_pipeline(hub["5b"], scheduler="ddim"), PROMPT, steps=3, seed=4)
    assert np.abs(a.astype(int) - ddim).max() > 0
    assert np.abs(generate(pipe, PROMPT, steps=3, seed=4, dynamic_cfg=False).astype(int) - a).max() > 0  # dpm: on


def test_auto_scheduler_is_dpm_for_released_models_and_the_folders_own_otherwise(hub):
    from diffusers import CogVideoXDDIMScheduler

    from cogpipe.inference.pipeline import set_scheduler

    class Pipe:
        scheduler = CogVideoXDDIMScheduler(**family.scheduler_config("5b"))

    assert set_scheduler(Pipe(), "auto", dict(family.VARIANTS["5b"].transformer)) == "dpm"
    assert set_scheduler(Pipe(), "auto", transformer_config("5b")) == "ddim"  # scaled-down: what it was shown with


@pytest.mark.parametrize("args,match", [
    (["--num-frames", "18"], "--num-frames: CogVideoX 1.0 needs 8N\\+1 frames"),
    (["--height", "72"], "--height/--width: height and width must be positive multiples of 16"),
    (["--video", "nope.mp4"], "--video nope.mp4: no such file"),
])
def test_a_broken_rule_is_an_error_before_any_weights_load(hub, tmp_path, monkeypatch, capsys, args, match):
    import re

    from cogpipe.inference import pipeline

    monkeypatch.setattr(pipeline, "load_pipeline", lambda *a, **k: pytest.fail("weights loaded"))
    from cogpipe.inference import cli

    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: pytest.fail("weights loaded"), raising=False)
    code, _ = _infer(tmp_path, "x", "--model", str(hub["5b"]), *args)
    assert code == 2 and re.search(match, capsys.readouterr().err)


def test_image_and_video_must_fit_the_model(hub, media, tmp_path, capsys):
    assert _infer(tmp_path, "a", "--model", str(hub["5b-i2v"]))[0] == 2
    assert "is image-to-video: pass its first frame with --image" in capsys.readouterr().err
    assert _infer(tmp_path, "b", "--model", str(hub["5b"]), "--image", str(media / "first.png"))[0] == 2
    assert "is text-to-video" in capsys.readouterr().err
    assert _infer(tmp_path, "c", "--model", str(hub["1.5-5b"]), "--video", str(media / "clip.mp4"))[0] == 2
    assert "CogVideoXVideoToVideoPipeline does not pad the latent frames of CogVideoX 1.5" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("version", ["2b", "5b"])
def test_video_to_video_follows_the_clip(hub, media, tmp_path, version):
    code, written = _infer(tmp_path, "t2v", "--model", str(hub[version]), steps="4")
    (t2v, _), = written.values()
    runs = {}
    for strength in ("0.25", "0.75"):  # of 4 steps: the last 1, the last 3
        code, written = _infer(tmp_path, f"v2v{strength}", "--model", str(hub[version]), "--video",
                               str(media / "clip.mp4"), "--strength", strength, steps="4")
        assert code == 0
        (runs[strength], _), = written.values()
        assert runs[strength].shape == (17, 64, 64, 3)
    assert np.abs(runs["0.25"].astype(int) - t2v).max() > 0
    assert np.abs(runs["0.25"].astype(int) - runs["0.75"]).max() > 0


def test_offload_on_the_cpu_says_it_needs_an_accelerator_and_still_generates(hub, tmp_path, capsys):
    code, plain = _infer(tmp_path, "plain", "--model", str(hub["5b"]))
    code, written = _infer(tmp_path, "offload", "--model", str(hub["5b"]), "--offload", "model")
    out = capsys.readouterr().out
    assert code == 0 and "--offload model: offloading moves weights between CPU memory and an accelerator" in out
    np.testing.assert_array_equal(next(iter(written.values()))[0], next(iter(plain.values()))[0])
    assert "wrote" in out and " s" in out.splitlines()[-1]  # the time taken (no GPU: no peak memory)


def test_quantize_int8_generates_close_to_full_precision(hub, tmp_path, capsys):
    pytest.importorskip("torchao", reason="the quantize extra (torchao) is not installed")
    code, plain = _infer(tmp_path, "plain", "--model", str(hub["5b"]))
    code, written = _infer(tmp_path, "int8", "--model", str(hub["5b"]), "--quantize", "int8")
    assert code == 0 and "quantized the transformer and text encoder weights to int8" in capsys.readouterr().out
    from torchao.quantization import Int8WeightOnlyConfig  # noqa: F401 (the extra's API this uses)

    (q, _), = written.values()
    (p, _), = plain.values()
    assert q.shape == p.shape and np.abs(q.astype(int) - p).mean() < 8  # weight-only int8: close, not equal


def test_quantize_without_torchao_fails_before_any_weights_load(tmp_path, capsys, monkeypatch):
    import importlib.util

    from cogpipe import model_sources

    def no_torchao(name, *a, **kw):
        return None if name == "torchao" else find_spec(name, *a, **kw)

    def no_loading(*a, **kw):
        raise AssertionError("the model was resolved before the torchao check")

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", no_torchao)
    monkeypatch.setattr(model_sources, "resolve", no_loading)
    assert _infer(tmp_path, "int8", "--quantize", "int8")[0] == 2
    err = capsys.readouterr().err
    assert '--quantize int8 needs torchao, the `quantize` extra: pip install -e ".[quantize]"' in err
    assert not (tmp_path / "int8.mp4").exists()


def test_fp8_needs_a_recent_gpu(hub, tmp_path, capsys):
    assert _infer(tmp_path, "fp8", "--model", str(hub["5b"]), "--quantize", "fp8")[0] == 2
    assert "--quantize fp8 needs an NVIDIA GPU of compute capability 8.9 or newer" in capsys.readouterr().err


def test_several_videos_each_with_its_own_seed(hub, tmp_path):
    code, written = _infer(tmp_path, "many", "--model", str(hub["5b"]), "--num-videos", "2", "--seed", "3")
    assert code == 0 and sorted(p.rsplit("/", 1)[-1] for p in written) == ["many-0.mp4", "many-1.mp4"]
    a, b = (v for v, _ in written.values())
    assert np.abs(a.astype(int) - b).max() > 0
    code, single = _infer(tmp_path, "seed4", "--model", str(hub["5b"]), "--seed", "4")
    np.testing.assert_array_equal(next(iter(single.values()))[0], b)  # video i is seed + i


def test_the_shipped_model_still_makes_its_readme_strip(tmp_path):
    """`python infer.py --prompt P` with nothing else: the shipped model at 17 frames, 64x64, 8 fps, 50 steps, and
    the frames of the README's strip (docs/tiny_world_strip.png: a row per prompt, every other frame, 1-pixel white
    borders, scaled 2x), within helpers.same_video's tolerance: the strip was drawn on another CPU, whose float
    kernels round differently."""
    import imageio

    from cogpipe.inference import cli
    from cogpipe.world.strip import PROMPTS

    code, written = _infer(tmp_path, "shipped", prompt=PROMPTS[0], steps=None)
    assert code == 0
    (frames, fps), = written.values()
    assert frames.shape == (17, 64, 64, 3) and fps == 8
    strip = np.asarray(imageio.imread(REPO / "docs" / "tiny_world_strip.png"))[::2, ::2, :3]
    rows = [np.stack([strip[66 * i + 1:66 * i + 65, 66 * j + 1:66 * j + 65] for j in range(9)]) for i in range(2)]
    assert same_video(rows[0], frames[::2]), video_difference(rows[0], frames[::2])  # row 0: PROMPTS[0]
    assert not same_video(rows[1], frames[::2])  # the tolerance still tells another prompt's video apart
    assert cli.DEFAULT_STEPS == 50
