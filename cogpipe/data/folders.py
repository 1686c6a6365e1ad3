"""Datasets: find (video, caption) pairs in a folder, decode (cogpipe.video: decord or PyAV), sample, resize, crop.

Layouts accepted (first match wins):
  1. `prompts.txt` + `videos.txt`: the official CogVideo finetune layout, one entry a line,
     paths relative to the folder (`prompt.txt` is read where there is no `prompts.txt`: the name the
     Disney dataset of the CogVideoX LoRA tutorials uses); an optional `images.txt` gives a first-frame
     image per clip for image-to-video;
  2. `metadata.jsonl` or `metadata.csv` with a video column (video | file_name | path) and a caption
     column (caption | prompt | text), and optionally a first-frame image column (image | image_path |
     first_frame);
  3. a folder of videos, each with a same-name `.txt` caption.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

VIDEO_EXTS = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v"}
VIDEO_COLUMNS = ("video", "file_name", "path", "video_path")
CAPTION_COLUMNS = ("caption", "prompt", "text")
IMAGE_COLUMNS = ("image", "image_path", "first_frame")


class DataError(ValueError):
    """A dataset problem; the message names the file and the rule."""

    def __init__(self, message: str, problem: "Problem | None" = None):
        super().__init__(message)
        self.problem = problem


def _bad(path, rule: str) -> DataError:
    problem = Problem(str(path), rule)
    return DataError(str(problem), problem)


@dataclass(frozen=True)
class Sample:
    video: Path
    caption: str
    image: Optional[Path] = None  # first frame for image-to-video; None: the clip's own first frame
    shape: Optional[tuple] = None  # (frames, height, width) trained on: its bucket, set by the dataset check


@dataclass(frozen=True)
class Problem:
    """One bad input: the file (with line, where there is one) and the rule it breaks."""
    file: str
    rule: str

    def __str__(self):
        return f"{self.file}: {self.rule}"


def report(problems: list[Problem], root) -> str:
    lines = "\n".join(f"  - {p}" for p in problems)
    return f"dataset {root}: {len(problems)} problem(s):\n{lines}"


def _read_lines(file: Path, problems: list[Problem]) -> list[str | None] | None:
    """The lines of a list file, stripped and counted exactly: "a\nb\n" is two lines, "a\nb\n\n" three (the last
    one empty). A line that is not UTF-8 becomes None and a problem; a file that cannot be read gives None and a
    problem."""
    try:
        raw_lines = file.read_bytes().splitlines()
    except OSError as e:
        problems.append(Problem(str(file), f"cannot read this list file ({type(e).__name__}: {e.strerror or e})"))
        return None
    lines: list[str | None] = []
    for i, raw in enumerate(raw_lines):
        try:
            lines.append(raw.decode("utf-8").strip())
        except UnicodeDecodeError as e:
            problems.append(Problem(f"{file}:{i + 1}", f"not valid UTF-8 text ({e.reason} at byte {e.start})"))
            lines.append(None)
    return lines


def _pick(row: dict, names) -> str | None:
    for name in names:
        if name in row and row[name] is not None:
            return str(row[name])
    return None


def _paired(root: Path, videos: Path, vids: list, others: list[tuple[Path, list, str]], problems) -> list[tuple]:
    """Pair the video list with the other lists line by line. Lists of different lengths are a problem, and every
    entry past the shorter list is one too (skipped with data.skip_bad, never paired with another line)."""
    rows = []
    for other, lines, what in others:
        if len(lines) != len(vids):
            problems.append(Problem(str(root), f"{other} has {len(lines)} lines but {videos} has {len(vids)}: each "
                                               f"video needs exactly one {what} line"))
    n = min(len(vids), *(len(lines) for _, lines, _ in others))
    for i in range(n, len(vids)):
        problems.append(Problem(f"{videos}:{i + 1}", "no line for this video in " +
                                ", ".join(o.name for o, lines, _ in others if len(lines) <= i)))
    for other, lines, what in others:
        for i in range(n, len(lines)):
            if i >= len(vids):
                problems.append(Problem(f"{other}:{i + 1}", f"a {what} with no line in {videos.name}"))
    for i in range(n):
        entry = [vids[i]] + [lines[i] for _, lines, _ in others]
        rows.append((i, entry))
    return rows


def _rows(root: Path, problems: list[Problem]) -> list[tuple]:
    """(video path as written, caption, where, image path or None) for each entry of the dataset. An entry whose
    video line is missing or empty is a problem, not a row."""
    prompts, videos = root / "prompts.txt", root / "videos.txt"
    if not prompts.exists() and (root / "prompt.txt").exists():
        prompts = root / "prompt.txt"  # the Disney dataset's name (CogVideoX LoRA tutorials, diffusers' finetuning)
    if prompts.exists() or videos.exists():
        if not (prompts.exists() and videos.exists()):
            missing = "videos.txt" if prompts.exists() else "prompts.txt"
            problems.append(Problem(str(root / missing), "not found: prompts.txt and videos.txt go together"))
            return []
        caps, vids = _read_lines(prompts, problems), _read_lines(videos, problems)
        images = root / "images.txt"
        imgs = _read_lines(images, problems) if images.exists() else None
        if caps is None or vids is None or (images.exists() and imgs is None):
            return []
        others = [(prompts, caps, "caption")] + ([(images, imgs, "first-frame image")] if imgs is not None else [])
        out = []
        for i, (video, caption, *image) in _paired(root, videos, vids, others, problems):
            where = f"{videos}:{i + 1}"
            if video == "":
                blank = caption == "" and (not image or image[0] == "")
                problems.append(Problem(where, "empty line in " + ("every list (a blank line at the end?)" if blank
                                                                   else "videos.txt: no video path")))
                continue
            out.append((video, caption, where, (image[0] or None) if image else None))
        return out
    for name in ("metadata.jsonl", "metadata.csv"):
        meta = root / name
        if not meta.exists():
            continue
        rows = []
        if name.endswith(".jsonl"):
            for i, line in enumerate(_read_lines(meta, problems) or []):
                if not line:
                    continue
                try:
                    rows.append((json.loads(line), i + 1))
                except json.JSONDecodeError as e:
                    problems.append(Problem(f"{meta}:{i + 1}", f"not valid JSON ({e.msg})"))
        else:
            try:
                text = io.StringIO(meta.read_bytes().decode("utf-8"), newline="")
                rows = [(r, i + 2) for i, r in enumerate(csv.DictReader(text))]  # line 1 is the header
            except (OSError, UnicodeDecodeError) as e:
                problems.append(Problem(str(meta), f"cannot read as UTF-8 CSV ({type(e).__name__}: {e})"))
        out = []
        for r, line in rows:
            video, caption = _pick(r, VIDEO_COLUMNS), _pick(r, CAPTION_COLUMNS)
            if video is None or caption is None:
                what, names = ("video", VIDEO_COLUMNS) if video is None else ("caption", CAPTION_COLUMNS)
                problems.append(Problem(f"{meta}:{line}", f"no {what} column; expected one of {list(names)}, "
                                                          f"found {sorted(r)}"))
                continue
            image = next((str(r[c]) for c in IMAGE_COLUMNS if r.get(c)), None)
            out.append((video, caption.strip(), f"{meta}:{line}", image))
        return out
    out = []
    for video in sorted(p for p in root.iterdir() if p.suffix.lower() in VIDEO_EXTS):
        caption_file = video.with_suffix(".txt")
        if not caption_file.exists():
            problems.append(Problem(str(video), f"no caption file {caption_file.name} beside it"))
            continue
        lines = _read_lines(caption_file, problems)
        if lines is None:
            continue
        out.append((video.name, None if None in lines else " ".join(x for x in lines if x), str(caption_file), None))
    return out


def scan(root) -> tuple[list[Sample], list[Problem]]:
    """The usable (video, caption) pairs of a dataset folder, in file order, and every problem of the rest:
    structural ones (lists of different lengths and the entries left unpaired, an unreadable list file, a missing
    column) together with those of single entries (path escaping the folder, missing video, empty or undecodable
    caption). Only a missing folder, or one with no dataset in it, raises DataError."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root: dataset folder {root} does not exist")
    return scan_tree(root)


def scan_tree(root) -> tuple[list[Sample], list[Problem]]:
    """`scan` of a folder that exists: `root` is a pathlib.Path, or any object with the few Path methods used here
    and in _rows (`/`, name, suffix, with_suffix, exists, is_file, read_bytes, iterdir, resolve, is_relative_to):
    cogpipe.data.sources reads the layouts behind an fsspec URL with it, under the same rules and in the same
    words. The Samples' paths are of root's kind."""
    problems: list[Problem] = []
    rows = _rows(root, problems)
    if not rows and not problems:
        raise DataError(f"{root}: no dataset found; expected prompts.txt + videos.txt, metadata.jsonl, "
                        f"metadata.csv, or videos with same-name .txt captions")
    samples = []
    for rel, caption, where, image in rows:
        if rel is None:
            continue  # the line naming the video is not UTF-8: already reported
        path = (root / rel.strip()).resolve()
        image_path = (root / image.strip()).resolve() if image else None
        if not path.is_relative_to(root.resolve()):
            problems.append(Problem(where, f"path {rel!r} escapes the dataset folder {root}"))
        elif image_path is not None and not image_path.is_relative_to(root.resolve()):
            problems.append(Problem(where, f"image path {image!r} escapes the dataset folder {root}"))
        elif not path.is_file():
            problems.append(Problem(str(path), "video file not found"))
        elif caption is None:
            continue  # its caption is not UTF-8: already reported
        elif not caption:
            problems.append(Problem(str(path), f"empty caption ({where})"))
        else:
            samples.append(Sample(path, caption, image_path))
    return samples, problems


def discover(root) -> list[Sample]:
    """The (video, caption) pairs of a dataset folder; any problem raises one DataError listing all."""
    samples, problems = scan(root)
    if problems:
        raise DataError(report(problems, root))
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


def _reader(path: Path):
    """The clip opened with cogpipe.video (decord or PyAV: video.backend_name()); DataError names the rule."""
    from cogpipe.video import VideoError, open_video

    if not path.is_file():
        raise _bad(path, "video file not found")
    if path.stat().st_size == 0:
        raise _bad(path, "empty file (0 bytes)")
    try:
        return open_video(path)
    except VideoError as e:  # the message starts with the path: keep the rule only
        raise _bad(path, f"cannot decode video ({str(e).removeprefix(f'{path}: ')})") from None


def probe_clip(path) -> tuple[int, int, int]:
    """(frames, height, width) of a clip that decodes; DataError names the file and the rule."""
    with _reader(Path(path)) as reader:
        return reader.num_frames, reader.height, reader.width


def shape_problem(available: tuple[int, int, int], wanted: tuple[int, int, int]) -> Optional[str]:
    """Why a clip of shape `available` cannot give `wanted` (frames, height, width); None if it can."""
    (n, h, w), (frames, height, width) = available, wanted
    if n < frames:
        return f"has {n} frames, fewer than data.frames={frames}"
    if h < height or w < width:
        return f"is {h}x{w}, smaller than data.height x data.width = {height}x{width}"
    return None


def recipe_buckets(data_cfg) -> list[tuple[int, int, int]]:
    """The (frames, height, width) shapes a recipe trains on: `data.buckets`, or the single configured shape."""
    return [tuple(b) for b in data_cfg.buckets] or [(data_cfg.frames, data_cfg.height, data_cfg.width)]


def choose_bucket(available: tuple[int, int, int], buckets) -> Optional[tuple]:
    """The nearest bucket a clip can fill without upsampling or repeating frames: closest aspect
    ratio, then the largest area, then the most frames. None when no bucket fits."""
    n, h, w = available
    fits = [tuple(b) for b in buckets if shape_problem(available, tuple(b)) is None]
    if not fits:
        return None
    return min(fits, key=lambda b: (abs(math.log((h / w) / (b[1] / b[2]))), -b[1] * b[2], -b[0]))


def open_clip(path, num_frames: int, height: int, width: int):
    """Open a clip (cogpipe.video.open_video) and check it against the configured shape; DataError names the
    rule. The caller closes the reader."""
    path = Path(path)
    reader = _reader(path)
    problem = shape_problem((reader.num_frames, reader.height, reader.width), (num_frames, height, width))
    if problem:
        reader.close()
        raise _bad(path, problem)
    return reader


def load_clip(path, num_frames: int, height: int, width: int) -> torch.Tensor:
    """Decode, sample `num_frames` frames, resize and crop: float [F, 3, H, W] in [-1, 1]."""
    with open_clip(path, num_frames, height, width) as reader:
        frames = torch.from_numpy(reader.frames(frame_indices(reader.num_frames, num_frames)))
    frames = frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (F, 3, h, w) in [-1, 1]
    return resize_crop(frames, height, width).clamp(-1.0, 1.0).contiguous()


def _image_pixels(path, data: Optional[bytes] = None) -> np.ndarray:
    """An image file (or its bytes, `data`; `path` then only names it) as uint8 RGB [h, w, 3]; DataError names
    the rule."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data) if data is not None else Path(path)) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError) as e:
        raise _bad(path, f"cannot read first-frame image ({type(e).__name__}: {str(e)[:200]})") from None


def probe_image(data: bytes, where: str = "image") -> tuple[int, int]:
    """(height, width) of a first-frame image's bytes; DataError names the rule (load_image's words)."""
    return tuple(_image_pixels(where, data).shape[:2])


def load_image(path, height: int, width: int, data: Optional[bytes] = None) -> torch.Tensor:
    """A first-frame image (a file, or its bytes `data`, `path` then naming it), resized and center-cropped like
    the clips: float [3, H, W] in [-1, 1]."""
    pixels = _image_pixels(path, data)
    if pixels.shape[0] < height or pixels.shape[1] < width:
        raise _bad(path, f"image is {pixels.shape[0]}x{pixels.shape[1]}, smaller than data.height x data.width = "
                         f"{height}x{width}")
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    return resize_crop(x, height, width)[0].clamp(-1.0, 1.0).contiguous()


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
