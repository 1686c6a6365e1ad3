"""Video files in one place: reading (decord or PyAV), writing mp4 (PyAV), and the frame strip (videos drawn as one
image, a row each: the model card's validation frames, docs/tiny_world_strip.png).

Reading goes through `open_video(src)`, a `VideoReader` with `.num_frames`, `.fps`, `.height`, `.width`,
`.backend` and `.frames(indices) -> uint8 [N, H, W, 3]`; `src` is a path, bytes, or a binary file-like object
(a clip held in a datasets column or a tar shard). Two backends:

  decord  where it is installed (it has wheels for Linux x86_64 and Windows only): the default there;
  pyav    PyAV (`av`), whose wheels ship FFmpeg for every platform: the default where decord is not installed.

`COGPIPE_VIDEO_BACKEND=decord|pyav` forces one; `backend_name()` says which one is in use. Both give the same
frames for the same clip (docs/video.md: what was compared, and where they differ).

Writing is PyAV's libx264 on every platform (the same encoder and settings everywhere, no ffmpeg executable):
H.264, yuv420p, in an mp4, the kind of file `diffusers.utils.export_to_video` writes, which browsers play.
"""

from __future__ import annotations

import bisect
import io
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from cogpipe import atomic

ENV = "COGPIPE_VIDEO_BACKEND"
BACKENDS = ("decord", "pyav")
_MODULES = {"decord": "decord", "pyav": "av"}
_INSTALL = {"decord": "pip install decord (wheels: Linux x86_64, Windows x86_64)", "pyav": "pip install av"}


class VideoBackendError(RuntimeError):
    """No usable video backend, or COGPIPE_VIDEO_BACKEND names one that is unknown or not installed."""


class VideoError(ValueError):
    """A clip that cannot be opened or decoded; the message names the source and the backend."""


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    height: int
    width: int


def _installed(backend: str) -> bool:
    try:
        __import__(_MODULES[backend])
        return True
    except ImportError:
        return False


def _check(backend: str, where: str) -> str:
    name = backend.strip().lower()
    if name not in BACKENDS:
        raise VideoBackendError(f"{where}={backend!r}: unknown video backend; use one of {', '.join(BACKENDS)}")
    if not _installed(name):
        raise VideoBackendError(f"{where}={name}, but {_MODULES[name]} is not installed ({_INSTALL[name]}), "
                                f"or unset {ENV} to use the backend that is installed")
    return name


def backend_name() -> str:
    """The backend `open_video` uses: COGPIPE_VIDEO_BACKEND if set, else decord where installed, else PyAV."""
    forced = os.environ.get(ENV, "")
    if forced.strip():
        return _check(forced, ENV)
    for name in BACKENDS:
        if _installed(name):
            return name
    raise VideoBackendError(f"no video backend installed: {_INSTALL['pyav']} (every platform), or "
                            f"{_INSTALL['decord']}")


def _source(src):
    """(what a backend opens, a name for messages): a path string, or a seekable binary file-like."""
    if isinstance(src, (str, os.PathLike)):
        return str(src), str(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(src)), f"<{len(src)} bytes>"
    if hasattr(src, "read"):
        return src, getattr(src, "name", None) or f"<{type(src).__name__}>"
    raise TypeError(f"open_video expects a path, bytes or a binary file-like object, got {type(src).__name__}")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


class _TimestampMismatch(Exception):
    """PyAVReader: a decoded frame's timestamp is not the one its packet announced."""


class VideoReader:
    """A clip opened for reading frames by index. Use as a context manager, or call close()."""

    backend: str = ""
    num_frames: int
    fps: float
    height: int
    width: int

    def __init__(self, name: str):
        self.name = name

    def frames(self, indices) -> np.ndarray:
        """uint8 [N, H, W, 3] RGB frames at `indices` (0-based, in the order given; repeats allowed)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        bad = idx[(idx < 0) | (idx >= self.num_frames)]
        if bad.size:
            raise IndexError(f"{self.name}: frame index {int(bad[0])} out of range for a clip of "
                             f"{self.num_frames} frames")
        if idx.size == 0:
            return np.zeros((0, self.height, self.width, 3), np.uint8)
        try:
            return np.ascontiguousarray(self._frames(idx), dtype=np.uint8)
        except VideoError:
            raise
        except Exception as e:  # a clip that breaks past its first frame: PyAV's FFmpegError subclasses
            raise VideoError(f"{self.name}: cannot decode frames with {self.backend} ({type(e).__name__}: "
                             f"{_first_line(e)})") from None

    def info(self) -> VideoInfo:
        return VideoInfo(self.num_frames, self.fps, self.height, self.width)

    def _frames(self, idx: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self):
        return self.num_frames

    def __repr__(self):
        return (f"{type(self).__name__}({self.name!r}, backend={self.backend}, frames={self.num_frames}, "
                f"fps={self.fps:g}, {self.height}x{self.width})")


class DecordReader(VideoReader):
    backend = "decord"

    def __init__(self, src, name: str):
        import decord

        super().__init__(name)
        self._reader = decord.VideoReader(src, ctx=decord.cpu(0))
        # decodes through get_batch, as reads do: a clip decord cannot read (such as width 16) fails here, so the
        # dataset check reports it rather than the cache build
        first = self._frames(np.array([0]))[0]
        self.num_frames = len(self._reader)
        self.height, self.width = first.shape[:2]
        self.fps = float(self._reader.get_avg_fps())

    def _frames(self, idx):
        try:
            return self._reader.get_batch(idx.tolist()).asnumpy()
        except Exception as e:  # decord's DECORDError: e.g. its batch copy fails at widths such as 16 or 48
            raise VideoError(f"{self.name}: decord cannot decode frames ({type(e).__name__}: {_first_line(e)}); "
                             f"{ENV}=pyav reads it with PyAV") from None

    def close(self):
        self._reader = None


class PyAVReader(VideoReader):
    """Frame-accurate access by index: the stream's packets are read once (no decoding) for the presentation
    timestamps of its frames, frame i is the i-th smallest; a read seeks to the keyframe at or before the first
    wanted frame and decodes forward to each wanted timestamp, seeking again only across a keyframe. Where the
    decoded frames do not carry their packets' timestamps (AVI with B-frames), frames are counted from the start."""

    backend = "pyav"

    def __init__(self, src, name: str):
        import av

        super().__init__(name)
        self._container = av.open(src, mode="r")
        try:
            if not self._container.streams.video:
                raise VideoError(f"{name}: no video stream")
            self._stream = stream = self._container.streams.video[0]
            pts, keys = [], []
            for packet in self._container.demux(stream):
                if packet.size == 0 or packet.is_discard:
                    continue  # the demuxer's flush packet; frames an edit list cuts
                if packet.pts is None:
                    raise VideoError(f"{name}: a packet without a timestamp (a raw stream without a container); "
                                     "remux it into mp4/mkv first, or read it with decord")
                pts.append(packet.pts)
                if packet.is_keyframe:
                    keys.append(packet.pts)
            if not pts:
                raise VideoError(f"{name}: the video stream has no frames")
            self._pts = sorted(pts)
            self._index = {p: i for i, p in enumerate(self._pts)}
            self._keys = sorted(keys) or self._pts[:1]
            self.keyframes = [self._index[k] for k in self._keys]  # indices of the frames a seek can land on
            self._decoder = None  # a decode generator, positioned after frame self._at
            self._at = -1
            self._by_order = False  # True once the decoded timestamps are found not to match the packets
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            self.fps = float(rate) if rate else 0.0
            self.num_frames = len(self._pts)
            first = self._frames(np.array([0]))[0]  # decodes: a clip that does not decode fails here
            self.height, self.width = first.shape[:2]
        except BaseException:
            self._container.close()
            raise

    def _seek(self, i: int) -> None:
        key = self._keys[max(0, bisect.bisect_right(self._keys, self._pts[i]) - 1)]
        self._container.seek(key, stream=self._stream, backward=True, any_frame=False)
        self._decoder = self._container.decode(self._stream)
        self._at = -1

    def _frames(self, idx):
        if not self._by_order:
            try:
                return self._frames_by_pts(idx)
            except _TimestampMismatch:
                # the decoder's timestamps are not the packets' (AVI with B-frames): count frames from the start
                self._by_order, self._decoder = True, None
        return self._frames_by_order(idx)

    def _frames_by_pts(self, idx):
        out: dict[int, np.ndarray] = {}
        for i in sorted(set(idx.tolist())):
            # Decode forward from where the decoder is when no keyframe lies between; otherwise seek.
            key_before = bisect.bisect_right(self._keys, self._pts[i]) - 1
            if self._decoder is None or i <= self._at or (
                    key_before >= 0 and self._keys[key_before] > self._pts[max(self._at, 0)]):
                self._seek(i)
            for frame in self._decoder:
                at = self._index.get(frame.pts)
                if at is None:
                    continue
                self._at = at
                if at == i:
                    out[i] = frame.to_ndarray(format="rgb24")
                    break
                if at > i:
                    raise _TimestampMismatch
            else:
                raise _TimestampMismatch
        return np.stack([out[i] for i in idx.tolist()])

    def _frames_by_order(self, idx):
        wanted, out = set(idx.tolist()), {}
        self._container.seek(self._keys[0], stream=self._stream, backward=True, any_frame=False)
        for at, frame in enumerate(self._container.decode(self._stream)):
            if at in wanted:
                out[at] = frame.to_ndarray(format="rgb24")
                if len(out) == len(wanted):
                    break
        missing = sorted(wanted - out.keys())
        if missing:
            raise VideoError(f"{self.name}: the stream ended before frame {missing[0]} of {self.num_frames}")
        return np.stack([out[i] for i in idx.tolist()])

    def close(self):
        self._decoder = None
        self._container.close()


_READERS = {"decord": DecordReader, "pyav": PyAVReader}


def open_video(src, backend: str | None = None) -> VideoReader:
    """Open a clip (path, bytes or binary file-like) with `backend` (default: `backend_name()`). A clip that
    cannot be opened or decoded raises VideoError naming the source and the backend."""
    name = _check(backend, "backend") if backend is not None else backend_name()
    opened, label = _source(src)
    try:
        return _READERS[name](opened, label)
    except VideoError:
        raise
    except Exception as e:  # decord raises DECORDError/RuntimeError, PyAV its FFmpegError subclasses
        raise VideoError(f"{label}: cannot decode video with {name} ({type(e).__name__}: {_first_line(e)})") from None


def probe(src) -> VideoInfo:
    """(num_frames, fps, height, width) of a clip; its first frame is decoded, so a clip that probes decodes."""
    with open_video(src) as reader:
        return reader.info()


def read_video(src) -> np.ndarray:
    """Every frame of a clip: uint8 [F, H, W, 3]."""
    with open_video(src) as reader:
        return reader.frames(range(reader.num_frames))


def write_mp4(frames, path, fps: float = 8, quality: float = 8.0) -> Path:
    """Write uint8 frames [F, H, W, 3] (or floats in [0, 1]) to an H.264 (libx264, yuv420p) mp4 with PyAV.
    quality 1..10 as imageio's writer took it (crf = int((1 - quality / 10) * 51): 8 -> crf 10). Height and width
    must be even (4:2:0 chroma). The file appears complete or not at all (written under a temporary name)."""
    import av

    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"write_mp4 expects frames [F, H, W, 3] with F >= 1, got shape {tuple(frames.shape)}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"write_mp4: H.264 in yuv420p needs an even height and width, got {height}x{width}")
    if not 1 <= quality <= 10:
        raise ValueError(f"write_mp4: quality must be in 1..10, got {quality}")
    path = Path(path)
    with atomic.file(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(int((1 - quality / 10.0) * 51))}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def strip(videos, scale: int = 2, gap: int = 2) -> np.ndarray:
    """uint8 [F, H, W, 3] videos -> one image: a row per video, frames side by side, white gaps."""
    rows = []
    for video in videos:
        frames = [np.pad(f, ((gap // 2, gap - gap // 2), (gap // 2, gap - gap // 2), (0, 0)), constant_values=255)
                  for f in video]
        rows.append(np.concatenate(frames, axis=1))
    image = np.concatenate(rows, axis=0)
    return image.repeat(scale, axis=0).repeat(scale, axis=1)
