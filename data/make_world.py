"""Generate pretraining clips of the synthetic world (cogpipe/world.py): the palette only, never purple.

    python data/make_world.py --out outputs/world --n 2000 --seed 0

Writes the official CogVideo finetune layout (prompts.txt + videos.txt, one entry a line, paths relative to
the folder) that both `python -m cogpipe.vae_training` and `train.py` read. Specs come from
cogpipe.world.sample_specs: every colour x shape x direction once before any repeats, each clip with its own
seed (size, position, speed, colour jitter). The held-out colour (purple) is left out on purpose: it is what
the shipped LoRA dataset data/tiny/ teaches. Not shipped: generate it on demand (a few seconds per 100 clips).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a clone before `pip install`

from cogpipe.video import write_mp4  # noqa: E402
from cogpipe.world import COLOURS, sample_specs  # noqa: E402


def make_world(out, n: int, seed: int = 0, frames: int = 17, size: int = 64, fps: int = 8) -> Path:
    """Render n clips into `out` (prompts.txt, videos.txt, videos/NNNNN_<name>.mp4); returns `out`."""
    out = Path(out)
    prompts, videos = [], []
    for i, spec in enumerate(sample_specs(n, seed, colours=COLOURS)):
        rel = f"videos/{i:05d}_{spec.name}.mp4"
        write_mp4(spec.render(frames=frames, size=size), out / rel, fps=fps)
        prompts.append(spec.caption)
        videos.append(rel)
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n")
    (out / "videos.txt").write_text("\n".join(videos) + "\n")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (e.g. outputs/world; not for committing)")
    parser.add_argument("--n", type=int, default=2000, help="number of clips")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--fps", type=int, default=8)
    args = parser.parse_args(argv)
    out = make_world(args.out, args.n, args.seed, args.frames, args.size, args.fps)
    print(f"wrote {args.n} clips ({args.frames}x{args.size}x{args.size}) to {out}")


if __name__ == "__main__":
    main()
