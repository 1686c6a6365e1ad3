"""Clip folders of the synthetic world, in the official CogVideo finetune layout (prompts.txt + videos.txt,
one entry a line, video paths relative to the folder), which both the VAE pretraining and `train.py` read.

    cogpipe world clips --out outputs/world --n 2000 --seed 0     # pretraining clips: the palette, never purple
    cogpipe world tiny-data [--out data/tiny]                       # the shipped LoRA dataset: 12 purple clips

`make_world` takes specs from render.sample_specs: every colour x shape x direction once before any repeats,
each clip with its own seed (size, position, speed, colour jitter). The held-out colour (purple) is left out on
purpose: `make_tiny` writes it, for every shape x direction, as the dataset the tiny LoRA recipe teaches from.
Every tiny clip is decoded back and scored, so a dataset the scorer would not recognise is never written.
"""

from __future__ import annotations

from pathlib import Path

from cogpipe.paths import repo_path
from cogpipe.video import read_video, write_mp4
from cogpipe.world.render import COLOURS, DIRECTIONS, HELD_OUT_COLOUR, SHAPES, sample_specs
from cogpipe.world.score import score_video


def _write_layout(out: Path, prompts: list[str], videos: list[str]) -> None:
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n")
    (out / "videos.txt").write_text("\n".join(videos) + "\n")


def make_world(out, n: int, seed: int = 0, frames: int = 17, size: int = 64, fps: int = 8) -> Path:
    """Render n palette clips into `out` (prompts.txt, videos.txt, videos/NNNNN_<name>.mp4); returns `out`."""
    out = Path(out)
    prompts, videos = [], []
    for i, spec in enumerate(sample_specs(n, seed, colours=COLOURS)):
        rel = f"videos/{i:05d}_{spec.name}.mp4"
        write_mp4(spec.render(frames=frames, size=size), out / rel, fps=fps)
        prompts.append(spec.caption)
        videos.append(rel)
    _write_layout(out, prompts, videos)
    return out


def make_tiny(out=None, seed: int = 0, frames: int = 17, size: int = 64, fps: int = 8) -> Path:
    """The held-out colour for every shape x direction (12 clips), deterministic from `seed`; each clip is
    scored after an mp4 round trip. Default `out`: the checkout's data/tiny."""
    out = Path(out) if out is not None else repo_path("data/tiny", "--out")
    specs = sample_specs(len(SHAPES) * len(DIRECTIONS), seed, colours=[HELD_OUT_COLOUR])
    specs.sort(key=lambda s: (SHAPES.index(s.shape), DIRECTIONS.index(s.direction)))
    prompts, videos = [], []
    for spec in specs:
        rel = f"videos/{spec.name}.mp4"
        write_mp4(spec.render(frames=frames, size=size), out / rel, fps=fps)
        result = score_video(read_video(out / rel), spec.caption)
        if not result["match"]["all"]:
            raise ValueError(f"{out / rel}: the scorer does not recognise {spec.caption!r}: {result}")
        prompts.append(spec.caption)
        videos.append(rel)
    _write_layout(out, prompts, videos)
    return out


def _shape_arguments(parser) -> None:
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--fps", type=int, default=8)


def add_world_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="output folder (e.g. outputs/world; not for committing)")
    parser.add_argument("--n", type=int, default=2000, help="number of clips")
    _shape_arguments(parser)


def add_tiny_arguments(parser) -> None:
    parser.add_argument("--out", default=None, help="output folder (default: the checkout's data/tiny)")
    _shape_arguments(parser)


def run_world(args) -> int:
    out = make_world(args.out, args.n, args.seed, args.frames, args.size, args.fps)
    print(f"wrote {args.n} clips ({args.frames}x{args.size}x{args.size}) to {out}")
    return 0


def run_tiny(args) -> int:
    out = make_tiny(args.out, args.seed, args.frames, args.size, args.fps)
    size_kb = sum(p.stat().st_size for p in (out / "videos").glob("*.mp4")) / 1024
    print(f"wrote {len(list((out / 'videos').glob('*.mp4')))} clips ({args.frames}x{args.size}x{args.size}, "
          f"{size_kb:.0f} KB) to {out}")
    return 0
