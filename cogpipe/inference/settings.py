"""The clip a generation makes: the model's own frames, size and fps unless overridden, checked against its
version's rules before any weights load (cogpipe.family)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cogpipe import family


@dataclass(frozen=True)
class Clip:
    frames: int
    height: int
    width: int
    fps: int
    source: str  # where the defaults came from, for the log: "the CogVideoX1.5-5B card", "its transformer config"


def folder_fps(folder) -> int | None:
    """The fps a cogpipe-trained model's folder records (validation.fps of its cogpipe_config.yaml), else None."""
    if folder is None or not (Path(folder) / "cogpipe_config.yaml").is_file():
        return None
    import yaml

    try:
        return int(yaml.safe_load((Path(folder) / "cogpipe_config.yaml").read_text())["validation"]["fps"])
    except (KeyError, TypeError, ValueError, OSError, yaml.YAMLError):
        return None


def resolve_clip(transformer_config: dict, vae_config: dict, frames=None, height=None, width=None, fps=None,
                 image_size: tuple[int, int] | None = None, folder=None) -> Clip:
    """The clip to generate: each of frames/height/width/fps as given, else the model's default (family.default_clip).
    Raises ValueError naming the flag and the rule when the result breaks the version's frame or size rule."""
    default = family.default_clip(transformer_config, vae_config, image_size, folder_fps(folder))
    card = family.released_variant(transformer_config)
    clip = Clip(frames if frames is not None else default["frames"], height if height is not None else
                default["height"], width if width is not None else default["width"],
                fps if fps is not None else default["fps"],
                f"the {card.title} card" if card else "its transformer config (what it was trained at)")
    problems = family.shape_problems(transformer_config, clip.frames, clip.height, clip.width)
    if problems:
        flags = {"frames": "--num-frames", "size": "--height/--width"}
        raise ValueError("; ".join(f"{flags[part]}: {message}" for part, message in problems))
    if clip.fps <= 0:
        raise ValueError(f"--fps must be positive, got {clip.fps}")
    return clip
