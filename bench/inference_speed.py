"""Step caching on the shipped tiny-world model: every method at a range of thresholds against the uncached video.

    python bench/inference_speed.py                     # -> bench/results/inference_cache.json, docs/cache_speedup.png

For each setting, the same prompts and seeds at 50 steps: the fraction of transformer block evaluations skipped
(and of attention evaluations), the wall-time ratio to the uncached run, PSNR and SSIM of the decoded video against
the uncached one, and the synthetic world's prompt-following score (cogpipe/world/score.py, as `cogpipe score`).
TeaCache and MagCache use the model's own fit (bench/results/tiny_world_cache_fit.json, `cogpipe teacache-fit`):
tiny-world is no released version, so no published coefficients apply.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SWEEP = {"teacache": [0.05, 0.1, 0.2, 0.3], "fbc": [0.1, 0.2, 0.3, 0.5],
         "magcache": [0.05, 0.1, 0.2], "pab": [2, 3], "fastercache": [2], "taylorseer": [2, 3]}
PROMPTS = ["a blue circle moving up", "a red square moving left"]


def psnr(a, b) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def ssim(a, b, block: int = 8) -> float:
    """Mean SSIM of the luma over non-overlapping block x block windows of every frame (constants of Wang et al.
    2004 for 8-bit values)."""
    def luma(v):
        v = v.astype(np.float64)
        return 0.299 * v[..., 0] + 0.587 * v[..., 1] + 0.114 * v[..., 2]

    x, y = luma(a), luma(b)
    f, h, w = x.shape
    h, w = h - h % block, w - w % block
    x = x[:, :h, :w].reshape(f, h // block, block, w // block, block)
    y = y[:, :h, :w].reshape(f, h // block, block, w // block, block)
    mx, my = x.mean((2, 4)), y.mean((2, 4))
    vx, vy = x.var((2, 4)), y.var((2, 4))
    cov = ((x - mx[:, :, None, :, None]) * (y - my[:, :, None, :, None])).mean((2, 4))
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    return float((((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).mean())


def generate_all(pipe, steps, seeds):
    from cogpipe.inference import generate
    from cogpipe.inference.speed import report_of

    videos, reports, seconds = [], [], 0.0
    for prompt in PROMPTS:
        for seed in seeds:
            start = time.perf_counter()
            videos.append(generate(pipe, prompt, steps=steps, seed=seed))
            seconds += time.perf_counter() - start
            reports.append(report_of(pipe).as_dict())
    return videos, reports, seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--methods", nargs="+", default=list(SWEEP))
    p.add_argument("--fit", default=str(REPO / "bench" / "results" / "tiny_world_cache_fit.json"))
    p.add_argument("--output", default=str(REPO / "bench" / "results" / "inference_cache.json"))
    p.add_argument("--plot", default=str(REPO / "docs" / "cache_speedup.png"))
    p.add_argument("--budget-s", type=float, default=None, help="stop starting new settings after this long")
    a = p.parse_args(argv)

    import torch

    from cogpipe.inference import load_pipeline
    from cogpipe.inference import speed as sp
    from cogpipe.world.score import score_video

    torch.manual_seed(0)
    began = time.perf_counter()
    pipe = load_pipeline(None, device="cpu")
    sp.apply(pipe, sp.Speed("none"), a.steps)
    base, base_reports, base_s = generate_all(pipe, a.steps, a.seeds)
    items = [(v, prompt) for v, prompt in zip(base, [q for q in PROMPTS for _ in a.seeds])]
    base_score = float(np.mean([score_video(v, q)["match"]["all"] for v, q in items]))
    rows = [{"method": "none", "threshold": 0, "skipped_fraction": 0.0, "attention_skipped_fraction": 0.0,
             "wall_ratio": 1.0, "seconds": round(base_s, 2), "psnr_db": None, "ssim": 1.0, "score": base_score}]
    print(f"uncached: {base_s:.1f} s, score {base_score:.2f}", flush=True)
    left_out = []
    for method in a.methods:
        for threshold in SWEEP[method]:
            if a.budget_s is not None and time.perf_counter() - began > a.budget_s:
                left_out.append(f"{method} {threshold}")
                continue
            fit = a.fit if method in ("teacache", "magcache") else None
            sp.apply(pipe, sp.Speed(method, threshold, fit=fit), a.steps, log=lambda *_: None)
            videos, reports, seconds = generate_all(pipe, a.steps, a.seeds)
            total = sum(r["block_evaluations"] for r in reports)
            row = {"method": method, "threshold": threshold,
                   "skipped_fraction": round(sum(r["block_evaluations_skipped"] for r in reports) / total, 4),
                   "attention_skipped_fraction": round(sum(r["attention_evaluations_skipped"] for r in reports)
                                                       / total, 4),
                   "steps_skipped": sum(r["steps_skipped"] for r in reports),
                   "wall_ratio": round(seconds / base_s, 3), "seconds": round(seconds, 2),
                   "psnr_db": round(float(np.mean([psnr(v, b) for v, b in zip(videos, base)])), 2),
                   "ssim": round(float(np.mean([ssim(v, b) for v, b in zip(videos, base)])), 4),
                   "score": float(np.mean([score_video(v, q)["match"]["all"] for v, (_, q) in zip(videos, items)]))}
            rows.append(row)
            print(row, flush=True)
    sp.remove(pipe.transformer)
    result = {
        "model": "models/tiny-world", "steps": a.steps, "prompts": PROMPTS, "seeds": a.seeds,
        "device": "cpu", "threads": torch.get_num_threads(),
        "note": ("Measured on a 2-core CPU machine shared with other jobs while measuring: the wall-time ratios "
                 "are noisy (and on a model this small the per-step overhead of the VAE, the scheduler and the "
                 "hooks is a large share); the block-evaluation fractions, PSNR, SSIM and scores are exact "
                 "(deterministic). skipped_fraction: transformer block evaluations skipped of all; "
                 "attention_skipped_fraction: attention evaluations skipped (PAB and FasterCache reuse attention "
                 "only). teacache and magcache use bench/results/tiny_world_cache_fit.json (cogpipe "
                 "teacache-fit). psnr_db/ssim: decoded uint8 video against the uncached one, mean over the "
                 "videos; score: fraction of videos whose colour, shape and direction match the prompt."),
        "settings_left_out": left_out, "rows": rows}
    Path(a.output).write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, a.plot)
    print(f"wrote {a.output} and {a.plot}")
    return 0


def plot(rows, path, size=(720, 440)) -> None:
    """Work speed-up (1 / (1 - skipped fraction) of the block evaluations; for PAB and FasterCache, which reuse
    attention only, of the attention evaluations) against PSNR, one colour a method:
    a PNG drawn with Pillow (no plotting library needed)."""
    from PIL import Image, ImageDraw

    colours = {"teacache": (214, 39, 40), "fbc": (31, 119, 180), "magcache": (44, 160, 44), "pab": (255, 127, 14),
               "fastercache": (148, 103, 189), "taylorseer": (140, 86, 75)}
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, top, right, bottom = 70, 30, size[0] - 160, size[1] - 50
    points = [r for r in rows if r["method"] != "none" and r["psnr_db"] is not None]
    speedups = [1 / max(1 - (r["skipped_fraction"] or r["attention_skipped_fraction"]), 1e-3) for r in points]
    xmax = max([2.0] + [s * 1.05 for s in speedups])
    ymin, ymax = 10.0, max([45.0] + [min(r["psnr_db"], 60) + 2 for r in points])

    def xy(s, q):
        return (left + (s - 1) / (xmax - 1) * (right - left), bottom - (min(q, ymax) - ymin) / (ymax - ymin)
                * (bottom - top))

    d.rectangle([left, top, right, bottom], outline="black")
    for q in range(int(ymin), int(ymax) + 1, 5):
        y = xy(1, q)[1]
        d.line([left - 4, y, left, y], fill="black")
        d.text((left - 30, y - 6), f"{q}", fill="black")
    for k in range(0, 11):
        s = 1 + k * (xmax - 1) / 10
        x = xy(s, ymin)[0]
        d.line([x, bottom, x, bottom + 4], fill="black")
        d.text((x - 10, bottom + 8), f"{s:.2f}", fill="black")
    y30 = xy(1, 30)[1]
    d.line([left, y30, right, y30], fill=(180, 180, 180))
    d.text((left + 4, y30 - 14), "30 dB", fill=(120, 120, 120))
    d.text((left, size[1] - 22), "work speed-up: 1 / (1 - skipped block evaluations; PAB, FasterCache: attention)",
           fill="black")
    d.text((8, 8), "PSNR (dB) vs the uncached video, tiny-world, 50 steps", fill="black")
    for method, colour in colours.items():
        pts = [xy(s, r["psnr_db"]) for s, r in zip(speedups, points) if r["method"] == method]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for x, y in pts:
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
    for i, (method, colour) in enumerate(colours.items()):
        d.rectangle([right + 20, top + 20 * i, right + 32, top + 12 + 20 * i], fill=colour)
        d.text((right + 40, top + 20 * i), method, fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


if __name__ == "__main__":
    sys.exit(main())
