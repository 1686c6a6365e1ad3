"""Reading and writing video files (decord to read, imageio-ffmpeg to write mp4) and the frame strip: videos drawn
as one image, a row each (the model card's validation frames, docs/tiny_world_strip.png)."""

from pathlib import Path

import numpy as np


def write_mp4(frames, path, fps: int = 8, quality: float = 8.0) -> Path:
    """Write uint8 frames [F, H, W, 3] (or floats in [0, 1]) to an H.264 mp4."""
    import imageio

    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"write_mp4 expects frames [F, H, W, 3], got shape {tuple(frames.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # macro_block_size=1 keeps small sizes (e.g. 64x64) unchanged instead of padding to 16.
    with imageio.get_writer(path, fps=fps, codec="libx264", quality=quality,
                            macro_block_size=1, pixelformat="yuv420p") as writer:
        for frame in frames:
            writer.append_data(frame)
    return path


def read_video(path) -> np.ndarray:
    """Decode every frame of a video with decord: uint8 [F, H, W, 3]."""
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    return reader.get_batch(list(range(len(reader)))).asnumpy()


def strip(videos, scale: int = 2, gap: int = 2) -> np.ndarray:
    """uint8 [F, H, W, 3] videos -> one image: a row per video, frames side by side, white gaps."""
    rows = []
    for video in videos:
        frames = [np.pad(f, ((gap // 2, gap - gap // 2), (gap // 2, gap - gap // 2), (0, 0)), constant_values=255)
                  for f in video]
        rows.append(np.concatenate(frames, axis=1))
    image = np.concatenate(rows, axis=0)
    return image.repeat(scale, axis=0).repeat(scale, axis=1)
