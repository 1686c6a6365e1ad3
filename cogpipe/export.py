"""Export a training output folder: `<output_dir>/export/` (a Diffusers pipeline folder) and, for a
LoRA run, `<output_dir>/lora/pytorch_lora_weights.safetensors` in diffusers keys. With
`train.ema_decay > 0` the EMA of the trained weights is exported. Both folders are written atomically
(cogpipe.atomic); what an earlier, killed export left is swept first.

    cogpipe export <output_dir> [--checkpoint PATH]
"""

from __future__ import annotations

from pathlib import Path

from cogpipe import atomic, checkpoint, models
from cogpipe.config import load_config, save_config


def export(output_dir, from_checkpoint=None, log=print) -> Path:
    """Write export/ (and lora/) from a checkpoint, `latest` by default; returns the export folder."""
    out = Path(output_dir)
    for path in atomic.sweep(out):
        log(f"removed {path}, left by a killed write")
    ckpt = checkpoint.resolve(out, from_checkpoint or "latest")
    if ckpt is None:
        raise FileNotFoundError(f"{out}: no checkpoint to export (checkpoints/latest not found)")
    cfg = load_config(ckpt / "config.yaml", validate_model=False)
    ema = cfg.train.ema_decay > 0 and (ckpt / checkpoint.EMA).is_file()
    trainable = checkpoint.load_file(str(ckpt / (checkpoint.EMA if ema else checkpoint.TRAINABLE)))
    transformer = models.build_transformer(cfg.model)
    if cfg.train.mode == "lora":
        from cogpipe.lora import save_lora

        with atomic.folder(out / "lora") as tmp:
            save_lora(tmp, trainable, cfg.lora)
    else:
        missing, unexpected = transformer.load_state_dict(trainable, strict=False)
        if missing or unexpected:
            raise KeyError(f"{ckpt}: full fine-tune weights do not match the transformer: "
                           f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    pipe = models.build_pipeline(cfg.model, transformer=transformer)
    with atomic.folder(out / "export") as tmp:
        pipe.save_pretrained(tmp)
        save_config(cfg, tmp / "cogpipe_config.yaml")
    return out / "export"


def add_arguments(parser) -> None:
    parser.add_argument("output_dir", help="a training output folder (holds checkpoints/)")
    parser.add_argument("--checkpoint", default=None, help="checkpoint folder (default: checkpoints/latest)")


def run(args) -> int:
    path = export(args.output_dir, args.checkpoint)
    print(f"exported {path}" + (f" and {Path(args.output_dir) / 'lora'}" if (Path(args.output_dir) / "lora").exists()
                               else ""))
    return 0
