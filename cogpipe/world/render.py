"""A synthetic video world: one coloured shape moving on a plain background, with a caption.

The shipped tiny model is pretrained on this world and scored against it (see cogpipe/world/score.py), so what a
generated video shows can be checked. Everything is deterministic from a seed.

    frames = render("square", "red", "right", frames=17, size=64, seed=3)   # uint8 [17, 64, 64, 3]
    caption("square", "red", "right")                                       # "a red square moving right"
    parse_prompt("a red square moving right")                               # ("red", "square", "right")

Pretraining sees the colours in COLOURS; HELD_OUT_COLOUR ("purple") is never shown there and is what the
shipped LoRA dataset (data/tiny/) teaches. The palette is chosen for hue: its hues sit at least 54 degrees
apart, so the scorer can tell them apart after H.264 compression and in a blurry generated video.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np

SHAPES = ("square", "circle", "triangle")
COLOURS = ("red", "yellow", "green", "blue")  # the pretraining palette
HELD_OUT_COLOUR = "purple"  # never shown in pretraining; taught by data/tiny/
ALL_COLOURS = COLOURS + (HELD_OUT_COLOUR,)
DIRECTIONS = ("left", "right", "up", "down")

# Hues: red 0, yellow 54, green 128, blue 222, purple 284 degrees.
RGB = {
    "red": (225, 45, 45),
    "yellow": (230, 210, 40),
    "green": (40, 200, 60),
    "blue": (40, 100, 240),
    "purple": (180, 40, 230),
}
BACKGROUND = (40, 40, 40)  # dark gray: no hue, far from every palette colour

# Geometry at size 64; everything scales with size / 64.
# The geometry varies little on purpose: a tiny transformer trained for minutes on CPU learns to draw a crisp
# shape along a few paths, not yet anywhere in the frame at any size.
SHAPE_SIZE = (25.0, 27.0)  # side of the square, diameter of the circle, base of the triangle (px)
TRIANGLE_SCALE = 1.15  # a triangle covers half its box; a little larger keeps it as visible as the rest
TRAVEL = (19.0, 21.0)  # distance the shape's centre moves over the clip (px)
ACROSS = 4.0  # the path runs at most this far from the frame's centre line (px)
MARGIN = 3.0  # the shape stays this far inside the frame (px)
COLOUR_JITTER = 10  # +- per RGB channel, per clip
SUPERSAMPLE = 4  # antialiasing: coverage from a 4x4 grid per pixel

_VELOCITY = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
_SYNONYMS = {
    # colours
    "red": "red", "yellow": "yellow", "green": "green", "blue": "blue", "purple": "purple", "violet": "purple",
    # shapes
    "square": "square", "squares": "square", "box": "square", "block": "square",
    "circle": "circle", "circles": "circle", "ball": "circle", "disc": "circle", "disk": "circle",
    "dot": "circle", "triangle": "triangle", "triangles": "triangle",
    # directions
    "left": "left", "leftward": "left", "leftwards": "left", "right": "right", "rightward": "right",
    "rightwards": "right", "up": "up", "upward": "up", "upwards": "up", "down": "down", "downward": "down",
    "downwards": "down",
}


def caption(shape: str, colour: str, direction: str) -> str:
    """The caption of a clip: caption("square", "red", "right") -> "a red square moving right"."""
    _check(shape, colour, direction)
    return f"a {colour} {shape} moving {direction}"


def parse_prompt(text: str) -> tuple[str | None, str | None, str | None]:
    """(colour, shape, direction) named in a prompt; None for what it does not name (first mention wins)."""
    found = {"colour": None, "shape": None, "direction": None}
    for word in re.findall(r"[a-z]+", text.lower()):
        name = _SYNONYMS.get(word)
        if name is None:
            continue
        kind = "colour" if name in ALL_COLOURS else "shape" if name in SHAPES else "direction"
        if found[kind] is None:
            found[kind] = name
    return found["colour"], found["shape"], found["direction"]


def render(shape: str, colour: str, direction: str, *, frames: int = 17, size: int = 64,
           seed: int = 0) -> np.ndarray:
    """Render one clip: uint8 [frames, size, size, 3].

    The seed picks the shape's size, start position, travel distance (speed) and a small colour jitter;
    the same arguments always give the same pixels.
    """
    _check(shape, colour, direction)
    if frames < 2:
        raise ValueError(f"frames must be >= 2 to show motion, got {frames}")
    if size < 64:
        raise ValueError(f"size must be >= 64 (shapes must survive VAE compression), got {size}")
    rng = np.random.default_rng(seed)
    k = size / 64.0
    s = rng.uniform(*SHAPE_SIZE) * k * (TRIANGLE_SCALE if shape == "triangle" else 1.0)
    travel = rng.uniform(*TRAVEL) * k
    lo, hi = MARGIN * k + s / 2, size - MARGIN * k - s / 2  # where the centre may go
    start = rng.uniform(lo, hi - travel)  # the path [start, start + travel] stays inside [lo, hi]
    across = rng.uniform(size / 2 - ACROSS * k, size / 2 + ACROSS * k)
    rgb = np.clip(np.array(RGB[colour]) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255)

    vx, vy = _VELOCITY[direction]
    t = np.linspace(0.0, 1.0, frames)
    along = start + travel * t if vx + vy > 0 else start + travel * (1.0 - t)
    cx, cy = (along, np.full(frames, across)) if vx else (np.full(frames, across), along)

    # Coverage of each pixel by the shape, from a SUPERSAMPLE x SUPERSAMPLE grid of sample points.
    n = SUPERSAMPLE
    grid = (np.arange(size * n) + 0.5) / n  # sample coordinates in pixels
    x = grid[None, None, :] - cx[:, None, None]  # (F, 1, W*n) offsets from the centre
    y = grid[None, :, None] - cy[:, None, None]  # (F, H*n, 1)
    if shape == "square":
        inside = (np.abs(x) <= s / 2) & (np.abs(y) <= s / 2)
    elif shape == "circle":
        inside = x**2 + y**2 <= (s / 2) ** 2
    else:  # triangle pointing up: apex at the top of its box, base at the bottom
        depth = y + s / 2  # distance below the apex
        inside = (depth >= 0) & (depth <= s) & (np.abs(x) <= depth / 2)
    alpha = inside.reshape(frames, size, n, size, n).mean(axis=(2, 4))[..., None]  # (F, H, W, 1)
    video = np.array(BACKGROUND, dtype=np.float64) * (1 - alpha) + rgb * alpha
    return np.round(video).astype(np.uint8)


@dataclass(frozen=True)
class ClipSpec:
    shape: str
    colour: str
    direction: str
    seed: int

    @property
    def caption(self) -> str:
        return caption(self.shape, self.colour, self.direction)

    @property
    def name(self) -> str:
        return f"{self.colour}_{self.shape}_{self.direction}"

    def render(self, *, frames: int = 17, size: int = 64) -> np.ndarray:
        return render(self.shape, self.colour, self.direction, frames=frames, size=size, seed=self.seed)


def sample_specs(n: int, seed: int, colours=COLOURS) -> list[ClipSpec]:
    """n clip specs, balanced: every colour x shape x direction once (in a seeded order) before any repeats.

    Each spec gets its own seed, so repeated combinations differ in size, position and speed.
    """
    for colour in colours:
        _check(SHAPES[0], colour, DIRECTIONS[0])
    rng = np.random.default_rng(seed)
    combos = list(itertools.product(SHAPES, colours, DIRECTIONS))
    specs = []
    while len(specs) < n:
        for i in rng.permutation(len(combos))[: n - len(specs)]:
            specs.append(ClipSpec(*combos[i], seed=int(rng.integers(2**31))))
    return specs


def _check(shape: str, colour: str, direction: str) -> None:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    if colour not in RGB:
        raise ValueError(f"unknown colour {colour!r}; expected one of {ALL_COLOURS}")
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; expected one of {DIRECTIONS}")
