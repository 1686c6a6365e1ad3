"""Fast generation (cogpipe/inference/speed.py, cogpipe/attention.py) on the shipped tiny-world model: threshold 0
and method none give the uncached video bit for bit, each cache skips what its report says, the attention goes
through cogpipe's processor (and SageAttention, absent here, fails before any weights load), --compile compiles
each block, and infer.py prints what the cache skipped."""

import json

import pytest
import torch

from cogpipe.inference import speed as sp

from helpers import REPO

PROMPT = "a blue circle moving up"
STEPS = 6


@pytest.fixture(scope="module")
def pipe():
    from cogpipe.inference import load_pipeline

    return load_pipeline(None, device="cpu")


def _latents(pipe, steps=STEPS):
    """The final latents of one generation (float, before the VAE), and the report of it."""
    report = sp.begin(pipe, steps)
    out = pipe(PROMPT, num_frames=17, height=64, width=64, num_inference_steps=steps, guidance_scale=6.0,
               max_sequence_length=pipe.transformer.config.max_text_seq_length, output_type="latent",
               generator=torch.Generator("cpu").manual_seed(0)).frames
    return out, report


@pytest.fixture(scope="module")
def uncached(pipe):
    """diffusers' own processors, no cogpipe hooks at all."""
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

    sp.remove(pipe.transformer)
    assert all(type(b.attn1.processor) is CogVideoXAttnProcessor2_0 for b in pipe.transformer.transformer_blocks)
    return _latents(pipe)[0]


@pytest.mark.parametrize("cache,threshold", [("none", None), ("fbc", 0), ("teacache", 0), ("magcache", 0),
                                             ("pab", 0), ("fastercache", 1), ("taylorseer", 0)])
def test_threshold_zero_gives_the_uncached_video_bit_for_bit(pipe, uncached, cache, threshold, tmp_path):
    from cogpipe.attention import KernelAttnProcessor

    fit = None
    if cache == "magcache":  # ratios below 1: the accumulated error is above 0 at every step
        fit = tmp_path / "fit.json"
        fit.write_text(json.dumps({"teacache_coefficients": sp.IDENTITY, "mag_ratios": [0.9] * STEPS}))
    speed = sp.Speed(cache, threshold, fit=str(fit) if fit else None)
    report = sp.apply(pipe, speed, STEPS)
    try:
        assert speed.active == (cache in ("fbc", "teacache", "magcache"))  # their hooks are in, and skip nothing
        assert pipe.transformer.is_cache_enabled == (cache in ("fbc", "magcache"))
        assert (getattr(pipe.transformer, "_cogpipe_teacache", None) is not None) == (cache == "teacache")
        latents, report = _latents(pipe)
        assert torch.equal(latents, uncached)
        d = report.as_dict()
        blocks = len(pipe.transformer.transformer_blocks)
        assert d["steps"] == STEPS and d["block_evaluations_skipped"] == 0 and d["steps_skipped"] == 0
        assert d["block_evaluations_done"] == STEPS * blocks == d["attention_evaluations_done"]
        # every attention went through cogpipe's processor and its counted SDPA kernel
        assert all(isinstance(b.attn1.processor, KernelAttnProcessor) and b.attn1.processor.kernel.name == "sdpa"
                   for b in pipe.transformer.transformer_blocks)
    finally:
        sp.remove(pipe.transformer)


def test_caches_skip_what_they_report(pipe, uncached):
    """Above 0 each method skips work; the report's counts add up; the video stays near the uncached one."""
    blocks = len(pipe.transformer.transformer_blocks)
    seen = {}
    for cache, threshold in [("teacache", 0.3), ("fbc", 0.5), ("pab", 3), ("taylorseer", 2)]:
        sp.apply(pipe, sp.Speed(cache, threshold), 12)
        try:
            latents, report = _latents(pipe, 12)
        finally:
            sp.remove(pipe.transformer)
        d = report.as_dict()
        seen[cache] = d
        assert d["steps"] == 12 and len(d["blocks_per_step"]) == 12
        assert d["block_evaluations"] == 12 * blocks
        assert d["block_evaluations_done"] + d["block_evaluations_skipped"] == d["block_evaluations"]
        assert d["steps_skipped"] == sum(1 for b in d["blocks_per_step"] if b < blocks)
        assert d["blocks_per_step"][0] == blocks  # the first step always runs in full
        assert not torch.isnan(latents).any()
    # whole steps skipped by TeaCache (every block or none), after the first block by FBC
    assert seen["teacache"]["steps_skipped"] > 0 and set(seen["teacache"]["blocks_per_step"]) <= {0, blocks}
    assert seen["fbc"]["steps_skipped"] > 0 and set(seen["fbc"]["blocks_per_step"]) <= {1, blocks}
    # PAB reuses attention only: every block runs, a third of the attentions in (100, 800) are computed
    assert seen["pab"]["block_evaluations_skipped"] == 0 and seen["pab"]["attention_evaluations_skipped"] > 0
    assert seen["taylorseer"]["block_evaluations_skipped"] > 0
    assert sp.report_of(pipe) is None  # removed


def test_teacache_uses_the_published_coefficients_of_the_version(pipe):
    from cogpipe import family

    for name, coefficients in sp.TEACACHE_COEFFICIENTS.items():
        assert sp.teacache_coefficients(dict(family.VARIANTS[name].transformer)) == coefficients
    said = []
    assert sp.teacache_coefficients(dict(pipe.transformer.config), log=said.append) == sp.IDENTITY
    assert "teacache-fit" in said[0]


def test_checks_before_weights(tmp_path, monkeypatch, capsys):
    """Bad speed switches (sage absent here, a threshold of the wrong kind, magcache without ratios, a broken fit
    file) fail with the flag named before any weights load."""
    import cogpipe.inference
    from cogpipe.inference import cli

    assert sp.Kernel("sdpa").name == "sdpa"

    def no_load(*a, **k):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(cogpipe.inference, "load_pipeline", no_load)
    bad = tmp_path / "bad.json"
    bad.write_text('{"teacache_coefficients": [1, 2]}')
    cases = [(["--attention", "sage"], "--attention sage needs SageAttention, which is not installed"),
             (["--cache", "pab", "--cache-threshold", "1.5"], "whole number of steps"),
             (["--cache", "fbc", "--cache-threshold", "-1"], "--cache-threshold must be >= 0"),
             (["--cache", "magcache"], "--cache magcache needs the model's magnitude ratios"),
             (["--cache", "teacache", "--teacache-coefficients", str(bad)], "needs 5 numbers"),
             (["--cache", "teacache", "--teacache-coefficients", str(tmp_path / "none.json")], "no such file")]
    for args, message in cases:
        assert cli.main(["--prompt", PROMPT, "--steps", "1", "--output", str(tmp_path / "x.mp4"), *args]) == 2
        err = capsys.readouterr().err
        assert message in err, (args, err)
    with pytest.raises(ValueError, match="sageattention"):
        sp.Kernel("sage")
    assert not (tmp_path / "x.mp4").exists()


def test_compile_compiles_each_block(pipe):
    """--compile: every transformer block compiled in place (training's models.compile_blocks; lazy: no graph is
    built until the first call, so nothing runs here)."""
    sp.apply(pipe, sp.Speed("teacache", 0.1, compile=True), STEPS)
    try:
        assert all(b._compiled_call_impl is not None for b in pipe.transformer.transformer_blocks)
        assert sp.report_of(pipe).compiled
    finally:
        sp.remove(pipe.transformer)
        for b in pipe.transformer.transformer_blocks:
            b._compiled_call_impl = None


def test_infer_prints_what_the_cache_skipped(tmp_path, capsys):
    from cogpipe.inference import cli

    assert cli.main(["--prompt", PROMPT, "--steps", "8", "--cache", "teacache", "--cache-threshold", "0.3",
                     "--output", str(tmp_path / "t.mp4")]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "t.mp4").is_file()
    line = next(x for x in out.splitlines() if x.startswith("cache teacache (threshold 0.3)"))
    done, total = map(int, line.split(": ")[1].split(" ")[0].split("/"))
    assert total == 8 * 4 and done < total and "steps skipped" in line, line


def test_sequence_parallel_ranks_take_the_same_decisions_as_one_process(tmp_path):
    """2 CPU processes (gloo) generate with FBC and TeaCache across the group: each rank sees another shard of the
    tokens (FBC's metric on a shard alone differs between the ranks), yet both take the group's decision at every
    step, the one one process takes, and the video is one process's."""
    import os
    import subprocess
    import sys

    from helpers import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(REPO / "tests" / "sp_cache.py"), str(tmp_path)]
    r = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert ranks[0]["all_to_alls"] > 0  # the attention really ran across the group
    for cache, blocks in (("fbc", {1, 4}), ("teacache", {0, 4})):
        one, two = ranks[0][cache], ranks[1][cache]
        assert one["decisions"] == two["decisions"] == one["one_process_decisions"]
        assert set(one["decisions"]) == blocks  # some steps skipped, some computed
        assert one["relative_difference"] < 1e-5
    assert ranks[0]["fbc"]["local_metric"] != ranks[1]["fbc"]["local_metric"]  # the shards alone disagree


def test_validation_keys_reach_the_end_of_run_render(tmp_path):
    """validation.cache / cache_threshold / attention: the end-of-run render (from the model, as a user loads it)
    runs with them and writes what they did beside each video; bad values are a ConfigError naming the key."""
    from cogpipe.config import ConfigError, load_config
    from cogpipe.validation import render_validation

    cfg = load_config(REPO / "configs" / "tiny_lora.yaml",
                      [f"output_dir={tmp_path}", "train.mode=full", "validation.steps=6",
                       "validation.cache=teacache", "validation.cache_threshold=0.3",
                       f"data.root={REPO / 'data' / 'tiny'}", f"model.pretrained={REPO / 'models' / 'tiny-world'}"])
    written = render_validation(tmp_path, cfg, 0, prompts=[PROMPT], device="cpu")
    assert [p.name for p in written] == ["step-000000-0.mp4"]
    report = json.loads((tmp_path / "validation" / "step-000000-0.speed.json").read_text())
    assert report["cache"] == "teacache" and report["threshold"] == 0.3 and report["steps"] == 6
    assert 0 < report["block_evaluations_skipped"] < report["block_evaluations"]
    for override, key in [("validation.cache=tea", "validation.cache"),
                          ("validation.attention=sage", "validation.attention"),
                          ("validation.cache=taylorseer", "validation.cache_threshold")]:
        extra = ["validation.cache_threshold=2.5"] if key == "validation.cache_threshold" else []
        with pytest.raises(ConfigError, match=key):
            load_config(REPO / "configs" / "tiny_lora.yaml", [f"output_dir={tmp_path}", override, *extra])


def test_generate_tab_passes_the_speed_fields_and_shows_the_report(tmp_path):
    """The page's Generate tab: its speed fields become infer.py's switches; the video's settings carry what the
    cache skipped; a second generation with other speed settings reuses the loaded weights."""
    from cogpipe.ui import generate as gen
    from cogpipe.ui.safety import PathGuard

    guard = PathGuard([tmp_path, REPO / "models"])
    model = str(REPO / "models" / "tiny-world")
    a = gen.parse(gen.infer_argv(guard, model, PROMPT, cache="fbc", cache_threshold=0.2, attention="sdpa",
                                 compile=True))
    assert (a.cache, a.cache_threshold, a.attention, a.compile) == ("fbc", 0.2, "sdpa", True)
    with pytest.raises(ValueError, match="--cache"):
        gen.parse(gen.infer_argv(guard, model, PROMPT, cache="deepcache"))
    generator = gen.Generator(tmp_path, guard)
    _, first = generator.generate(model=model, prompt=PROMPT, steps=5, cache="teacache", cache_threshold=0.3)
    pipe = generator._pipe
    _, second = generator.generate(model=model, prompt=PROMPT, steps=5)
    assert generator._pipe is pipe
    assert first["cache"] == "teacache" and first["speed"]["steps"] == 5 and first["speed"]["steps_skipped"] > 0
    assert first["blocks_skipped"] == f"{first['speed']['block_evaluations_skipped']}/20"
    assert "block evaluations done" in first["speed_line"]
    assert second["cache"] == "none" and second["blocks_skipped"] == "0/20"


def test_teacache_fit_writes_what_teacache_and_magcache_load(tmp_path, capsys):
    """`cogpipe teacache-fit` on a few generations -> a JSON infer.py takes with --teacache-coefficients: the
    TeaCache polynomial and the MagCache ratios, measured (not the defaults)."""
    from cogpipe.cli import main as cogpipe
    from cogpipe.inference import cli

    fit = tmp_path / "fit.json"
    assert cogpipe(["teacache-fit", "--steps", "4", "--prompts", PROMPT, "a red square moving left",
                    "--output", str(fit)]) == 0
    data = sp.read_fit(fit)
    assert len(data["teacache_coefficients"]) == 5 and data["teacache_coefficients"] != sp.IDENTITY
    assert len(data["mag_ratios"]) == 4 and data["mag_ratios"][0] == 1.0
    assert all(0 < r < 10 for r in data["mag_ratios"][1:]) and len(set(data["mag_ratios"])) > 1
    assert data["points"] == 6 and "TeaCache coefficients" in capsys.readouterr().out
    assert cli.main(["--prompt", PROMPT, "--steps", "4", "--cache", "magcache", "--cache-threshold", "0.5",
                     "--teacache-coefficients", str(fit), "--output", str(tmp_path / "m.mp4")]) == 0
    assert "cache magcache (threshold 0.5)" in capsys.readouterr().out


def test_gpu_check_inference_stage_runs_its_code_paths_tiny(tmp_path):
    """bench/gpu_check.py's inference stage (unrun on a GPU here): on the toy 5B it times eager steps and every
    cache at its recommended threshold, records Sage as absent and leaves compilation and fp8 to the GPU."""
    import sys

    sys.path[:0] = [str(REPO / "bench"), str(REPO / "tests")]
    import gpu_check
    from inference_gpu import part_inference

    assert "inference" in [name for name, _, _ in gpu_check.STAGES]
    result = part_inference(tmp_path, True, tmp_path / "inference.json")
    modes = result["modes"]
    assert json.loads((tmp_path / "inference.json").read_text())["modes"].keys() == modes.keys()
    assert modes["eager"]["s_per_step"] > 0 and modes["eager"]["skipped_fraction"] == 0
    for method in ("fbc", "pab", "fastercache", "teacache", "magcache", "taylorseer"):
        assert "error" not in modes[f"cache-{method}"], modes[f"cache-{method}"]
        assert modes[f"cache-{method}"]["steps"] == 6
    assert modes["cache-taylorseer"]["skipped_fraction"] > 0 and modes["cache-pab"]["attention_skipped"] > 0
    assert "not installed" in modes["sage"]["skipped"] and "GPU" in modes["compiled"]["skipped"]
    with pytest.raises(SystemExit):
        gpu_check.main(["--only", "nonesuch", "--out", str(tmp_path / "x.json"), "--work", str(tmp_path)])


def test_bench_measures_and_plots(tmp_path):
    """bench/inference_speed.py's measures: PSNR and SSIM of identical and of changed videos, the plot written."""
    import sys

    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(REPO / "bench"))
    from inference_speed import plot, psnr, ssim

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    assert psnr(a, a) == float("inf") and ssim(a, a) == pytest.approx(1.0)
    assert 20 < psnr(a, b) < 40 and 0 < ssim(a, b) < 1
    rows = [{"method": "none", "psnr_db": None, "skipped_fraction": 0, "attention_skipped_fraction": 0},
            {"method": "teacache", "psnr_db": 37.0, "skipped_fraction": 0.6, "attention_skipped_fraction": 0.6},
            {"method": "pab", "psnr_db": 50.0, "skipped_fraction": 0.0, "attention_skipped_fraction": 0.4}]
    plot(rows, tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").size == (720, 440)


def test_remove_leaves_the_transformer_as_found(pipe, uncached):
    """What validation during training relies on: after apply + remove the trained transformer has its own
    processors, no cache hooks, no counters, no compiled blocks, and computes the uncached result."""
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

    t = pipe.transformer
    sp.remove(t)
    before = [type(b.attn1.processor) for b in t.transformer_blocks]
    assert before == [CogVideoXAttnProcessor2_0] * len(before)
    for speed in (sp.Speed("teacache", 0.3, compile=True), sp.Speed("fbc", 0.3)):
        sp.apply(pipe, speed, STEPS)
        sp.remove(t)
        assert [type(b.attn1.processor) for b in t.transformer_blocks] == before
        assert not t.is_cache_enabled and sp.report_of(pipe) is None
        assert all(not getattr(b, "_diffusers_hook", None) or not b._diffusers_hook.hooks
                   for b in t.transformer_blocks)
        assert all(b._compiled_call_impl is None for b in t.transformer_blocks)
        assert not t._forward_pre_hooks and not any(b.ff.net[0]._forward_hooks for b in t.transformer_blocks)
    assert torch.equal(_latents(pipe)[0], uncached)
