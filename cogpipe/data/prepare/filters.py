"""Score clips, then filter them: scores are recorded first (one JSON a clip), thresholds are applied separately, so
changing a threshold never scores again. Each dropped clip gets the reason (docs/prepare.md: what each score means).

    motion     mean optical-flow magnitude between consecutive frames (OpenCV's Farneback flow on grey frames
               scaled to SCORE_WIDTH pixels wide), in pixels per frame at that width: ~0 for a still shot
    sharpness  variance of the Laplacian of the grey frames (at SCORE_WIDTH): low for a blurred clip
    dark       the fraction of frames whose mean brightness is under DARK_LEVEL (of 255): black frames
    frozen     the fraction of consecutive frame pairs that differ by under FROZEN_DIFF (mean absolute, of 255)
    dhash      64-bit difference hashes of the frames at 1/4, 1/2 and 3/4 of the clip (192 bits, hex), so clips alike in
               one frame but moving differently differ; near-duplicates are clips whose hashes differ in at most
               --max-dup-distance bits (the first, by name, is kept)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

SCORE_WIDTH = 128
DARK_LEVEL = 16.0
FROZEN_DIFF = 0.5
SAMPLES = 16  # frames sampled for sharpness


@dataclass
class Thresholds:
    min_motion: float = 0.05  # pixels per frame at SCORE_WIDTH
    max_motion: float | None = None
    min_sharpness: float = 0.0  # off by default: it depends on the content; docs/prepare.md
    max_dark: float = 0.5
    max_frozen: float = 0.5
    max_dup_distance: int = 6  # bits of 192; -1: no duplicate check

    def as_dict(self) -> dict:
        return asdict(self)


def _grey(frames: np.ndarray) -> np.ndarray:
    import cv2

    h, w = frames.shape[1:3]
    size = (SCORE_WIDTH, max(2, round(h * SCORE_WIDTH / w)))
    return np.stack([cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), size, interpolation=cv2.INTER_AREA)
                     for f in frames])


def dhash(frame: np.ndarray) -> str:
    """64-bit difference hash of an RGB frame: grey, 9x8, each bit = a pixel brighter than its right neighbour."""
    import cv2

    small = cv2.resize(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), (9, 8), interpolation=cv2.INTER_AREA).astype(int)
    bits = (small[:, 1:] > small[:, :-1]).reshape(-1)
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def hamming(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def score_frames(frames: np.ndarray) -> dict:
    """The scores of a clip's frames (uint8 [F, H, W, 3])."""
    import cv2

    grey = _grey(frames)
    flows = [cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
             for a, b in zip(grey[:-1], grey[1:])]
    motion = float(np.mean([np.linalg.norm(f, axis=-1).mean() for f in flows])) if flows else 0.0
    pick = np.unique(np.linspace(0, len(grey) - 1, min(SAMPLES, len(grey))).round().astype(int))
    sharpness = float(np.mean([cv2.Laplacian(grey[i], cv2.CV_64F).var() for i in pick]))
    means = frames.reshape(len(frames), -1).mean(axis=1)
    diffs = np.abs(np.diff(grey.astype(np.float32), axis=0)).reshape(len(grey) - 1, -1).mean(axis=1)
    return dict(motion=round(motion, 4), sharpness=round(sharpness, 2),
                dark=round(float((means < DARK_LEVEL).mean()), 4),
                frozen=round(float((diffs < FROZEN_DIFF).mean()) if len(diffs) else 1.0, 4),
                dhash="".join(dhash(frames[(len(frames) * k) // 4]) for k in (1, 2, 3)))


def score_clip(path) -> dict:
    from cogpipe.video import read_video

    return score_frames(read_video(path))


def reasons(scores: dict, t: Thresholds) -> list[str]:
    """Why a clip's scores fail the thresholds (empty: kept), each naming the score, its value and the flag."""
    out = []
    if scores["motion"] < t.min_motion:
        out.append(f"too little motion: {scores['motion']:g} < --min-motion {t.min_motion:g}")
    if t.max_motion is not None and scores["motion"] > t.max_motion:
        out.append(f"too much motion: {scores['motion']:g} > --max-motion {t.max_motion:g}")
    if scores["sharpness"] < t.min_sharpness:
        out.append(f"blurred: sharpness {scores['sharpness']:g} < --min-sharpness {t.min_sharpness:g}")
    if scores["dark"] > t.max_dark:
        out.append(f"black frames: {scores['dark']:.0%} of frames > --max-dark {t.max_dark:g}")
    if scores["frozen"] > t.max_frozen:
        out.append(f"frozen frames: {scores['frozen']:.0%} of frame pairs > --max-frozen {t.max_frozen:g}")
    return out


def apply(scored: dict[str, dict], t: Thresholds) -> dict[str, str | None]:
    """{clip: scores} -> {clip: the reasons it is dropped joined by '; ', or None where kept}. Near-duplicates are
    looked for among the clips the other thresholds keep, in name order: a clip within max_dup_distance bits of a
    kept one is dropped, naming it."""
    out: dict[str, str | None] = {}
    kept: list[tuple[str, str]] = []
    for clip in sorted(scored):
        why = reasons(scored[clip], t)
        if not why and t.max_dup_distance >= 0:
            h = scored[clip]["dhash"]
            twin = next(((k, d) for k, kh in kept if (d := hamming(h, kh)) <= t.max_dup_distance), None)
            if twin:
                why.append(f"near-duplicate: dhash {twin[1]} bits from {twin[0]} (--max-dup-distance "
                           f"{t.max_dup_distance})")
            else:
                kept.append((clip, h))
        out[clip] = "; ".join(why) or None
    return out


def add_arguments(parser) -> None:
    d = Thresholds()
    parser.add_argument("--min-motion", type=float, default=d.min_motion,
                        help=f"drop clips whose mean optical flow is below this (pixels/frame at {SCORE_WIDTH} px "
                             f"wide; default {d.min_motion})")
    parser.add_argument("--max-motion", type=float, default=None, help="drop clips moving more than this")
    parser.add_argument("--min-sharpness", type=float, default=d.min_sharpness,
                        help="drop clips whose Laplacian variance is below this (default 0: off)")
    parser.add_argument("--max-dark", type=float, default=d.max_dark,
                        help=f"drop clips with more than this fraction of black frames (default {d.max_dark})")
    parser.add_argument("--max-frozen", type=float, default=d.max_frozen,
                        help=f"drop clips with more than this fraction of frozen frame pairs (default {d.max_frozen})")
    parser.add_argument("--max-dup-distance", type=int, default=d.max_dup_distance,
                        help=f"near-duplicates: dhash bits apart at most, of 192 "
                             f"(default {d.max_dup_distance}; -1: off)")


def from_args(args) -> Thresholds:
    return Thresholds(args.min_motion, args.max_motion, args.min_sharpness, args.max_dark, args.max_frozen,
                      args.max_dup_distance)
