"""cogpipe: CogVideoX fine-tuning, export, conversion and inference tools.

Each subcommand lives in its own module with `add_arguments(parser)` and `run(args) -> int`; this file
only dispatches, importing just the subcommand that runs. Packages add commands of their own through the
`cogpipe.commands` entry points (pyproject.toml): each names a {command: (module, help)} table, which is how the
synthetic world demo adds `cogpipe world` and `cogpipe score` without cogpipe importing it.
"""

import argparse
import importlib
import sys
from importlib.metadata import entry_points

# subcommand -> module providing add_arguments(parser) and run(args)
COMMANDS = {
    "convert": ("cogpipe.convert.cli", "convert SAT <-> Diffusers checkpoints (transformer, VAE, LoRA)"),
    "ui": ("cogpipe.ui.cli", "serve the web page: generate, watch runs, start training (the `ui` extra)"),
    "export": ("cogpipe.export", "export a training output folder to a Diffusers pipeline + LoRA"),
    "check": ("cogpipe.data.checks", "check a recipe's config and dataset without training"),
    "data": ("cogpipe.data.cli", "index and encode a dataset of any size on Ray into a latent store, verify it"),
    "prepare": ("cogpipe.data.prepare.cli", "raw videos to a training set: split into the recipe's clips, filter, "
                                            "caption (Qwen2.5-VL), write (docs/prepare.md)"),
    "plan": ("cogpipe.plan.cli", "estimate a recipe's peak GPU memory and the switches that make it fit"),
    "teacache-fit": ("cogpipe.inference.fit", "fit TeaCache's coefficients and MagCache's ratios for a model from "
                                              "a few of its own generations (infer.py --teacache-coefficients)"),
}


def commands() -> dict[str, tuple[str, str]]:
    """COMMANDS and those the installed packages add (entry point group `cogpipe.commands`)."""
    table = dict(COMMANDS)
    for ep in entry_points(group="cogpipe.commands"):
        table.update(ep.load())
    return table


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="cogpipe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in commands().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if argv and argv[0] == name:  # import only the subcommand that runs
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
