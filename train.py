"""Train a CogVideoX model as a recipe says.

    accelerate launch train.py --config configs/tiny_lora.yaml [key=value ...]
    python train.py --config configs/tiny_lora.yaml train.max_steps=10
"""

import argparse
import sys

from cogpipe.config import ConfigError, add_recipe_arguments, load_config
from cogpipe.data.folders import DataError
from cogpipe.signals import Interrupted
from cogpipe.training import WorldNotFormed, train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_recipe_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        try:
            out = train(cfg)
        except Interrupted as e:
            print(f"interrupted: {e}; continue with train.resume_from=latest", file=sys.stderr)
            return 128 + e.signum
    except (ConfigError, DataError, FileNotFoundError, FloatingPointError, MemoryError, WorldNotFormed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
