"""Bytes each rank exchanges per training step under train.sequence_parallel (Ulysses), analytic and counted.

    python bench/sequence_parallel.py [--out bench/results/sequence_parallel_cpu.json]

Analytic (cogpipe.sequence_parallel.exchanged_bytes): the released models at their training clips, bf16, batch 1,
gradient checkpointing on (the recipes' setting: the recomputed forward exchanges again), every SP size up to 8
that divides the heads: the bytes
one rank sends in a step (forward + recompute + backward), and the time that takes at a link speed (NVLink 4 on an
H100/H200 node: about 450 GB/s each way a GPU, all-to-all over NVSwitch; bandwidth only, no latency).
Counted: a scaled-down 1.5 model (8 heads, 2 layers) runs one forward and backward on 2 and 4 CPU processes (gloo,
launched here with torch.distributed.run); the bytes its collectives sent (counted in cogpipe/sequence_parallel.py)
must equal the analytic count for the same shapes, and the step's output gradient the one process's (checked by
tests/test_sequence_parallel.py, not here). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from common import emit  # noqa: E402

NVLINK_GBPS = 450.0
CLIPS = {"2b": (49, 480, 720), "5b": (49, 480, 720), "1.5-5b": (81, 768, 1360), "1.5-5b@161": (161, 768, 1360)}
SMALL = dict(num_attention_heads=8, attention_head_dim=16, num_layers=2, time_embed_dim=16, text_embed_dim=32,
             max_text_seq_length=16, in_channels=16, out_channels=16, patch_size_t=2, patch_bias=False,
             sample_height=16, sample_width=16, sample_frames=17, use_rotary_positional_embeddings=True)
SMALL_LATENTS = (6, 16, 16)  # latent frames, height, width: 3 x 8 x 8 = 192 video tokens


def analytic() -> list[dict]:
    from cogpipe.config import ModelConfig
    from cogpipe.plan.model import resolve_transformer_config, token_shape
    from cogpipe.sequence_parallel import exchanged_bytes, valid_sizes

    rows = []
    for name, (frames, h, w) in CLIPS.items():
        cfg = resolve_transformer_config(ModelConfig(preset=name.split("@")[0]))[0]
        shape = token_shape(cfg, frames, h, w)
        for sp in valid_sizes(cfg["num_attention_heads"]):
            b = exchanged_bytes(cfg, shape["video_tokens"], shape["text_tokens"], batch=1, sp=sp, element_size=2,
                                checkpointing=True)
            rows.append(dict(model=name, frames=frames, height=h, width=w, video_tokens=shape["video_tokens"], sp=sp,
                             gb_per_rank_step=b["step"] / 1e9, gb_forward=b["forward"] / 1e9,
                             seconds_at_nvlink=b["step"] / (NVLINK_GBPS * 1e9)))
    return rows


def worker(out: str) -> None:
    """One forward + backward of the small model across the launched processes; writes the counts."""
    import torch
    import torch.distributed as dist
    from diffusers import CogVideoXTransformer3DModel

    from cogpipe import sequence_parallel as sp
    from cogpipe.diffusion import rotary_embeddings

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(**SMALL)
    sp.enable(model, None)
    f, h, w = SMALL_LATENTS
    g = torch.Generator().manual_seed(1)
    kwargs = dict(hidden_states=torch.randn(1, f, 16, h, w, generator=g),
                  encoder_hidden_states=torch.randn(1, SMALL["max_text_seq_length"], 32, generator=g),
                  timestep=torch.tensor([500]), image_rotary_emb=rotary_embeddings(dict(model.config), f, h, w, "cpu"),
                  return_dict=False)
    sp.reset_counts()
    start = time.perf_counter()
    model(**kwargs)[0].square().mean().backward()
    took = time.perf_counter() - start
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(dict(sp.COUNTS, seconds=took)))
    dist.destroy_process_group()


def counted() -> list[dict]:
    from cogpipe.sequence_parallel import exchanged_bytes

    from helpers import free_port

    rows = []
    f, h, w = SMALL_LATENTS
    tokens = (f // 2) * (h // 2) * (w // 2)
    for n in (2, 4):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "counts.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
                   str(free_port()), __file__, "--worker", str(out)]
            subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
            counts = json.loads(out.read_text())
        expected = exchanged_bytes({"patch_size": 2, **SMALL}, tokens, SMALL["max_text_seq_length"], batch=1, sp=n,
                                   element_size=4)["step"]
        rows.append(dict(sp=n, video_tokens=tokens, bytes_counted=counts["bytes_sent"], bytes_analytic=expected,
                         equal=counts["bytes_sent"] == expected, all_to_alls=counts["all_to_all"],
                         all_gathers=counts["all_gather"], step_seconds_cpu=counts["seconds"]))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.worker)
    emit(dict(bench="sequence_parallel", nvlink_gb_per_s=NVLINK_GBPS, analytic=analytic(), counted=counted()), a.out)


if __name__ == "__main__":
    main()
