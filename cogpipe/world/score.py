"""Score a video against its prompt: which colour, shape and direction of motion does it show?

    cogpipe score [--model DIR] [--lora DIR] [--prompts fixed|held-out] [--steps N] [--guidance G] [--seed S]
                  [--frames F --height H --width W] [--limit N] [--videos DIR] [--details]

runs a fixed prompt set (48 palette prompts, or the 12 of the held-out colour) through a model (+ LoRA) with
cogpipe.inference and prints the accuracies as one JSON line (prompt i is generated with seed S + i).

    result = score_video(frames, "a red square moving right")   # frames: uint8 [F, H, W, 3]
    result["colour"], result["shape"], result["direction"]       # detected ("red", "square", "right") or None
    result["match"]                                              # {"colour": True, ..., "all": True}
    score_many([(frames, prompt), ...])                          # {"colour": 1.0, "shape": ..., "all": ..., "n": 2}

Detection works on the world of cogpipe/world/render.py (one shape on a plain background) and is meant to hold up
on what a tiny diffusion model makes: H.264 artefacts, blur, noise, stray blobs.

- foreground: pixels far from the background colour (the per-video median); the threshold is half the
  video's peak contrast, which finds a blurred edge where a sharp one would be; per frame a 3x3 majority
  filter removes speckle and only the largest 4-connected blob is kept.
- colour: the hue of the median colour of the blob's core pixels, nearest palette hue (purple included).
  Hue ignores brightness and saturation, which generated videos get wrong more often than hue.
- shape: per frame, the taper (mean width of the top third of the blob's box over the bottom third: about
  0.2 for the upward triangle, 1 otherwise) and the corner reach (how far the blob extends along the
  diagonals against along the axes, 90th percentiles of the distance from its centroid: square 1.2,
  circle 1.0); medians over frames. A blob that fills less than 40% of its box is no shape (None).
- nothing (all None) when no blob is found in at least half of the frames.
- direction: a straight-line fit of the blob's centroid over time; the dominant axis of the displacement,
  None when it moves less than 6% of the frame.
"""

from __future__ import annotations

import numpy as np

from cogpipe.inference import DEFAULT_GUIDANCE, DEFAULT_STEPS, generate, load_pipeline
from cogpipe.video import write_mp4
from cogpipe.world.render import ALL_COLOURS, COLOURS, DIRECTIONS, HELD_OUT_COLOUR, RGB, SHAPES, parse_prompt

MIN_CONTRAST = 40.0  # RGB distance from the background below which nothing counts as foreground
MIN_AREA = 0.005  # a blob smaller than this fraction of the frame is no shape
MIN_CHROMA = 20.0  # a foreground colour greyer than this has no hue: colour None
MIN_TRAVEL = 0.06  # a displacement below this fraction of the frame is no motion: direction None
MIN_FILL = 0.4  # a blob this sparse in its box is no shape of the world (the triangle fills 0.5)
TAPER_SPLIT = 0.6  # below: triangle (top much narrower than bottom)
CORNER_SPLIT = 1.1  # above: square; below: circle (midpoint of a rendered square's 1.2 and a disc's 1.0)
ATTRIBUTES = ("colour", "shape", "direction")


def _hue(rgb) -> float:
    """HSV hue in degrees of one RGB colour."""
    r, g, b = (float(c) for c in rgb)
    hi, lo = max(r, g, b), min(r, g, b)
    if hi == lo:
        return 0.0
    if hi == r:
        h = (g - b) / (hi - lo)
    elif hi == g:
        h = 2.0 + (b - r) / (hi - lo)
    else:
        h = 4.0 + (r - g) / (hi - lo)
    return (60.0 * h) % 360.0


PALETTE_HUES = {name: _hue(RGB[name]) for name in ALL_COLOURS}


def fixed_prompts(colours=None) -> list[str]:
    """The fixed prompt set: every colour x shape x direction, in a fixed order.

    colours=None is the pretraining palette (48 prompts); held_out_prompts() is the held-out colour's set.
    """
    colours = COLOURS if colours is None else tuple(colours)
    unknown = [c for c in colours if c not in RGB]
    if unknown:
        raise ValueError(f"unknown colours {unknown}; expected some of {ALL_COLOURS}")
    return [f"a {c} {s} moving {d}" for c in colours for s in SHAPES for d in DIRECTIONS]


def held_out_prompts() -> list[str]:
    """The fixed prompt set of the held-out colour (purple): 12 prompts."""
    return fixed_prompts([HELD_OUT_COLOUR])


def spread(prompts: list[str], n: int) -> list[str]:
    """n prompts spread evenly over the list, first and last included (every colour, shape and direction
    shows up in a spread of 12 or more of the fixed set)."""
    if n >= len(prompts):
        return list(prompts)
    if n == 1:
        return [prompts[0]]
    return [prompts[round(i * (len(prompts) - 1) / (n - 1))] for i in range(n)]


def score_video(frames, prompt: str) -> dict:
    """Detect colour, shape and direction in frames [F, H, W, 3] and compare them with the prompt.

    Returns the detected values (None where nothing is detected), the expected ones parsed from the prompt,
    `match` per attribute and "all" (an attribute the prompt does not name gets match None and is left out
    of "all"), and the raw measurements under `features`.
    """
    detected = detect(frames)
    expected = dict(zip(ATTRIBUTES, parse_prompt(prompt)))
    match = {a: None if expected[a] is None else detected[a] == expected[a] for a in ATTRIBUTES}
    named = [m for m in match.values() if m is not None]
    match["all"] = bool(named) and all(named)
    return {**{a: detected[a] for a in ATTRIBUTES}, "expected": expected, "match": match,
            "features": detected["features"]}


def score_many(items) -> dict:
    """Accuracies over (frames, prompt) pairs: {"colour", "shape", "direction", "all": fraction, "n": count}.

    Each attribute's accuracy counts only the prompts that name it.
    """
    results = [score_video(frames, prompt) for frames, prompt in items]
    out = {}
    for key in ATTRIBUTES + ("all",):
        hits = [r["match"][key] for r in results if r["match"][key] is not None]
        out[key] = sum(hits) / len(hits) if hits else None
    out["n"] = len(results)
    return out


def detect(frames) -> dict:
    """Colour, shape and direction shown in frames [F, H, W, 3] (uint8, or floats in [0, 1])."""
    video = _as_float_video(frames)
    num_frames, h, w, _ = video.shape
    features = {"hue": None, "chroma": None, "fill": None, "taper": None, "displacement": None,
                "frames_with_shape": 0}
    none = {"colour": None, "shape": None, "direction": None, "features": features}

    background = np.median(video[:, ::2, ::2].reshape(-1, 3), axis=0)  # a quarter of the pixels is plenty
    dist = np.linalg.norm(video - background, axis=-1)  # (F, H, W)
    peak = float(np.percentile(dist, 99.5))
    if peak < MIN_CONTRAST:
        return none
    threshold = max(MIN_CONTRAST, 0.5 * peak)

    times, centroids, fills, tapers, corners, core_pixels = [], [], [], [], [], []
    for t in range(num_frames):
        blob = _largest_component(_majority3x3(dist[t] > threshold))
        area = int(blob.sum())
        if area < MIN_AREA * h * w:
            continue
        ys, xs = np.nonzero(blob)
        times.append(t)
        cx, cy = xs.mean(), ys.mean()
        centroids.append((cx, cy))
        y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
        fills.append(area / ((y1 - y0 + 1) * (x1 - x0 + 1)))
        corners.append(_corner_reach(ys - cy, xs - cx))
        widths = blob[y0:y1 + 1].sum(axis=1)  # per row of the box
        third = max(1, len(widths) // 3)
        tapers.append(widths[:third].mean() / max(widths[-third:].mean(), 1e-6))
        d = dist[t][blob]
        core_pixels.append(video[t][blob][d >= np.median(d)])
    features["frames_with_shape"] = len(times)
    if len(times) < max(1, num_frames / 2):  # the world shows its shape in every frame
        return none

    colour = None
    median_rgb = np.median(np.concatenate(core_pixels), axis=0)
    chroma = float(median_rgb.max() - median_rgb.min())
    hue = _hue(median_rgb)
    features["hue"], features["chroma"] = round(hue, 1), round(chroma, 1)
    if chroma >= MIN_CHROMA:
        colour = min(PALETTE_HUES, key=lambda c: _hue_distance(hue, PALETTE_HUES[c]))

    fill, taper, corner = float(np.median(fills)), float(np.median(tapers)), float(np.median(corners))
    features["fill"], features["taper"], features["corners"] = round(fill, 3), round(taper, 3), round(corner, 3)
    if fill < MIN_FILL:
        shape = None
    elif taper < TAPER_SPLIT:
        shape = "triangle"
    else:
        shape = "square" if corner > CORNER_SPLIT else "circle"

    direction = None
    if len(times) >= 2:
        c = np.array(centroids)  # (T, 2) x, y
        slope = np.polyfit(np.array(times, dtype=float), c, 1)[0]  # (2,) px per frame
        dx, dy = slope * (num_frames - 1)
        features["displacement"] = (round(float(dx), 2), round(float(dy), 2))
        if max(abs(dx), abs(dy)) >= MIN_TRAVEL * min(h, w):
            if abs(dx) >= abs(dy):
                direction = "right" if dx > 0 else "left"
            else:
                direction = "down" if dy > 0 else "up"
    return {"colour": colour, "shape": shape, "direction": direction, "features": features}


def _corner_reach(dy: np.ndarray, dx: np.ndarray) -> float:
    """How far a blob reaches along the diagonals against along the axes, from its pixels' offsets to its
    centroid: the 90th-percentile distance of the pixels in the four diagonal 45-degree sectors over that in
    the four axis sectors.
    An axis-aligned square: 1.2 (its corners reach further), a disc: 1.0. A bump or a missing pixel
    moves a percentile little; the fill of the bounding box changes with the one row or column that sticks
    out furthest."""
    radius = np.hypot(dy, dx)
    sector = ((np.degrees(np.arctan2(dy, dx)) + 22.5) // 45).astype(int) % 8  # even: axis, odd: diagonal
    reach = [np.percentile(radius[sector == k], 90) if (sector == k).sum() > 3 else np.nan for k in range(8)]
    axis, diagonal = np.nanmean(reach[0::2]), np.nanmean(reach[1::2])
    return float(diagonal / axis) if axis > 0 else 1.0


def _as_float_video(frames) -> np.ndarray:
    """float32 [F, H, W, 3] in [0, 255]; large videos are average-pooled towards 64 px on the short side."""
    video = np.asarray(frames)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected frames [F, H, W, 3], got shape {tuple(video.shape)}")
    if np.issubdtype(video.dtype, np.floating):
        video = np.clip(video, 0.0, 1.0) * 255.0
    video = video.astype(np.float32)
    factor = min(video.shape[1], video.shape[2]) // 64
    if factor > 1:
        f, h, w, _ = video.shape
        h, w = h // factor * factor, w // factor * factor
        video = video[:, :h, :w].reshape(f, h // factor, factor, w // factor, factor, 3).mean(axis=(2, 4))
    return video


def _majority3x3(mask: np.ndarray) -> np.ndarray:
    """Keep a pixel when at least 5 of the 9 pixels around it (itself included) are set."""
    padded = np.pad(mask.astype(np.int8), 1)
    h, w = mask.shape
    count = sum(padded[i:i + h, j:j + w] for i in range(3) for j in range(3))
    return count >= 5


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (runs of set pixels per row, joined by union-find)."""
    edges = np.diff(np.pad(mask.astype(np.int8), ((0, 0), (1, 1))), axis=1)  # +1 at a run start, -1 past its end
    rows, starts = np.nonzero(edges == 1)  # row-major order, so starts and stops pair up
    stops = np.nonzero(edges == -1)[1]
    runs = list(zip(rows.tolist(), starts.tolist(), stops.tolist()))  # (row, start, stop)
    parent = list(range(len(runs)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    previous, current, row = [], [], None  # run indices of the row above and of this row
    for i, (y, a, b) in enumerate(runs):
        if y != row:
            previous, current, row = (current if row == y - 1 else []), [], y
        current.append(i)
        for j in previous:
            if runs[j][1] < b and a < runs[j][2]:  # columns overlap: touching vertically
                parent[root(i)] = root(j)
    sizes: dict = {}
    for i, (y, a, b) in enumerate(runs):
        sizes[root(i)] = sizes.get(root(i), 0) + b - a
    out = np.zeros_like(mask, dtype=bool)
    if sizes:
        best = max(sizes, key=sizes.get)
        for i, (y, a, b) in enumerate(runs):
            if root(i) == best:
                out[y, a:b] = True
    return out


def _hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)


def score_model(pipe, prompts, steps=None, guidance=None, seed: int = 0, frames: int = 17, height: int = 64,
                width: int = 64, videos_dir=None) -> tuple[dict, list[dict]]:
    """Generate every prompt (prompt i with seed + i) and score it: (accuracies, per-prompt results)."""
    steps = DEFAULT_STEPS if steps is None else steps
    guidance = DEFAULT_GUIDANCE if guidance is None else guidance
    items, rows = [], []
    for i, prompt in enumerate(prompts):
        video = generate(pipe, prompt, frames, height, width, steps, guidance, seed + i)
        items.append((video, prompt))
        result = score_video(video, prompt)
        rows.append({"prompt": prompt, "seed": seed + i, **{a: result[a] for a in ATTRIBUTES},
                     "match": result["match"]})
        if videos_dir is not None:
            write_mp4(video, f"{videos_dir}/{i:02d}_{prompt.replace(' ', '_')}.mp4")
    return score_many(items), rows


def add_arguments(parser) -> None:
    parser.add_argument("--model", default=None, help="Diffusers pipeline folder or hub id (default: the shipped "
                                                       "models/tiny-world)")
    parser.add_argument("--lora", default=None, help="LoRA folder or .safetensors file")
    parser.add_argument("--lora-scale", type=float, default=1.0)
    parser.add_argument("--prompts", choices=["fixed", "held-out"], default="fixed",
                        help="fixed: every palette colour x shape x direction (48); held-out: the purple ones (12)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: infer.py's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: infer.py's)")
    parser.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--limit", type=int, default=None,
                        help="score only this many prompts, spread evenly over the set")
    parser.add_argument("--videos", default=None, help="also write each generated video here as mp4")
    parser.add_argument("--details", action="store_true", help="include what was detected for every prompt")
    parser.add_argument("--scheduler", default="auto", help="auto | keep | ddim | dpm (infer.py's)")
    parser.add_argument("--device", default=None, help="default: CUDA, then MPS, then the CPU (infer.py's)")
    parser.add_argument("--dtype", default=None, help="fp32 | fp16 | bf16 (default: infer.py's)")


def run(args) -> int:
    import json

    prompts = fixed_prompts() if args.prompts == "fixed" else held_out_prompts()
    if args.limit is not None and args.limit < len(prompts):
        prompts = spread(prompts, args.limit)
    pipe = load_pipeline(args.model, args.lora, args.lora_scale, args.dtype, args.device, scheduler=args.scheduler)
    steps = DEFAULT_STEPS if args.steps is None else args.steps
    guidance = DEFAULT_GUIDANCE if args.guidance is None else args.guidance
    acc, rows = score_model(pipe, prompts, steps, guidance, args.seed, args.frames, args.height, args.width,
                            args.videos)
    out = {**acc, "prompts": args.prompts, "model": args.model or "models/tiny-world (default)",
           "lora": args.lora, "steps": steps, "guidance": guidance, "seed": args.seed}
    if args.details:
        out["details"] = rows
    print(json.dumps(out))
    return 0
