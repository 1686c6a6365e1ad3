"""Validation videos: during training (every `validation.every` steps, with the weights being
trained) and after it (from the exported pipeline + LoRA, as a user loads them).

During training every process renders its share of the prompts with the model in memory, from
cached prompt embeddings (T5 stays out of memory) and a VAE loaded only for decoding (sliced, and
tiled with `model.vae_tiling`), so validation stays under the training step's peak; the processes then meet at a
barrier, each having done about the same work.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cogpipe import modelcard, models, sequence_parallel
from cogpipe.data.folders import load_clip, scan
from cogpipe.devices import compute_dtype
from cogpipe.inference import generate, load_pipeline
from cogpipe.inference.pipeline import set_scheduler
from cogpipe.video import write_mp4


def validation_inputs(cfg, prompts=None) -> list[tuple[str, object]]:
    """(prompt, first-frame PIL image or None) pairs: `prompts`, else validation.prompts, else, only where the
    recipe asks for validation during training (validation.every), the dataset's first caption; [] when none."""
    samples = scan(cfg.data.root)[0] if cfg.data.root else []  # a latent store holds no clips to show
    prompts = prompts or cfg.validation.prompts or ([samples[0].caption] if cfg.validation.every and samples else [])
    if not prompts:
        return []
    transformer_config, vcfg = models.component_configs(cfg.model)
    if not models.model_facts(transformer_config, vcfg)["i2v"]:
        return [(p, None) for p in prompts]
    from PIL import Image

    if cfg.validation.images:
        images = [Image.open(path).convert("RGB") for path in cfg.validation.images]
    else:  # the first frame of the first clip, as training sees it
        if not samples:
            raise ValueError("validation.images: an image-to-video recipe trained from data.store (no clips) needs "
                             "the validation first frames given")
        frame = load_clip(samples[0].video, cfg.data.frames, cfg.data.height, cfg.data.width)[0]
        images = [Image.fromarray(((frame.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())]
    return [(p, images[i % len(images)]) for i, p in enumerate(prompts)]


def _write(out: Path, step: int, i: int, frames, prompt: str, image, fps: int) -> Path:
    stem = out / "validation" / f"step-{step:06d}-{i}"
    path = write_mp4(frames, stem.with_suffix(".mp4"), fps=fps)
    stem.with_suffix(".txt").write_text(prompt + "\n")
    if image is not None:
        image.save(stem.with_suffix(".png"))
    return path


@torch.no_grad()
def validate_in_training(cfg, transformer, step: int, rank: int, world: int, device, embeds: dict,
                         write: bool = True) -> list[Path]:
    """Render this process's share of the validation prompts with `transformer` (unwrapped, LoRA
    active) and `embeds` {prompt: prompt_embeds [L, D]} from the cache (with "" for the negative).
    Under sequence parallel, rank and world are the data-parallel ones: the ranks of an SP group render the same
    videos together (the transformer carries the SP attention) and only the one with `write` writes them.

    The prompt list is padded to a multiple of `world` (repeating prompts, whose videos are not written), so every
    process runs the same number of denoising passes: under ZeRO-3 each forward gathers weight shards with
    collectives that every process must join."""
    inputs = validation_inputs(cfg)
    if not inputs:
        return []
    padded = -(-len(inputs) // world) * world
    mine = [(i, inputs[i % len(inputs)]) for i in range(rank, padded, world)]  # i >= len(inputs): a pad
    dtype = compute_dtype(cfg.train.mixed_precision, models.DTYPES[cfg.model.weight_dtype], cfg.train.mode)
    vae = models.build_vae(cfg.model, dtype, device).to(device)
    vae.enable_slicing()
    if cfg.model.vae_tiling:
        vae.enable_tiling()
    cls = models.pipeline_class(dict(transformer.config))
    pipe = cls(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
               scheduler=models.build_scheduler(cfg.model))
    set_scheduler(pipe, "auto", dict(transformer.config))  # the sampler infer.py uses for this model
    pipe.set_progress_bar_config(disable=True)
    was_training = transformer.training
    transformer.eval()
    written = []
    try:
        for i, (prompt, image) in mine:  # fp32 master weights (full fine-tune) compute in the autocast dtype
            with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
                frames = generate(pipe, prompt, cfg.data.frames, cfg.data.height, cfg.data.width,
                                  cfg.validation.steps, cfg.validation.guidance, cfg.validation.seed, image=image,
                                  prompt_embeds=embeds[prompt][None].to(device, dtype),
                                  negative_prompt_embeds=embeds[""][None].to(device, dtype))
            if i < len(inputs) and write:
                written.append(_write(Path(cfg.output_dir), step, i, frames, prompt, image, cfg.validation.fps))
    finally:
        transformer.train(was_training)
        del pipe, vae
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return written


def render_validation(output_dir, cfg, step: int, prompts=None, device=None, dtype=None,
                      sequence_group=None) -> list[Path]:
    """Generate the validation prompts (and first frames, for image-to-video) from the exported
    pipeline + LoRA, as a user would load them, on `device` in `dtype` (the training run's: see
    cogpipe.devices); write mp4s under <output_dir>/validation/. Nothing when there are no prompts.
    With `sequence_group` every rank of that group calls this, each video runs across the group, and its first
    rank writes."""
    inputs = validation_inputs(cfg, prompts)
    if not inputs:
        return []
    out = Path(output_dir)
    lora = out / "lora" if cfg.train.mode == "lora" else None
    model = out / "export" if (out / "export").is_dir() else cfg.model.pretrained  # export.copy_base: false
    pipe = load_pipeline(model, lora, device=device, dtype=dtype, vae_tiling=True if cfg.model.vae_tiling else None)
    pipe.vae.enable_slicing()
    if sequence_group is not None:
        sequence_parallel.enable(pipe.transformer, sequence_group)
    writer = sequence_group is None or torch.distributed.get_rank(sequence_group) == 0
    written = []
    for i, (prompt, image) in enumerate(inputs):
        frames = generate(pipe, prompt, cfg.data.frames, cfg.data.height, cfg.data.width, cfg.validation.steps,
                          cfg.validation.guidance, cfg.validation.seed, image=image)
        if writer:
            written.append(_write(out, step, i, frames, prompt, image, cfg.validation.fps))
    del pipe
    if not writer:
        return []
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if lora is not None and (lora / "README.md").is_file():  # the model card shows what was rendered
        modelcard.write_card(lora, cfg, step, written, _card_notes(lora))
    return written


def _card_notes(lora: Path) -> list[str]:
    text = (lora / "README.md").read_text()
    return [line[len("- note: "):] for line in text.splitlines() if line.startswith("- note: ")]
