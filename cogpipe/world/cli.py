"""`cogpipe world <command>`: make the world's clips, pretrain the tiny model stage by stage, draw the strip.

    cogpipe world clips --out outputs/world --n 1000        pretraining clips (the palette, never purple)
    cogpipe world tiny-data                                 rebuild data/tiny (the 12 purple LoRA clips)
    cogpipe world train-vae --config configs/world/tiny_world_vae.yaml
    cogpipe world assemble --vae DIR --out DIR              the initial pipeline folder the DiT recipe trains
    cogpipe world ship --export DIR --out models/tiny-world
    cogpipe world pretrain [--work outputs/pretrain] [--ship models/tiny-world]   every stage in order
    cogpipe world strip [--lora outputs/tiny_lora/lora]     outputs/tiny_world_strip.png (--out: elsewhere)

Also `python -m cogpipe.world <command>`.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, its add-arguments function, its run function, help)
COMMANDS = {
    "clips": ("cogpipe.world.clips", "add_world_arguments", "run_world", "render pretraining clips"),
    "tiny-data": ("cogpipe.world.clips", "add_tiny_arguments", "run_tiny", "rebuild the shipped data/tiny"),
    "train-vae": ("cogpipe.world.vae", "add_arguments", "run", "train the tiny VAE from a recipe"),
    "assemble": ("cogpipe.world.pretrain", "add_assemble_arguments", "run_assemble",
                 "the initial pipeline folder: tokenizer, fixed T5, trained VAE, random transformer"),
    "ship": ("cogpipe.world.pretrain", "add_ship_arguments", "run_ship", "copy a trained export into the repo"),
    "pretrain": ("cogpipe.world.pretrain", "add_chain_arguments", "run_chain_command", "run every stage in order"),
    "strip": ("cogpipe.world.strip", "add_arguments", "run", "render the README's frame strip"),
}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="world_command", required=True)
    for name, (module, add, run_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        getattr(importlib.import_module(module), add)(p)
        p.set_defaults(_world_run=(module, run_name))


def run(args) -> int:
    module, run_name = args._world_run
    return int(getattr(importlib.import_module(module), run_name)(args) or 0)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cogpipe.world", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
