"""Generate a video with a CogVideoX model: a Diffusers folder, hub id, SAT checkpoint or single-file transformer
(default: the shipped tiny model, models/tiny-world), optionally with LoRAs in any key format.

    python infer.py --prompt "a purple square moving left" \
        --model outputs/tiny_lora/export --lora outputs/tiny_lora/lora

Frames, size and fps default to the model's own; `python infer.py --help` lists every switch (README: infer.py).
"""

import sys

from cogpipe.inference.cli import main

if __name__ == "__main__":
    sys.exit(main())
