"""Datasets: find (video, caption) pairs in a folder, decode with decord, sample, resize, crop.

Layouts accepted (first match wins):
  1. `prompts.txt` + `videos.txt`: the official CogVideo finetune layout, one entry a line,
     paths relative to the folder;
  2. `metadata.jsonl` or `metadata.csv` with a video column (video | file_name | path) and a caption
     column (caption | prompt | text);
  3. a folder of videos, each with a same-name `.txt` caption.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

VIDEO_EXTS = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v"}
VIDEO_COLUMNS = ("video", "file_name", "path", "video_path")
CAPTION_COLUMNS = ("caption", "prompt", "text")


class DataError(ValueError):
    """A dataset problem; the message names the file and the rule."""


@dataclass(frozen=True)
class Sample:
    video: Path
    caption: str


def _inside(root: Path, rel: str, where: str) -> Path:
    path = (root / rel.strip()).resolve()
    if not path.is_relative_to(root.resolve()):
        raise DataError(f"{where}: path {rel!r} escapes the dataset folder {root}")
    return path


def _read_lines(file: Path) -> list[str]:
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{file}: not valid UTF-8 text ({e.reason} at byte {e.start})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _pick(row: dict, names, file: Path, what: str) -> str:
    for name in names:
        if name in row and row[name] is not None:
            return str(row[name])
    raise DataError(f"{file}: no {what} column; expected one of {list(names)}, found {sorted(row)}")


def discover(root) -> list[Sample]:
    """The (video, caption) pairs of a dataset folder, in file order."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root: dataset folder {root} does not exist")
    prompts, videos = root / "prompts.txt", root / "videos.txt"
    if prompts.exists() or videos.exists():
        if not (prompts.exists() and videos.exists()):
            raise DataError(f"{root}: prompts.txt and videos.txt must both exist (found only "
                            f"{'prompts.txt' if prompts.exists() else 'videos.txt'})")
        caps, vids = _read_lines(prompts), _read_lines(videos)
        if len(caps) != len(vids):
            raise DataError(f"{prompts} has {len(caps)} lines but {videos} has {len(vids)}: "
                            "each video needs exactly one caption line")
        return [Sample(_inside(root, v, f"{videos}:{i + 1}"), c) for i, (v, c) in enumerate(zip(vids, caps))]
    for name in ("metadata.jsonl", "metadata.csv"):
        meta = root / name
        if meta.exists():
            if name.endswith(".jsonl"):
                rows = []
                for i, line in enumerate(_read_lines(meta)):
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{meta}:{i + 1}: not valid JSON ({e.msg})") from None
            else:
                with open(meta, newline="", encoding="utf-8") as f:
                    rows = list(csv.DictReader(f))
            return [Sample(_inside(root, _pick(r, VIDEO_COLUMNS, meta, "video"), f"{meta}:{i + 1}"),
                           _pick(r, CAPTION_COLUMNS, meta, "caption").strip())
                    for i, r in enumerate(rows)]
    samples = []
    for video in sorted(p for p in root.iterdir() if p.suffix.lower() in VIDEO_EXTS):
        caption_file = video.with_suffix(".txt")
        if not caption_file.exists():
            raise DataError(f"{video}: no caption file {caption_file.name} beside it")
        samples.append(Sample(video.resolve(), " ".join(_read_lines(caption_file))))
    if not samples:
        raise DataError(f"{root}: no dataset found; expected prompts.txt + videos.txt, metadata.jsonl, "
                        f"metadata.csv, or videos with same-name .txt captions")
    return samples


def frame_indices(num_available: int, num_frames: int) -> np.ndarray:
    """`num_frames` indices spread evenly over the clip, first and last frame included."""
    return np.linspace(0, num_available - 1, num_frames).round().astype(np.int64)


def resize_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Aspect-preserving resize so the clip covers (height, width), then a center crop. [F,C,h,w]."""
    h, w = frames.shape[-2:]
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    if (nh, nw) != (h, w):
        frames = F.interpolate(frames, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - height) // 2, (nw - width) // 2
    return frames[..., top:top + height, left:left + width]


def load_clip(path, num_frames: int, height: int, width: int) -> torch.Tensor:
    """Decode, sample `num_frames` frames, resize and crop: float [F, 3, H, W] in [-1, 1]."""
    import decord

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: video file not found")
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
        available = len(reader)
    except Exception as e:  # decord raises its own DECORDError or RuntimeError
        raise DataError(f"{path}: cannot decode video ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if available < num_frames:
        raise DataError(f"{path}: has {available} frames, fewer than data.frames={num_frames}")
    h, w = reader[0].shape[:2]
    if h < height or w < width:
        raise DataError(f"{path}: is {h}x{w}, smaller than data.height x data.width = {height}x{width}")
    frames = torch.from_numpy(reader.get_batch(frame_indices(available, num_frames).tolist()).asnumpy())
    frames = frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (F, 3, h, w) in [-1, 1]
    return resize_crop(frames, height, width).clamp(-1.0, 1.0).contiguous()


class VideoDataset(torch.utils.data.Dataset):
    """Decoded clips of a dataset folder: {"frames": [F,3,H,W] in [-1,1], "caption": str, "video": Path}."""

    def __init__(self, root, frames: int, height: int, width: int, samples: Optional[list[Sample]] = None):
        self.samples = samples if samples is not None else discover(root)
        self.frames, self.height, self.width = frames, height, width

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        return {"frames": load_clip(s.video, self.frames, self.height, self.width), "caption": s.caption,
                "video": s.video}
