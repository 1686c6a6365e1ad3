"""Split long videos into training clips that follow the recipe's model (docs/prepare.md).

    shots    PySceneDetect's ContentDetector over the frames (decoded through cogpipe.video): a shot starts at each
             hard cut; `margin` frames at each side of a cut are left out so a window never holds a transition frame.
    windows  the CogVideoX version's frame rate (1.0: 8 fps, 1.5: 16 fps, cogpipe/family.py): output frame k of a
             window starting at source frame s is the source frame nearest to time s/src_fps + k/fps, so motion plays
             at its real speed (never slow motion: a source slower than the target fps is dropped, not stretched).
             A shot gives as many non-overlapping windows of the recipe's frame count as fit (the largest of the
             recipe's bucket frame counts that fits); a shot too short for the smallest is dropped with the reason.
    crop     centre-cropped to the aspect of the recipe's size (the bucket of the closest aspect) and resized to it
             (OpenCV INTER_AREA), written as mp4 at the target fps through cogpipe.video.write_mp4 (PyAV).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHUNK = 64  # frames decoded at a time
DETECT_WIDTH = 256  # frames are downscaled to this width for shot detection (as PySceneDetect's own downscale)


@dataclass(frozen=True)
class Target:
    """What a recipe trains on: the version's fps and the (frames, height, width) shapes (data.buckets or the one
    data.frames/height/width)."""
    fps: float
    shapes: tuple
    version: str = ""

    def params(self) -> dict:
        return dict(fps=self.fps, shapes=[list(s) for s in self.shapes])


def target_for(cfg) -> Target:
    """The recipe's target: fps from its model's version (cogpipe/family.py), shapes from data."""
    from cogpipe import family
    from cogpipe.data.folders import recipe_buckets
    from cogpipe.models import component_configs

    transformer_config, _ = component_configs(cfg.model)
    rules = family.rules(transformer_config)
    return Target(fps=float(rules.fps), shapes=tuple(tuple(int(x) for x in s) for s in recipe_buckets(cfg.data)),
                  version=rules.version)


def detect_cuts(reader, threshold: float = 27.0, min_scene_len: int = 8) -> list[int]:
    """Frame indices where a new shot starts (hard cuts), found by PySceneDetect's ContentDetector."""
    import cv2
    from scenedetect.detectors import ContentDetector

    detector = ContentDetector(threshold=threshold, min_scene_len=min_scene_len)
    scale = min(1.0, DETECT_WIDTH / reader.width)
    size = (max(2, round(reader.width * scale)), max(2, round(reader.height * scale)))
    cuts: list[int] = []
    for start in range(0, reader.num_frames, CHUNK):
        frames = reader.frames(range(start, min(start + CHUNK, reader.num_frames)))
        for i, frame in enumerate(frames):
            bgr = np.ascontiguousarray(frame[..., ::-1])
            if scale < 1.0:
                bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
            cuts += detector.process_frame(start + i, bgr)
    cuts += detector.post_process(reader.num_frames - 1)
    return sorted(set(int(c) for c in cuts if 0 < c < reader.num_frames))


def shots(num_frames: int, cuts, margin: int = 1) -> list[tuple[int, int]]:
    """[start, end) frame ranges between the cuts, `margin` frames left out at each side of a cut."""
    bounds = [0, *sorted(cuts), num_frames]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        s = a + (margin if a > 0 else 0)
        e = b - (margin if b < num_frames else 0)
        if e > s:
            out.append((s, e))
    return out


def source_indices(start: int, frames: int, src_fps: float, fps: float) -> np.ndarray:
    """The source frames of a window of `frames` frames at `fps` starting at source frame `start`: the frame
    nearest to each target time."""
    return start + np.floor(np.arange(frames) * (src_fps / fps) + 0.5).astype(np.int64)


def windows(start: int, end: int, src_fps: float, target: Target) -> tuple[int, list[np.ndarray], str | None]:
    """(frames, [source indices per window], reason a shot gives none). Windows follow each other in time without
    overlap: window w starts at source time start/src_fps + w*frames/fps."""
    if src_fps + 1e-6 < target.fps:
        return 0, [], (f"frame rate {src_fps:g} fps is below the recipe's {target.fps:g} fps (its clips would "
                       "play in slow motion)")
    counts = sorted({s[0] for s in target.shapes}, reverse=True)
    ratio = src_fps / target.fps
    for frames in counts:
        span = int(np.floor((frames - 1) * ratio + 0.5))  # last frame's offset
        if start + span > end - 1:
            continue
        out, w = [], 0
        while True:
            s = start + int(np.floor(w * frames * ratio + 0.5))
            if s + span > end - 1:
                break
            out.append(source_indices(s, frames, src_fps, target.fps))
            w += 1
        return frames, out, None
    least = counts[-1]
    need = (least - 1) / target.fps
    have = (end - start) / src_fps
    return 0, [], (f"shot too short: {end - start} frames ({have:.2f} s) at {src_fps:g} fps; the recipe's "
                   f"{least} frames at {target.fps:g} fps need {need:.2f} s")


def fit_shape(frames: int, height: int, width: int, shapes) -> tuple[int, int, int]:
    """The shape with `frames` frames whose aspect is closest to the source's (then the largest)."""
    aspect = width / height
    candidates = [s for s in shapes if s[0] == frames]
    return min(candidates, key=lambda s: (abs(np.log((s[2] / s[1]) / aspect)), -s[1] * s[2]))


def crop_resize(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [F, h, w, 3] -> [F, height, width, 3]: centre crop to the target aspect, then resize (INTER_AREA)."""
    import cv2

    h, w = frames.shape[1:3]
    if w * height > h * width:  # too wide: crop the sides
        cw = max(1, round(h * width / height))
        x = (w - cw) // 2
        frames = frames[:, :, x:x + cw]
    else:
        ch = max(1, round(w * height / width))
        y = (h - ch) // 2
        frames = frames[:, y:y + ch]
    if frames.shape[1:3] == (height, width):
        return np.ascontiguousarray(frames)
    interp = cv2.INTER_AREA if frames.shape[1] >= height else cv2.INTER_CUBIC
    return np.stack([cv2.resize(f, (width, height), interpolation=interp) for f in frames])


def source_id(path: str) -> str:
    """A short, stable name for a source video: its stem and a digest of its path."""
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(path).stem)[:40] or "video"
    return f"{stem}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def split_video(path: str, target: Target, out_dir, *, threshold: float = 27.0, margin: int = 1) -> dict:
    """Split one source into clips under out_dir. Returns {"source", "fps", "frames", "cuts", "clips": [row],
    "dropped": [{"shot": [s, e], "reason"}]}; a row: clip (file name), source, start, end (source frames), shot,
    frames, fps, height, width."""
    from cogpipe.video import open_video, write_mp4

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sid = source_id(path)
    record = dict(source=str(path), source_id=sid, clips=[], dropped=[])
    with open_video(path) as reader:
        src_fps = reader.fps
        record.update(fps=src_fps, frames=reader.num_frames)
        cuts = detect_cuts(reader, threshold)
        record["cuts"] = cuts
        for n, (s, e) in enumerate(shots(reader.num_frames, cuts, margin)):
            frames, wins, reason = windows(s, e, src_fps, target)
            if reason:
                record["dropped"].append(dict(shot=[s, e], reason=reason))
                continue
            _, height, width = fit_shape(frames, reader.height, reader.width, target.shapes)
            for idx in wins:
                clip = crop_resize(reader.frames(idx), height, width)
                name = f"{sid}-{int(idx[0]):06d}-{frames}x{height}x{width}.mp4"
                write_mp4(clip, out_dir / name, fps=target.fps)
                record["clips"].append(dict(clip=name, source=str(path), start=int(idx[0]), end=int(idx[-1]) + 1,
                                            shot=n, frames=frames, fps=target.fps, height=height, width=width))
    return record


def record_path(done_dir, path: str) -> Path:
    return Path(done_dir) / f"{source_id(path)}.json"


def load_record(done_dir, path: str, params: dict):
    """The split record of a source done with the same params, else None."""
    p = record_path(done_dir, path)
    if not p.exists():
        return None
    rec = json.loads(p.read_text())
    return rec if rec.get("params") == params else None
