"""Measured GPU memory of a recipe's training step beside its simulation (bench/results/memory_sim.json).

    python bench/memory_measure.py [--out FILE]        # on a CUDA GPU; or called by bench/gpu_check.py
    python bench/memory_measure.py --tiny              # the same code path at toy sizes on a CPU (no memory read)

For each run of RUNS (names of bench/memory_sim.py): the recipe's transformer at its real size (the preset's shapes,
random weights, built on the GPU: no download), set up as cogpipe/training.py sets it up (storage, LoRA, gradient
checkpointing, cogpipe/offload.py's switches), two steps as the loop runs them (model inputs, forward under
autocast, loss, backward, clipping, fused AdamW), and `torch.cuda.max_memory_allocated` / `max_memory_reserved` of
the second (the steady state the simulation measures), with their ratio to the simulated peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

RUNS = ["cogvideox_5b_lora", "5b_lora+swap36+offload", "5b_lora+offload+fp8", "1.5_5b_lora+swap36+offload",
        "cogvideox_2b_lora"]
SIMULATED = ROOT / "bench" / "results" / "memory_sim.json"
GiB = 2 ** 30


def _config(name: str, tiny: bool):
    import memory_sim

    from cogpipe.config import load_config

    runs = {n: (recipe, overrides) for n, recipe, overrides, _ in memory_sim.RUNS}
    recipe, overrides = runs[name]
    extra = ["data.root=x", "output_dir=x", "model.pretrained=null"]
    if tiny:  # the tiny preset at its own size, on a CPU
        extra += ["model.preset=tiny", "data.frames=17", "data.height=64", "data.width=64", "lora.rank=4",
                  "train.mixed_precision=no", "model.weight_dtype=fp32", "model.fp8_frozen=false"]
        overrides = [o for o in overrides if not o.startswith("train.blocks_to_swap")] + (
            ["train.blocks_to_swap=2"] if any(o.startswith("train.blocks_to_swap") for o in overrides) else [])
    return load_config(ROOT / "configs" / recipe, [*overrides, *extra], validate_model=False)


def measure(cfg, device, steps: int = 2) -> dict:
    """Peak memory of the last of `steps` training steps of `cfg` on `device` (None where it is not CUDA)."""
    import torch

    from cogpipe import family, models, offload
    from cogpipe.diffusion import RotaryTables, diffusion_loss, model_inputs
    from cogpipe.optim import make_optimizer

    device = torch.device(device)
    cuda = device.type == "cuda"
    lora = cfg.train.mode == "lora"
    weight_dtype = family.DTYPES[cfg.model.weight_dtype]
    model = models.build_transformer(dataclasses.replace(cfg.model, pretrained=None),
                                     weight_dtype if lora else torch.float32, device=device)
    offload.make_trainable(model, cfg)
    if cfg.train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    off = offload.apply(model, cfg.train, device)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg.train, params, device.type)
    tc = dict(model.config)
    from cogpipe.plan import largest_shape

    shape = largest_shape(cfg, tc)
    latent = (shape["batch"], (shape["frames"] - 1) // family.VAE_TEMPORAL + 1, family.LATENT_CHANNELS,
              shape["latent_height"], shape["latent_width"])
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision)
    cache_dtype = torch.bfloat16 if cuda else torch.float32
    x0, noise = torch.randn(latent, device=device, dtype=cache_dtype), torch.randn(latent, device=device,
                                                                                   dtype=cache_dtype)
    prompt = torch.randn(shape["batch"], tc["max_text_seq_length"], tc["text_embed_dim"], device=device,
                         dtype=cache_dtype)
    image = torch.randn(latent, device=device, dtype=cache_dtype) if family.is_i2v(tc) else None
    alphas = models.build_scheduler(dataclasses.replace(cfg.model, pretrained=None)).alphas_cumprod.to(device)
    rotary = RotaryTables(tc)
    times = []
    for step in range(steps):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        if off is not None and off.activations is not None:
            off.activations.moved = 0  # this step's traffic only
        tic = time.perf_counter()
        inputs = model_inputs(x0, noise, torch.tensor([500], device=device), prompt, image, transformer_config=tc,
                              alphas_cumprod=alphas, rotary=rotary, dtype=half or (weight_dtype if lora else
                                                                                   torch.float32))
        with torch.autocast(device.type, dtype=half or torch.float32, enabled=half is not None):
            v = model(**inputs.kwargs)[0]
        loss = diffusion_loss(v, inputs.target)
        del v, inputs
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tic)
    result = dict(step_s=round(times[-1], 3), loss_finite=bool(torch.isfinite(loss).item()),
                  pcie_bytes_per_step=off.bytes_per_step() if off is not None else 0)
    if cuda:
        result.update(max_memory_allocated_gib=round(torch.cuda.max_memory_allocated() / GiB, 3),
                      max_memory_reserved_gib=round(torch.cuda.max_memory_reserved() / GiB, 3))
    del model, optimizer, params
    if cuda:
        torch.cuda.empty_cache()
    return result


def part_memory(work: Path, tiny: bool, deadline: float | None = None, runs=RUNS) -> list[dict]:
    """bench/gpu_check.py's memory part: each run measured, with its ratio to the simulated peak."""
    import torch

    simulated = {r["name"]: r for r in json.loads(SIMULATED.read_text())["runs"]} if SIMULATED.is_file() else {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    for name in runs:
        if deadline is not None and deadline - time.perf_counter() < 60:
            results.append(dict(name=name, skipped="time budget"))
            continue
        entry = dict(name=name)
        try:
            entry.update(measure(_config(name, tiny), device))
            sim = None if tiny else simulated.get(name, {}).get("peak_allocated_gib")
            entry["simulated_peak_allocated_gib"] = sim
            if sim and "max_memory_allocated_gib" in entry and not tiny:
                entry["allocated_over_simulated"] = round(entry["max_memory_allocated_gib"] / sim, 3)
                entry["reserved_over_simulated"] = round(entry["max_memory_reserved_gib"] / sim, 3)
        except Exception:
            entry["error"] = traceback.format_exc()[-2000:]
        results.append(entry)
        print(json.dumps(entry)[:1000], flush=True)
    return results


def main(argv=None) -> int:
    from common import write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--only", default=None, help="runs whose name contains this")
    args = ap.parse_args(argv)
    runs = [r for r in RUNS if not args.only or args.only in r]
    results = part_memory(Path("/tmp"), args.tiny, runs=runs)
    if args.out:
        write_json(args.out, dict(bench="memory_measure", tiny=args.tiny, runs=results))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
