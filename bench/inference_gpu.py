"""The GPU check's inference stage (bench/gpu_check.py, "inference"): seconds a denoising step of CogVideoX-5B at
49 x 480 x 720 (random bf16 weights, built on the GPU: no download), eager, compiled (regional), fp8 weights +
compiled, SageAttention where installed, and with each step cache at its recommended threshold; the peak memory
of each. A step is one transformer call on the guidance batch of 2, as the pipeline makes it.

Anchors (diffusers-torchao's published table, H100, 50 steps): 112 s eager bf16 (about 2.2 s a step), 87 s
compiled, 75 s fp8 + compiled. Step caches skip whole steps or parts of them: their seconds a step are averaged
over a short run of descending timesteps; with random weights and inputs the skip pattern is not a real model's
(docs/inference.md has the quality measured on a trained model), so what this stage shows is the cost of a
computed and of a skipped step, and that every method runs at this size.

    part_inference(work, tiny, partial)   tiny: the toy 5B of the test fixtures on any device, the same code paths
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import torch

REAL = dict(frames=13, height=60, width=90, text=226)  # 49 x 480 x 720: 13 latent frames of 60 x 90
TINY = dict(frames=3, height=8, width=8, text=8)


def build(tiny: bool, device):
    from diffusers import CogVideoXTransformer3DModel

    from cogpipe import family

    if tiny:
        from fixtures.hub import transformer_config

        config = transformer_config("5b")
    else:
        config = dict(family.VARIANTS["5b"].transformer)
    torch.manual_seed(0)
    with torch.device(device):
        model = CogVideoXTransformer3DModel(**config)
    return model.to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()


def inputs(model, shape, device):
    from cogpipe.diffusion import rotary_embeddings

    cfg, dtype = dict(model.config), model.dtype
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(2, shape["frames"], cfg["in_channels"], shape["height"], shape["width"], generator=g)
    text = torch.randn(2, shape["text"] if shape is TINY else cfg["max_text_seq_length"], cfg["text_embed_dim"],
                       generator=g)
    rope = rotary_embeddings(cfg, shape["frames"], shape["height"], shape["width"], device)
    return dict(hidden_states=x.to(device, dtype), encoder_hidden_states=text.to(device, dtype),
                image_rotary_emb=None if rope is None else tuple(t.to(device) for t in rope), return_dict=False)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def timed_steps(model, kwargs, steps: int, warmup: int, device) -> dict:
    """Seconds a step over `steps` calls at descending timesteps (after `warmup` calls), peak memory, the report."""
    from cogpipe.inference import speed as sp

    holder = SimpleNamespace(transformer=model)
    timesteps = torch.linspace(999, 1, warmup + steps).round().long()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup):
        with model.cache_context("cond_uncond"):
            model(timestep=timesteps[i].expand(2).to(device), **kwargs)
    model._reset_stateful_cache()
    sp.begin(holder, steps)
    sync(device)
    start = time.perf_counter()
    for t in timesteps[warmup:]:
        with model.cache_context("cond_uncond"):
            model(timestep=t.expand(2).to(device), **kwargs)
    sync(device)
    took = time.perf_counter() - start
    model._reset_stateful_cache()
    report = sp.report_of(holder)
    out = {"s_per_step": round(took / steps, 4), "steps": steps}
    if device.type == "cuda":
        out["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if report is not None:
        d = report.as_dict()
        out.update(skipped_fraction=d["skipped_fraction"], steps_skipped=d["steps_skipped"],
                   attention_skipped=d["attention_evaluations_skipped"])
    return out


def part_inference(work: Path, tiny: bool, partial: Path) -> dict:
    from common import write_json

    from cogpipe.attention import kernel_problem
    from cogpipe.inference import speed as sp
    from cogpipe.inference.pipeline import quantize

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = tiny or device.type != "cuda"
    shape = TINY if tiny else REAL
    model = build(tiny, device)
    kwargs = inputs(model, shape, device)
    holder = SimpleNamespace(transformer=model)
    steps, warmup = (3, 1) if tiny else (4, 1)
    result = {"model": "toy 5B (tests/fixtures)" if tiny else "CogVideoX-5B, random bf16 weights",
              "shape": "tiny" if tiny else "49 x 480 x 720, guidance batch 2", "device": str(device), "modes": {}}
    modes = result["modes"]

    def measure(name, speed, n=steps, w=warmup):
        try:
            sp.apply(holder, speed, n, log=lambda *_: None)
            modes[name] = timed_steps(model, kwargs, n, w, device)
        except Exception as e:  # one mode's failure is recorded; the others still run
            modes[name] = {"error": f"{type(e).__name__}: {e}"[:800]}
        finally:
            sp.remove(model)
        write_json(partial, result)

    measure("eager", sp.Speed())
    problem = kernel_problem("sage", device)
    if problem:
        modes["sage"] = {"skipped": problem}
    else:
        measure("sage", sp.Speed(attention="sage"))
    cache_steps = 6 if tiny else 12  # enough steps for each method to skip some
    for method in [m for m in sp.CACHES if m != "none"]:
        fit = None
        if method == "magcache":  # random weights have no fit: a neutral decay of the residual's magnitude
            fit = work / "magcache_fit.json"
            fit.write_text('{"teacache_coefficients": [0, 0, 0, 1, 0], "mag_ratios": [1.0, 0.99, 0.98, 0.97]}')
        measure(f"cache-{method}", sp.Speed(method, sp.RECOMMENDED[method], fit=str(fit) if fit else None),
                cache_steps, 1)
    if tiny:
        modes["compiled"] = modes["fp8-compiled"] = {"skipped": "tiny: compilation and fp8 are measured on a GPU"}
        write_json(partial, result)
        return result
    tic = time.perf_counter()
    measure("compiled", sp.Speed(compile=True), steps, 2)
    modes["compiled"]["compile_and_warmup_s"] = round(time.perf_counter() - tic, 1)
    try:
        quantize(SimpleNamespace(transformer=model), "fp8", device, log=lambda *_: None)
        tic = time.perf_counter()
        measure("fp8-compiled", sp.Speed(compile=True), steps, 2)
        modes["fp8-compiled"]["compile_and_warmup_s"] = round(time.perf_counter() - tic, 1)
    except Exception as e:
        modes["fp8-compiled"] = {"error": f"{type(e).__name__}: {e}"[:800]}
    write_json(partial, result)
    return result
