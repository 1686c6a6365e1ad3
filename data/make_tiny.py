"""Generate the shipped LoRA dataset data/tiny/: the held-out colour for every shape x direction.

    python data/make_tiny.py            # rewrites data/tiny/ (deterministic: same seed, same clips)

The tiny model is pretrained on the palette of cogpipe/world.py (COLOURS) and never sees HELD_OUT_COLOUR
("purple"); these 12 clips are what the tiny LoRA recipe teaches it from. The layout is the official
CogVideo finetune one: prompts.txt and videos.txt, one entry a line, video paths relative to the folder.
Every clip is decoded back and scored, so a dataset the scorer would not recognise is never written silently.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a clone before `pip install`

from cogpipe.score import score_video  # noqa: E402
from cogpipe.video import read_video, write_mp4  # noqa: E402
from cogpipe.world import DIRECTIONS, HELD_OUT_COLOUR, SHAPES, sample_specs  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "tiny"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--fps", type=int, default=8)
    args = parser.parse_args(argv)

    out = Path(args.out)
    specs = sample_specs(len(SHAPES) * len(DIRECTIONS), args.seed, colours=[HELD_OUT_COLOUR])
    specs.sort(key=lambda s: (SHAPES.index(s.shape), DIRECTIONS.index(s.direction)))
    prompts, videos = [], []
    for spec in specs:
        rel = f"videos/{spec.name}.mp4"
        write_mp4(spec.render(frames=args.frames, size=args.size), out / rel, fps=args.fps)
        result = score_video(read_video(out / rel), spec.caption)
        if not result["match"]["all"]:
            raise SystemExit(f"{rel}: the scorer does not recognise {spec.caption!r}: {result}")
        prompts.append(spec.caption)
        videos.append(rel)
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n")
    (out / "videos.txt").write_text("\n".join(videos) + "\n")
    size_kb = sum(p.stat().st_size for p in (out / "videos").glob("*.mp4")) / 1024
    print(f"wrote {len(videos)} clips ({args.frames}x{args.size}x{args.size}, {size_kb:.0f} KB) to {out}")


if __name__ == "__main__":
    main()
