"""`cogpipe convert SRC DST`: SAT <-> Diffusers, and any transformer -> ComfyUI core's native single file
(`--to comfyui`) and back; direction and model detected from the files."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Convert CogVideoX checkpoints between SAT and Diffusers: a SAT transformer folder or .pt, a SAT "
        "3d-vae.pt, a SAT LoRA, or a SAT folder with transformer/ and vae/ (-> full pipeline), and the reverse of "
        "each; with --to comfyui, any transformer (or a pipeline folder's) -> one .safetensors in ComfyUI core's "
        "native keys, and such a file -> a Diffusers transformer folder. The version (2B, 5B, 5B-I2V, 1.5-5B, "
        "1.5-5B-I2V) is detected from the tensors.")
    parser.add_argument("src", help="source checkpoint (file or folder)")
    parser.add_argument("dst", help="destination folder (or .safetensors file for a LoRA)")
    parser.add_argument("--to", choices=["diffusers", "sat", "comfyui"],
                        help="target format (default: SAT -> diffusers, diffusers -> sat, ComfyUI-native -> "
                             "diffusers); comfyui: DST is a .safetensors file or a folder to write "
                             "transformer_comfyui_core.safetensors in")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="cast floating tensors (default: keep)")
    parser.add_argument("--lora-mode", choices=["extract", "merge"], default="extract",
                        help="SAT transformer with LoRA layers: write base + dst/lora (extract) or fold it in")
    parser.add_argument("--text-encoder", metavar="PATH", help="T5 encoder folder (or pipeline folder) to copy in")
    parser.add_argument("--tokenizer", metavar="PATH", help="tokenizer folder (default: found beside --text-encoder)")
    parser.add_argument("--sat-lora-alpha", type=float, default=1.0,
                        help="SAT LoraMixin lora_alpha; SAT scales LoRA by alpha/rank (default 1)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    parser.add_argument("--set", action="append", default=[], metavar="PART.KEY=VALUE",
                        help="override a detected config value, e.g. transformer.sample_height=60 or "
                             "vae.scaling_factor=1.15258426 (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty destination")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line")


def _overrides(items: list[str]) -> dict[str, dict]:
    out = {"transformer": {}, "vae": {}}
    for item in items:
        key, sep, value = item.partition("=")
        part, _, name = key.partition(".")
        if not sep or part not in out or not name:
            raise SystemExit(f"--set {item!r}: expected transformer.KEY=VALUE or vae.KEY=VALUE")
        try:
            out[part][name] = json.loads(value)
        except json.JSONDecodeError:
            out[part][name] = value
    return out


def run(args: argparse.Namespace) -> int:
    from . import fastcopy

    sets = _overrides(args.set)
    readahead = fastcopy.start(args.src)  # the disk reads the source while torch is imported
    try:
        from ..weights import CheckpointError
        from .core import convert
        from .detect import ConversionError

        try:
            summary = convert(args.src, args.dst, to=args.to, dtype=args.dtype, lora_mode=args.lora_mode,
                              text_encoder=args.text_encoder, tokenizer=args.tokenizer,
                              transformer_config=sets["transformer"], vae_config=sets["vae"],
                              sat_lora_alpha=args.sat_lora_alpha, max_shard_size=args.max_shard_size,
                              overwrite=args.overwrite)
        except (ConversionError, CheckpointError) as e:
            print(f"cogpipe convert: error: {e}", file=sys.stderr)
            return 1
    finally:
        fastcopy.stop(readahead)
    print(json.dumps(summary.to_dict()) if args.json else summary)
    return 0
