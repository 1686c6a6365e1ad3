"""`cogpipe teacache-fit`: fit the step-cache calibration of a model from a few of its own generations.

    cogpipe teacache-fit --model outputs/run/export --prompts "a red square moving left" "..." --output fit.json
    python infer.py --model outputs/run/export --cache teacache --teacache-coefficients fit.json

Every generation runs uncached; at each step the hooks record the timestep embedding every block is modulated by
(TeaCache's input signal), the model output, and the residual the blocks add. Then:
  - TeaCache: the relative L1 change of the output between consecutive steps against that of the embedding, fitted
    by a degree-4 polynomial (the rescaling TeaCache publishes per model, the same fit);
  - MagCache: the magnitude ratio of the blocks' residual between consecutive steps (mean over the tokens of
    |r_t| / |r_t-1|), averaged over the generations: diffusers' MagCacheConfig(mag_ratios=...).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def record(pipe, prompt: str, steps: int, seed: int, **kwargs) -> dict:
    """One uncached generation's per-step (embedding change, output change, magnitude ratio) lists."""
    from cogpipe.inference import generate

    transformer = pipe.transformer
    blocks = transformer.transformer_blocks
    seen = {"temb": [], "out": [], "res": []}
    current = {}

    def head(module, args, kwargs_):
        current["in"] = kwargs_.get("hidden_states", args[0] if args else None).detach().float()
        seen["temb"].append(kwargs_["temb"].detach().float())

    def tail(module, args, output):
        seen["res"].append(output[0].detach().float() - current["in"])

    def out(module, args, output):
        seen["out"].append(output.detach().float())

    handles = [blocks[0].register_forward_pre_hook(head, with_kwargs=True),
               blocks[-1].register_forward_hook(tail), transformer.proj_out.register_forward_hook(out)]
    try:
        generate(pipe, prompt, steps=steps, seed=seed, **kwargs)
    finally:
        for h in handles:
            h.remove()

    def rel(a, b):
        return ((a - b).abs().mean() / b.abs().mean()).item()

    x = [rel(seen["temb"][i], seen["temb"][i - 1]) for i in range(1, len(seen["temb"]))]
    y = [rel(seen["out"][i], seen["out"][i - 1]) for i in range(1, len(seen["out"]))]
    ratios = [1.0] + [(torch.linalg.norm(seen["res"][i], dim=-1) / (torch.linalg.norm(seen["res"][i - 1], dim=-1)
                                                                     + 1e-8)).mean().item()
                      for i in range(1, len(seen["res"]))]
    return {"x": x, "y": y, "mag_ratios": ratios}


def fit(pipe, prompts, steps: int = 50, seed: int = 0, **kwargs) -> dict:
    """The fit JSON's content for `pipe` from its generations of `prompts` (prompt i with seed + i)."""
    runs = [record(pipe, p, steps, seed + i, **kwargs) for i, p in enumerate(prompts)]
    x = np.concatenate([r["x"] for r in runs])
    y = np.concatenate([r["y"] for r in runs])
    coefficients = np.polyfit(x, y, 4).tolist()
    residual = float(np.sqrt(np.mean((np.poly1d(coefficients)(x) - y) ** 2)))
    return {"teacache_coefficients": coefficients, "mag_ratios": np.mean([r["mag_ratios"] for r in runs],
                                                                           axis=0).tolist(),
            "steps": steps, "prompts": list(prompts), "seed": seed, "points": int(len(x)),
            "fit_rms_error": residual,
            "about": "cogpipe teacache-fit: TeaCache's polynomial (relative L1 change of the model output as a "
                     "function of that of the timestep embedding, highest power first) and MagCache's per-step "
                     "magnitude ratios, from uncached generations of this model"}


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="the model (any infer.py --model; default: models/tiny-world)")
    p.add_argument("--lora", action="append", default=None, help="LoRA(s) to load onto it, as infer.py")
    p.add_argument("--prompts", nargs="+", default=None,
                   help="prompts to generate (a few of the model's own kind; default: 4 of the synthetic world's)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (the count you will generate with)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-frames", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None)
    p.add_argument("--output", required=True, help="the JSON to write (infer.py --teacache-coefficients FILE)")


def run(a) -> int:
    from cogpipe.inference import load_pipeline

    if a.steps < 3:
        print("cogpipe teacache-fit: error: --steps must be at least 3", flush=True)
        return 2
    prompts = a.prompts or ["a red square moving left", "a blue circle moving up", "a green triangle moving right",
                            "a yellow square moving down"]
    out = Path(a.output)
    pipe = load_pipeline(a.model, a.lora, device=a.device, dtype=a.dtype)
    result = fit(pipe, prompts, a.steps, a.seed, num_frames=a.num_frames, height=a.height, width=a.width)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}: TeaCache coefficients {['%.4g' % c for c in result['teacache_coefficients']]} "
          f"(rms error {result['fit_rms_error']:.3g} over {result['points']} steps), MagCache ratios for "
          f"{a.steps} steps")
    return 0
