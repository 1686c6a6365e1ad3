"""The synthetic world demo, off the training path: clips of one coloured shape moving on a plain
background (render), a detector that scores generated videos against their prompts (score), and the
chain that pretrains the shipped tiny model on it from nothing (clips, vae, pretrain), plus the README's
frame strip (strip). Its commands: `cogpipe world --help`; its scorer: `cogpipe score`."""

# the `cogpipe` commands this demo adds (pyproject.toml's `cogpipe.commands` entry point names this table)
COMMANDS = {
    "score": ("cogpipe.world.score", "score a model (+ LoRA) on the synthetic world's fixed prompts"),
    "world": ("cogpipe.world.cli", "the synthetic world demo: clips, tiny-model pretraining, frame strip"),
}
