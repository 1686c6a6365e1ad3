"""Generate a video with a CogVideoX pipeline folder (default: the shipped tiny model, models/tiny-world),
optionally with a LoRA.

    python infer.py --prompt "a purple square moving left" \
        --model outputs/tiny_lora/export --lora outputs/tiny_lora/lora
"""

import argparse
import sys

from cogpipe.inference import DEFAULT_GUIDANCE, DEFAULT_STEPS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", required=True)
    p.add_argument("--model", default=None, help="Diffusers pipeline folder or hub id (default: models/tiny-world)")
    p.add_argument("--lora", default=None, help="LoRA folder or .safetensors file")
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--image", default=None, help="first frame, for image-to-video models")
    p.add_argument("--num-frames", type=int, default=17)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--output", default="output.mp4")
    a = p.parse_args(argv)

    from cogpipe.inference import generate_to_file

    image = None
    if a.image:
        from diffusers.utils import load_image

        image = load_image(a.image)
    path = generate_to_file(a.output, fps=a.fps, model=a.model, lora=a.lora, lora_scale=a.lora_scale,
                            prompt=a.prompt, num_frames=a.num_frames, height=a.height, width=a.width,
                            steps=a.steps, guidance=a.guidance, seed=a.seed, image=image)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
