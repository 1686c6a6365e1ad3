"""The synthetic world demo, off the training path: clips of one coloured shape moving on a plain
background (render), a detector that scores generated videos against their prompts (score), and the
chain that pretrains the shipped tiny model on it from nothing (clips, vae, pretrain), plus the README's
frame strip (strip). Its commands: `cogpipe world --help`; its scorer: `cogpipe score`."""
