"""Export a training output folder: `<output_dir>/export/` (a Diffusers pipeline folder) and, for a
LoRA run, `<output_dir>/lora/pytorch_lora_weights.safetensors` in diffusers keys.

    cogpipe export <output_dir> [--checkpoint PATH]
"""

from __future__ import annotations

import shutil
from pathlib import Path

from cogpipe import checkpoint, models
from cogpipe.config import load_config, save_config


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def export(output_dir, from_checkpoint=None) -> Path:
    """Write export/ (and lora/) from a checkpoint, `latest` by default; returns the export folder."""
    out = Path(output_dir)
    ckpt = checkpoint.resolve(out, from_checkpoint or "latest")
    if ckpt is None:
        raise FileNotFoundError(f"{out}: no checkpoint to export (checkpoints/latest not found)")
    cfg = load_config(ckpt / "config.yaml", validate_model=False)
    trainable = checkpoint.load_file(str(ckpt / checkpoint.TRAINABLE))
    transformer = models.build_transformer(cfg.model)
    if cfg.train.mode == "lora":
        from cogpipe.lora import save_lora

        tmp = out / ".lora.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_lora(tmp, trainable, cfg.lora)
        _replace_dir(tmp, out / "lora")
    else:
        missing, unexpected = transformer.load_state_dict(trainable, strict=False)
        if missing or unexpected:
            raise KeyError(f"{ckpt}: full fine-tune weights do not match the transformer: "
                           f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    pipe = models.build_pipeline(cfg.model, transformer=transformer)
    tmp = out / ".export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    save_config(cfg, tmp / "cogpipe_config.yaml")
    _replace_dir(tmp, out / "export")
    return out / "export"


def validation_inputs(cfg, prompts=None) -> list[tuple[str, object]]:
    """(prompt, first-frame PIL image or None) pairs; defaults from the dataset's first clip."""
    from cogpipe.data import load_clip, scan

    samples = scan(cfg.data.root)[0]
    prompts = prompts or cfg.validation.prompts or [samples[0].caption]
    tcfg, vcfg = models.component_configs(cfg.model)
    if not models.model_facts(tcfg, vcfg)["i2v"]:
        return [(p, None) for p in prompts]
    from PIL import Image

    if cfg.validation.images:
        images = [Image.open(path).convert("RGB") for path in cfg.validation.images]
    else:  # the first frame of the first clip, as training sees it
        frame = load_clip(samples[0].video, cfg.data.frames, cfg.data.height, cfg.data.width)[0]
        images = [Image.fromarray(((frame.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())]
    return [(p, images[i % len(images)]) for i, p in enumerate(prompts)]


def render_validation(output_dir, cfg, step: int, prompts=None) -> list[Path]:
    """Generate the validation prompts (and first frames, for image-to-video) from the exported
    pipeline + LoRA, as a user would load them; write mp4s under <output_dir>/validation/."""
    from cogpipe.inference import generate, load_pipeline
    from cogpipe.video import write_mp4

    out = Path(output_dir)
    lora = out / "lora" if cfg.train.mode == "lora" else None
    pipe = load_pipeline(out / "export", lora)
    written = []
    for i, (prompt, image) in enumerate(validation_inputs(cfg, prompts)):
        frames = generate(pipe, prompt, cfg.data.frames, cfg.data.height, cfg.data.width, cfg.validation.steps,
                          cfg.validation.guidance, cfg.validation.seed, image=image)
        stem = out / "validation" / f"step-{step:06d}-{i}"
        written.append(write_mp4(frames, stem.with_suffix(".mp4"), fps=cfg.validation.fps))
        stem.with_suffix(".txt").write_text(prompt + "\n")
        if image is not None:
            image.save(stem.with_suffix(".png"))
    return written


def add_arguments(parser) -> None:
    parser.add_argument("output_dir", help="a training output folder (holds checkpoints/)")
    parser.add_argument("--checkpoint", default=None, help="checkpoint folder (default: checkpoints/latest)")


def run(args) -> int:
    path = export(args.output_dir, args.checkpoint)
    print(f"exported {path}" + (f" and {Path(args.output_dir) / 'lora'}" if (Path(args.output_dir) / "lora").exists()
                               else ""))
    return 0
