"""`cogpipe plan --config RECIPE [--gpu-memory GB] [key=value ...] [--json]`: the estimate as a table or JSON."""

from __future__ import annotations

import json
import sys

from cogpipe.config import ConfigError, add_recipe_arguments, load_config, validate_against_model

from .advice import fit_advice, with_changes
from .launchers import format_table, per_launcher
from .memory import estimate, needed_gb
from .model import GB, model_stats, resolve_model, stand_in_note
from .simulate import format_advice, format_simulation, per_rank, simulate, simulated_advice


def add_arguments(parser) -> None:
    add_recipe_arguments(parser, "configs/cogvideox_5b_lora.yaml")
    parser.add_argument("--gpu-memory", type=float, default=None, metavar="GB",
                        help="memory of one GPU in GB (1e9 bytes); default: this machine's GPU, if any")
    parser.add_argument("--json", action="store_true", help="print the estimate (and advice) as JSON")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs a machine, for the per-launcher table (default 8)")
    parser.add_argument("--simulate", action="store_true",
                        help="run the recipe's real step at real size on the meta device and measure it (about a "
                             "minute a run on 2 cores); with --gpu-memory, the low-VRAM switches that fit, measured")


def load(path, overrides=()):
    """(config, transformer config, note): the recipe, validated against the model's shapes (frames, size,
    channels); a hub id that cannot be read is checked and planned with its stand-in preset."""
    cfg = load_config(path, overrides, validate_model=False)
    transformer_config, preset = resolve_model(cfg.model)
    validate_against_model(cfg if preset is None else with_changes(cfg, "model", pretrained=None, preset=preset))
    return cfg, transformer_config, stand_in_note(cfg.model, preset)


def _fmt_table(e: dict, advice: dict | None) -> str:
    g, m, s = e["gb"], e["model"], e["shape"]
    lines = []
    name = f"CogVideoX{'1.5' if m['version'] == '1.5' else ''} {m['layers']} layers x {m['hidden']} hidden " \
           f"({m['params'] / 1e9:.2f} B parameters){', image-to-video' if m['i2v'] else ''}"
    lines.append(f"model        {name}")
    if m["note"]:
        lines.append(f"             note: {m['note']}")
    lines.append(f"clip         batch {s['batch']} x {s['frames']} frames x {s['height']}x{s['width']} -> latents "
                 f"{s['latent_frames']}x{s['latent_height']}x{s['latent_width']} -> {s['video_tokens']:,} video + "
                 f"{s['text_tokens']} text tokens")
    if e.get("sequence_parallel", 1) > 1:
        lines.append(f"sequence     parallel over {e['sequence_parallel']} GPUs: {e['tokens_per_gpu']:,} tokens a GPU "
                     f"(all text, 1/{e['sequence_parallel']} of the video)")
    train = (f"LoRA rank {e['lora_rank']} ({e['trainable_params'] / 1e6:.1f} M trainable), frozen weights "
             f"{e['weight_dtype']}" if e["mode"] == "lora" else f"full fine-tune ({e['trainable_params'] / 1e9:.2f} B "
             f"trainable, fp32 master weights)")
    lines.append(f"training     {train}, mixed precision {e['mixed_precision']}, gradient checkpointing "
                 f"{'on' if e['gradient_checkpointing'] else 'off'}")
    lines.append("")
    lines.append(f"{'GB (1e9 bytes), per GPU':46s} {'checkpointing':>13s} {'none':>9s}")
    rows = [
        ("weights (frozen, or fp32 master for full)", g["weights"], g["weights"]),
        ("trainable params (fp32)", g["trainable_params"], g["trainable_params"]),
        ("gradients (fp32)", g["grads"], g["grads"]),
        ("AdamW moments (fp32)", g["adam"], g["adam"]),
        ("EMA of the trained weights (fp32)", g["ema"], g["ema"]),
        ("autocast half-precision weight copies", g["autocast_weight_copies"], g["autocast_weight_copies"]),
        ("activations", g["activations_with_checkpointing"], g["activations_without_checkpointing"]),
        ("  checkpointed block inputs", g["checkpointed_inputs"], 0.0),
        ("  blocks kept for backward", g["activations_one_block"], g["activations_all_blocks"]),
        ("  outside the blocks", g["outside_blocks"], g["outside_blocks"]),
        ("  backward workspace", g["backward_workspace"], g["backward_workspace"]),
        ("VAE + T5 (cached away before training)", 0.0, 0.0),
        ("peak allocated (phases do not all overlap)", g["peak_with_checkpointing"], g["peak_without_checkpointing"]),
        ("needs (+ CUDA context and allocator slack)", needed_gb(g["peak_with_checkpointing"]),
         needed_gb(g["peak_without_checkpointing"])),
    ]
    for label, a, b in rows:
        lines.append(f"{label:46s} {a:13.2f} {b:9.2f}")
    lines.append(f"model FLOPs per step: {e['flops_per_step'] / 1e12:.1f} TFLOP (no recompute counted)")
    if advice:
        lines.append("")
        mem = advice["gpu_memory_gb"]
        if advice["fits"]:
            lines.append(f"fits in {mem:g} GB as configured (needs ~{advice['needs_gb']:.1f} GB with the CUDA context)")
        else:
            lines.append(f"does not fit in {mem:g} GB as configured (needs ~{advice['needs_gb']:.1f} GB); "
                         f"switches, cheapest first, applied one after another:")
            for st in advice["steps"]:
                mark = "fits" if st["fits"] else "    "
                lines.append(f"  {mark}  {st['switch']:40s} -> {st['needs_gb']:6.1f} GB   ({st['cost']})")
            if not advice["fits_after_steps"]:
                lines.append("  no single-GPU combination of these fits")
            lines.append("  the low-VRAM switches (train.activation_offload, train.blocks_to_swap, "
                         "model.quantize_frozen): --simulate --gpu-memory GB measures which fit")
            for u in advice["unavailable"]:
                saves = f" would save ~{u['saves_gb']:.1f} GB" if u["saves_gb"] is not None else ""
                lines.append(f"  (n/a)  {u['switch']}{saves} ({u['why']})")
        for strategy, s in advice["sharded"].items():
            cfgfile = f"configs/accelerate/{strategy}.yaml"
            lines.append(f"  or, the recipe{' + checkpointing' if not e['gradient_checkpointing'] else ''} on "
                         f"{s['num_gpus']} GPUs with {strategy} -> {s['needs_gb']:.1f} GB per GPU "
                         f"(accelerate launch --config_file {cfgfile} ...)")
    return "\n".join(lines)


def run(args) -> int:
    try:
        cfg, transformer_config, note = load(args.config, args.overrides)
    except (ConfigError, ValueError) as e:
        print(f"cogpipe plan: {e}", file=sys.stderr)
        return 2
    gpu = args.gpu_memory
    if gpu is None:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_properties(0).total_memory / GB
    if args.simulate:
        return _run_simulation(args, cfg, transformer_config, note, gpu)
    e = estimate(cfg, transformer_config=transformer_config)
    e["model"]["note"] = note
    advice = fit_advice(cfg, gpu, transformer_config=transformer_config) if gpu else None
    launchers = per_launcher(cfg, transformer_config, args.gpus)
    if args.json:
        print(json.dumps(dict(config=str(args.config), estimate=e, advice=advice, launchers=launchers)))
    else:
        print(f"cogpipe plan: {args.config}")
        print(_fmt_table(e, advice))
        print()
        print(format_table(launchers, args.gpus))
    return 0


def _run_simulation(args, cfg, transformer_config, note, gpu) -> int:
    sim = simulate(cfg, transformer_config)
    sim["note"] = note
    block = model_stats(transformer_config)["block_params"] * (4 if cfg.train.mode == "full" else 2) / 2 ** 30
    sim["per_rank"] = [per_rank(sim, s, args.gpus, block) for s in ("zero2", "zero3", "fsdp")]
    advice = None
    if gpu:
        log = None if args.json else (lambda step: print(f"  simulated {step['switch']}: {step['needs_gb']} GB",
                                                         file=sys.stderr, flush=True))
        advice = simulated_advice(cfg, transformer_config, gpu, log=log)
    if args.json:
        print(json.dumps(dict(sim, config=str(args.config), advice=advice)))
    else:
        print(f"cogpipe plan --simulate: {args.config}" + (f" ({note})" if note else ""))
        print(format_simulation(sim, sim["per_rank"]))
        if advice:
            print(format_advice(advice))
    return 0
