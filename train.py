"""Train a CogVideoX model as a recipe says.

    accelerate launch train.py --config configs/tiny_lora.yaml [key=value ...]
    python train.py --config configs/tiny_lora.yaml train.max_steps=10
"""

import argparse
import os
import sys

from cogpipe.config import ConfigError, add_recipe_arguments, load_config
from cogpipe.data.folders import DataError
from cogpipe.rundir import RefusedByMainProcess
from cogpipe.signals import Interrupted, stacks_on_sigusr1
from cogpipe.training import WorldNotFormed, train


def _error(e: Exception) -> None:
    """The error, once. `accelerate launch` with one process (its simple launcher: no torchrun, no RANK) re-raises
    what its child wrote to stderr as its own exception, which prints the message a second time under a traceback;
    there it goes to stdout, which accelerate passes through as it is."""
    simple = "ACCELERATE_MIXED_PRECISION" in os.environ and "RANK" not in os.environ
    print(f"error: {e}", file=sys.stdout if simple else sys.stderr, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_recipe_arguments(parser)
    args = parser.parse_args(argv)
    stacks_on_sigusr1()  # kill -USR1 PID: where each thread of this process is (README: Troubleshooting)
    try:
        cfg = load_config(args.config, args.overrides)
        try:
            out = train(cfg)
        except Interrupted as e:
            print(f"interrupted: {e}; continue with train.resume_from=latest", file=sys.stderr)
            return 128 + e.signum
    except ConfigError as e:  # every process of a launch meets the same one: the first says it
        if os.environ.get("RANK", "0") == "0":
            _error(e)
        return 2
    except (DataError, FileNotFoundError, FloatingPointError, MemoryError, WorldNotFormed, RefusedByMainProcess) as e:
        _error(e)
        return 2
    print(f"done: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
