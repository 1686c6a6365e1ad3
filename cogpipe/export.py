"""Export a training output folder: `<output_dir>/export/` (a Diffusers pipeline folder) and, for a LoRA run,
`<output_dir>/lora/pytorch_lora_weights.safetensors` in diffusers keys, with its ComfyUI and SAT forms and a model
card beside it (cogpipe.modelcard). A full fine-tune's export also holds its transformer as one file in ComfyUI core's
native keys, `export/comfyui/<run>_comfyui_core.safetensors` (cogpipe.convert, `--to comfyui`). With
`train.ema_decay > 0` the EMA of the trained weights is exported.

On a pretrained base (a folder or hub id) the pipeline folder is the base's own files, hard-linked where the
file system allows it, else copied: the same bytes, dtype and tokenizer files (a hub SentencePiece tokenizer
keeps its spiece.model), plus what training changed: the transformer of a full fine-tune (its fp32 weights as
trained). A LoRA run with `export.copy_base: false` writes no pipeline folder: the LoRA alone is the output.
Built presets (no base to copy) are saved whole, the frozen base in model.weight_dtype. Both folders are
written atomically (cogpipe.atomic); what an earlier, killed export left is swept first.

    cogpipe export <output_dir> [--checkpoint PATH] [--overwrite]

The command writes `export/` and `lora/` where the run has none; beside a run's own (what its end wrote), it writes
`export-<checkpoint>/` and `lora-<checkpoint>/` (e.g. `export-checkpoint-000100/`), and it replaces nothing unless
told `--overwrite` (then `export/` and `lora/` are rewritten from the checkpoint, as the end of a run does).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from cogpipe import atomic, checkpoint, modelcard, models, paths
from cogpipe.config import load_config, save_config
from cogpipe.convert import ConversionError, convert
from cogpipe.lora import save_lora

COMFYUI_MODEL = "comfyui/{run}_comfyui_core.safetensors"  # a full fine-tune for ComfyUI core, inside export/


def export(output_dir, from_checkpoint=None, log=print, suffix: str = "") -> Path | None:
    """Write export/ (and lora/) from a checkpoint, `latest` by default; returns the export folder (None when
    export.copy_base is off for a LoRA on a pretrained base: then only lora/ is written). With `suffix` the folders
    are export<suffix>/ and lora<suffix>/."""
    out = Path(output_dir)
    for path in atomic.sweep(out):
        log(f"removed {path}, left by a killed write")
    ckpt = checkpoint.resolve(out, from_checkpoint or "latest")
    if ckpt is None:
        raise FileNotFoundError(f"{out}: no checkpoint to export (checkpoints/latest not found)")
    cfg = load_config(ckpt / "config.yaml", validate_model=False)
    ema = cfg.train.ema_decay > 0 and (ckpt / checkpoint.EMA).is_file()
    trainable = checkpoint.load_file(str(ckpt / (checkpoint.EMA if ema else checkpoint.TRAINABLE)))
    lora = cfg.train.mode == "lora"
    if lora:
        step = int(ckpt.name.rsplit("-", 1)[-1]) if ckpt.name.rsplit("-", 1)[-1].isdigit() else cfg.train.max_steps
        videos = sorted((out / "validation").glob(f"step-{step:06d}-*.mp4"))
        with atomic.folder(out / f"lora{suffix}") as tmp:
            save_lora(tmp, trainable, cfg.lora)
            notes = modelcard.write_formats(tmp, out.resolve().name)
            modelcard.write_card(tmp, cfg, step, videos, notes)
        if cfg.model.pretrained and not cfg.export.copy_base:
            return None
    transformer = None
    if not lora:
        transformer = models.build_transformer(cfg.model, torch.float32)  # the fp32 master weights trained
        missing, unexpected = transformer.load_state_dict(trainable, strict=False)
        parameters = {n for n, _ in transformer.named_parameters()}
        missing = [k for k in missing if k in parameters]  # buffers (5B-I2V's position table) keep the base's
        if missing or unexpected:
            raise KeyError(f"{ckpt}: full fine-tune weights do not match the transformer: "
                           f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    with atomic.folder(out / f"export{suffix}") as tmp:
        if cfg.model.pretrained:
            base = models.pretrained_folder(cfg.model.pretrained)
            paths.link_or_copy_tree(base, tmp)
            if transformer is not None:
                shutil.rmtree(tmp / "transformer")
                transformer.save_pretrained(tmp / "transformer")
        else:
            dtype = models.DTYPES[cfg.model.weight_dtype] if lora else torch.float32
            models.build_pipeline(cfg.model, dtype, transformer=transformer).save_pretrained(tmp)
        if transformer is not None:  # the same weights as one file in ComfyUI core's own names
            try:
                summary = convert(tmp / "transformer", tmp / COMFYUI_MODEL.format(run=out.resolve().name),
                                  to="comfyui")
                for note in summary.notes:
                    log(f"{COMFYUI_MODEL.format(run='<run>')}: {note}")
            except ConversionError as e:
                log(f"no ComfyUI-native transformer: {e}")
        save_config(cfg, tmp / "cogpipe_config.yaml")
    return out / f"export{suffix}"


def add_arguments(parser) -> None:
    parser.add_argument("output_dir", help="a training output folder (holds checkpoints/)")
    parser.add_argument("--checkpoint", default=None, help="checkpoint folder (default: checkpoints/latest)")
    parser.add_argument("--overwrite", action="store_true",
                        help="rewrite export/ and lora/ in place (default: a run that has them gets "
                             "export-<checkpoint>/ and lora-<checkpoint>/ beside them, and nothing is replaced)")


def run(args) -> int:
    out = Path(args.output_dir)
    try:
        ckpt = checkpoint.resolve(out, args.checkpoint or "latest")
    except FileNotFoundError as e:
        ckpt, problem = None, f"--checkpoint {args.checkpoint}: {str(e).split(': ', 1)[-1]}"
    else:
        problem = f"{out}: no checkpoint to export (checkpoints/latest not found)"
    if ckpt is None:
        print(f"cogpipe export: error: {problem}", file=sys.stderr)
        return 2
    suffix = ""
    if not args.overwrite and ((out / "export").exists() or (out / "lora").exists()):
        suffix = f"-{ckpt.name}"
        taken = [str(out / f"{name}{suffix}") for name in ("export", "lora") if (out / f"{name}{suffix}").exists()]
        if taken:
            print(f"cogpipe export: error: {' and '.join(taken)} already exist (an export of {ckpt.name}): nothing "
                  f"written; remove them, or pass --overwrite to rewrite {out / 'export'} and {out / 'lora'} from "
                  f"{ckpt.name}", file=sys.stderr)
            return 2
    path = export(out, ckpt, suffix=suffix)
    lora = out / f"lora{suffix}"
    wrote = [f"the pipeline folder {path}" if path else None,
             f"the LoRA {lora} (diffusers keys; comfyui/, sat/ and its model card beside)" if lora.exists() else None]
    print(f"exported {ckpt.name}: " + " and ".join(w for w in wrote if w))
    return 0
