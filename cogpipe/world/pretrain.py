"""Pretrain the shipped tiny CogVideoX (models/tiny-world) from nothing, on the synthetic world.

    cogpipe world pretrain [--work outputs/pretrain] [--ship models/tiny-world] [--clips 1000]

Runs the whole chain, each stage a command of its own (printed, timed, and recorded in
<work>/stages.json; the model card quotes them):

  1. world clips    cogpipe world clips --out <work>/world --n N --seed 0   (the palette; never purple)
  2. VAE            cogpipe world train-vae --config configs/world/tiny_world_vae.yaml
  3. assemble       cogpipe world assemble --vae <work>/vae/vae --out <work>/init
                    a Diffusers pipeline folder: ByT5 tokenizer, a fixed n-gram T5 text encoder (below),
                    the trained VAE, a randomly initialised CogVideoXTransformer3DModel of the `tiny-world`
                    preset (cogpipe/family.py) and the CogVideoX DDIM scheduler
  4. transformer    accelerate launch --num_cpu_threads_per_process 2 train.py \
                        --config configs/world/tiny_world_dit.yaml
                    (train.mode: full, from scratch, on VAE latents; model.pretrained: <work>/init)
  5. ship           cogpipe world ship --export <work>/dit/export --out models/tiny-world

The text encoder is a T5EncoderModel whose weights are set, not trained: byte embeddings (ByT5 ids) plus, in
one attention layer whose relative-position bias makes head h look only at the byte h places away (h = -7..7,
h != 0; near the ends of the text, where that byte does not exist, the byte itself), a random projection of
each neighbour. Every byte's output so describes the 15-byte window around it,
so words ("yellow", "triangle") are readable from single tokens, which a tiny transformer trained for minutes
needs: a randomly initialised T5 mixes bytes without order, and the CogVideoX transformer adds no positions
to text tokens.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from cogpipe import models
from cogpipe.config import ModelConfig
from cogpipe.paths import repo_path

NGRAM_OFFSETS = [k for k in range(-7, 8) if k != 0]  # neighbours each byte sees (T5's exact position buckets)


def ngram_text_encoder(d_model: int = 64, d_kv: int = 8, seed: int = 0):
    """A fixed (untrained) T5EncoderModel: each token's output = its byte + its neighbours at NGRAM_OFFSETS."""
    from transformers import T5Config, T5EncoderModel

    heads = len(NGRAM_OFFSETS)
    cfg = T5Config(d_model=d_model, d_kv=d_kv, d_ff=d_model, num_layers=1, num_heads=heads,
                   relative_attention_num_buckets=32, relative_attention_max_distance=64, vocab_size=384,
                   dropout_rate=0.0)
    model = T5EncoderModel(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    attn = model.encoder.block[0].layer[0].SelfAttention
    ff = model.encoder.block[0].layer[1].DenseReluDense
    half = cfg.relative_attention_num_buckets // 2  # bidirectional: buckets [0, half) look back, [half, 2 half) ahead
    with torch.no_grad():
        model.shared.weight.copy_(torch.randn(cfg.vocab_size, d_model, generator=g))
        attn.q.weight.zero_()  # no content attention: where a head looks is set by position alone
        attn.k.weight.zero_()
        attn.v.weight.copy_(torch.randn(heads * d_kv, d_model, generator=g) / d_model**0.5)
        attn.o.weight.copy_(torch.randn(d_model, heads * d_kv, generator=g) / d_kv**0.5)
        bias = torch.zeros(cfg.relative_attention_num_buckets, heads)  # (bucket, head)
        bias[0, :] = 15.0  # each head falls back on the token itself where i + offset is outside the text
        for h, offset in enumerate(NGRAM_OFFSETS):
            bias[abs(offset) + (half if offset > 0 else 0), h] = 30.0  # head h attends to token i + offset
        attn.relative_attention_bias.weight.copy_(bias)
        ff.wi.weight.zero_()
        ff.wo.weight.zero_()  # the feed-forward block adds nothing
    return model


def assemble(vae_dir, out, preset: str = "tiny-world", seed: int = 0) -> Path:
    """The initial pipeline folder that stage 4 trains: tokenizer, text encoder, trained VAE, random DiT."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline
    from transformers import ByT5Tokenizer

    model_cfg = ModelConfig(preset=preset, init_seed=seed)
    pipe = CogVideoXPipeline(tokenizer=ByT5Tokenizer(), text_encoder=ngram_text_encoder(seed=seed),
                             vae=AutoencoderKLCogVideoX.from_pretrained(str(vae_dir)),
                             transformer=models.build_transformer(model_cfg, torch.float32),
                             scheduler=models.build_scheduler(model_cfg))
    text_dim = pipe.text_encoder.config.d_model
    if pipe.transformer.config.text_embed_dim != text_dim:
        raise ValueError(f"preset {preset}: text_embed_dim {pipe.transformer.config.text_embed_dim} "
                         f"!= T5 d_model {text_dim}")
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    pipe.save_pretrained(out)
    return out


def ship(export, out) -> Path:
    """Copy a trained export folder into the repo (models/tiny-world), weights only: the model card stays."""
    export, out = Path(export), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        shutil.rmtree(out / sub, ignore_errors=True)
        shutil.copytree(export / sub, out / sub)
    shutil.copy2(export / "model_index.json", out / "model_index.json")
    if (export / "cogpipe_config.yaml").exists():
        shutil.copy2(export / "cogpipe_config.yaml", out / "cogpipe_config.yaml")
    return out


def _stage(name: str, cmd: list[str], record: dict) -> None:
    print(f"\n== {name}: {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=repo_path(".", "--work from a clone of the repository"), check=True)
    record[name] = {"command": shlex.join(cmd), "minutes": round((time.perf_counter() - start) / 60, 2)}
    print(f"== {name}: {record[name]['minutes']} min", flush=True)


def run_chain(work: str, ship_to: str | None, clips: int, vae_args=(), dit_args=()) -> dict:
    py = sys.executable
    w = Path(work)
    record: dict = {}
    world = [py, "-m", "cogpipe.world"]
    _stage("world", [*world, "clips", "--out", f"{w}/world", "--n", str(clips), "--seed", "0"], record)
    _stage("vae", [*world, "train-vae", "--config", "configs/world/tiny_world_vae.yaml",
                   f"output_dir={w}/vae", f"data.root={w}/world", *vae_args], record)
    _stage("assemble", [*world, "assemble", "--vae", f"{w}/vae/vae",
                        "--out", f"{w}/init"], record)
    _stage("transformer", [str(Path(py).with_name("accelerate")), "launch", "--num_processes", "1",
                           "--num_cpu_threads_per_process", str(torch.get_num_threads()),  # accelerate's default: 1
                           "train.py", "--config", "configs/world/tiny_world_dit.yaml",
                           f"output_dir={w}/dit", f"model.pretrained={w}/init", f"data.root={w}/world",
                           *dit_args], record)
    if ship_to:
        _stage("ship", [*world, "ship", "--export", f"{w}/dit/export",
                        "--out", ship_to], record)
    (w / "stages.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def add_assemble_arguments(parser) -> None:
    parser.add_argument("--vae", required=True, help="the trained VAE folder (stage 2's <output_dir>/vae)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", default="tiny-world")
    parser.add_argument("--seed", type=int, default=0)


def run_assemble(args) -> int:
    print(f"assembled {assemble(args.vae, args.out, args.preset, args.seed)}")
    return 0


def add_ship_arguments(parser) -> None:
    parser.add_argument("--export", required=True, help="stage 4's export folder")
    parser.add_argument("--out", required=True, help="e.g. models/tiny-world")


def run_ship(args) -> int:
    print(f"shipped {ship(args.export, args.out)}")
    return 0


def add_chain_arguments(parser) -> None:
    parser.add_argument("--work", default="outputs/pretrain", help="where clips, runs and stages.json go")
    parser.add_argument("--ship", default=None, help="copy the result here (e.g. models/tiny-world)")
    parser.add_argument("--clips", type=int, default=1000)
    parser.add_argument("--vae-arg", action="append", default=[], help="key=value for the VAE stage")
    parser.add_argument("--dit-arg", action="append", default=[], help="key=value for the transformer stage")


def run_chain_command(args) -> int:
    print(json.dumps(run_chain(args.work, args.ship, args.clips, args.vae_arg, args.dit_arg), indent=2))
    return 0
