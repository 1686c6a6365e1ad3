"""The exported LoRA's other formats and its model card (README.md beside it).

    lora/pytorch_lora_weights.safetensors        diffusers keys, rank/alpha in the metadata (cogpipe.lora.save_lora)
    lora/comfyui/<run>_comfyui_core.safetensors      ComfyUI core's own names (its LoraLoader), alpha per module
    lora/comfyui/<run>_comfyui_wrapper.safetensors   ComfyUI-CogVideoXWrapper's keys (Diffusers names), alpha too
    lora/sat/latest, lora/sat/1/mp_rank_00_...   SAT lora2 keys, for SAT's default lora_alpha 1
    lora/README.md, lora/validation_strip.png    the card: base model, prompts, rank and alpha, steps, frames

Formats: cogpipe/lora_formats.py and docs/lora_formats.md.
"""

from __future__ import annotations

from pathlib import Path

from cogpipe import atomic
from cogpipe.convert import ConversionError
from cogpipe.family import LORA_FILE
from cogpipe.lora_formats import comfyui_native_state_dict, comfyui_state_dict, read_lora, write_sat
from cogpipe.video import read_video, strip

STRIP = "validation_strip.png"
CORE_LORA = "{run}_comfyui_core.safetensors"  # for ComfyUI core's LoraLoader (its own CogVideoX port's names)
WRAPPER_LORA = "{run}_comfyui_wrapper.safetensors"  # for kijai's ComfyUI-CogVideoXWrapper


def write_formats(folder: Path, run_name: str) -> list[str]:
    """Write the ComfyUI and SAT forms of folder/LORA_FILE; returns notes for the card (a form that cannot hold this
    LoRA, e.g. SAT's attention-only lora2, is left out and said so)."""
    from safetensors.torch import save_file

    lora = read_lora(folder / LORA_FILE)
    meta = {"format": "pt", "ss_network_dim": str(lora.config["r"]), "ss_network_alpha": str(lora.config["lora_alpha"])}
    (folder / "comfyui").mkdir(parents=True, exist_ok=True)
    notes = []
    for name, form in ((WRAPPER_LORA, comfyui_state_dict), (CORE_LORA, comfyui_native_state_dict)):
        try:
            tensors = form(lora)
        except ValueError as e:
            notes.append(f"no {name.format(run='<run>')}: {e}")
            continue
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "comfyui" / name.format(run=run_name)),
                  metadata=meta)
    try:
        write_sat(folder / LORA_FILE, folder / "sat")
    except ConversionError as e:
        notes.append(f"no SAT form: {e}")
    return notes


def _strip(videos: list[Path]) -> "object | None":
    frames = [read_video(v) for v in videos]
    if not frames:
        return None
    step = max(1, len(frames[0]) // 8)  # about 8 frames a row
    return strip([f[::step] for f in frames], scale=1 if frames[0].shape[1] >= 256 else 2)


def write_card(folder: Path, cfg, step: int, videos: list[Path] = (), notes: list[str] = ()) -> Path:
    """README.md beside the LoRA (and validation_strip.png from `videos`, every few frames of each, a row each)."""
    import io

    folder = Path(folder)
    prompts = list(cfg.validation.prompts) or [Path(v).with_suffix(".txt").read_text().strip() for v in videos
                                               if Path(v).with_suffix(".txt").is_file()]
    image = _strip(list(videos)) if videos else None
    if image is not None:
        import imageio

        buffer = io.BytesIO()
        imageio.imwrite(buffer, image, format="png")
        atomic.write_bytes(folder / STRIP, buffer.getvalue())
    base = cfg.model.pretrained or f"a random `{cfg.model.preset}` preset (model.preset)"
    rank, alpha = cfg.lora.rank, cfg.lora.alpha
    core = next(iter(sorted((folder / "comfyui").glob(CORE_LORA.format(run="*")))), None)
    wrapper = next(iter(sorted((folder / "comfyui").glob(WRAPPER_LORA.format(run="*")))), None)
    lines = [
        "---", "library_name: diffusers", "tags: [cogvideox, lora, cogpipe]", f"base_model: {base}", "---", "",
        f"# LoRA for {base}", "",
        "Trained with cogpipe (`train.py`); the recipe is `cogpipe_config.yaml` of the export, or the run's "
        "`config.yaml`.", "",
        "| | |", "|---|---|",
        f"| base model | {base} |",
        f"| trigger / validation prompts | {'; '.join(prompts) or '(none)'} |",
        f"| rank / alpha | {rank} / {alpha:g} (scale alpha/rank = {alpha / rank:g}) |",
        f"| target modules | {', '.join(cfg.lora.target_modules)} |",
        f"| steps | {step} (batch {cfg.train.batch_size} x {cfg.train.grad_accum} accumulation, lr {cfg.train.lr:g}) |",
        f"| clip | {cfg.data.frames} frames at {cfg.data.height}x{cfg.data.width} |", "",
        "## Files", "",
        f"- `{LORA_FILE}`: diffusers keys, rank and alpha in its metadata",
    ]
    if core is not None:
        lines.append(f"- `comfyui/{core.name}`: for ComfyUI core (its own CogVideoX model, \"Load Diffusion Model\"): "
                     f"put it in `ComfyUI/models/loras/` and load it with `LoraLoaderModelOnly` (keys "
                     f"`diffusion_model.blocks.N.q…lora_down/lora_up/alpha`, the port's names)")
    if wrapper is not None:
        lines.append(f"- `comfyui/{wrapper.name}`: for kijai's ComfyUI-CogVideoXWrapper (its LoRA select node; keys "
                     f"`lora_unet_transformer_blocks_N_attn1_to_q…`, Diffusers names); ComfyUI core does not read "
                     f"these")
    if (folder / "sat" / "latest").is_file():
        lines.append(f"- `sat/`: SAT lora2 keys (`matrix_A`/`matrix_B`); SAT applies them with `LoraMixin(r={rank}, "
                     f"lora_alpha=1)`, its default")
    lines += [f"- note: {n}" for n in notes]
    lines += ["", "## Use", "", "```python",
              "from diffusers import CogVideoXPipeline  # or CogVideoXImageToVideoPipeline",
              f"pipe = CogVideoXPipeline.from_pretrained(\"{cfg.model.pretrained or 'path/to/the/run/export'}\")",
              f"pipe.load_lora_weights(\"path/to/this/folder\", weight_name=\"{LORA_FILE}\")", "```", "",
              "or `python infer.py --model BASE --lora path/to/this/folder --prompt \"...\"` (any of these "
              "files works with `--lora`).", ""]
    if image is not None:
        lines += ["## Validation", "", f"Generated at step {step} (rows: the prompts above, every few frames):", "",
                  f"![validation frames]({STRIP})", ""]
    return atomic.write_text(folder / "README.md", "\n".join(lines))
