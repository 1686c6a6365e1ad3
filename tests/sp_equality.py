"""Run by tests/test_sequence_parallel.py under `torch.distributed.run` on CPU processes (gloo): for each model
variant, the transformer's output and every parameter's gradient under sequence parallel (the gradients summed
over the SP group) against one process's, in fp64. Writes <out>/rank<r>.json: the largest differences and the
collective counts."""

import json
import os
import sys

import torch
import torch.distributed as dist

from cogpipe import sequence_parallel as sp_mod
from cogpipe.diffusion import rotary_embeddings

TEXT = 5  # text tokens
# (name, transformer kwargs beyond the common ones, latent frames, latent height, latent width)
COMMON = dict(num_attention_heads=4, attention_head_dim=16, num_layers=2, time_embed_dim=16, text_embed_dim=12,
              max_text_seq_length=TEXT, out_channels=4)
VARIANTS = [
    # 1.0 text-to-video: 3D sin-cos positions added in the patch embedding; 3 x 3 x 3 = 27 tokens (padded)
    ("1.0-t2v-sincos", dict(in_channels=4, sample_height=6, sample_width=6, sample_frames=9), 3, 6, 6, False),
    # 1.0 image-to-video: a learned position table (exactly its sample shape) and rotary tables
    ("1.0-i2v-learned-rope", dict(in_channels=8, sample_height=6, sample_width=6, sample_frames=9,
                                  use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True),
     3, 6, 6, False),
    # 1.5 text-to-video: rotary, patch_t 2 (4 latent frames -> 2 x 3 x 4 = 24 tokens)
    ("1.5-t2v-rope", dict(in_channels=4, sample_height=6, sample_width=8, sample_frames=13, patch_size_t=2,
                          patch_bias=False, use_rotary_positional_embeddings=True), 4, 6, 8, False),
    # 1.5 image-to-video: ofs embedding; 2 x 3 x 3 = 18 tokens; gradient checkpointing (recomputed collectives)
    ("1.5-i2v-rope-ofs", dict(in_channels=8, sample_height=6, sample_width=6, sample_frames=13, patch_size_t=2,
                              patch_bias=False, ofs_embed_dim=16, use_rotary_positional_embeddings=True),
     4, 6, 6, True),
]


def build(kwargs):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(**COMMON, **kwargs).double()
    with torch.no_grad():  # zero-initialised parts (none here), and non-trivial norms/biases everywhere
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    return model


def inputs(model, frames, h, w):
    cfg = dict(model.config)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, frames, cfg["in_channels"], h, w, generator=g, dtype=torch.float64)
    text = torch.randn(2, TEXT, cfg["text_embed_dim"], generator=g, dtype=torch.float64)
    kwargs = dict(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([3, 700]), return_dict=False)
    if cfg.get("ofs_embed_dim"):
        kwargs["ofs"] = torch.full((2,), 2.0, dtype=torch.float64)
    rope = rotary_embeddings(cfg, frames, h, w, "cpu")
    kwargs["image_rotary_emb"] = None if rope is None else tuple(t.double() for t in rope)
    return kwargs


def run(model, kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**kwargs)[0]
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def main(out_dir):
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    report = {}
    sizes = [n for n in (2, 4) if world % n == 0]
    for size in sizes:
        layout = sp_mod.Layout(rank, world, size)
        group = sp_mod.new_group(layout)
        for name, kwargs, frames, h, w, checkpointing in VARIANTS:
            model = build(kwargs)
            if checkpointing:
                model.enable_gradient_checkpointing()
            args = inputs(model, frames, h, w)
            ref_out, ref_grads = run(model, args)
            sp_mod.enable(model, group)
            sp_mod.reset_counts()
            out, grads = run(model, args)
            counts = dict(sp_mod.COUNTS)
            for g in grads.values():  # each rank's gradient is its part of the sample's
                dist.all_reduce(g, group=group)
            sp_mod.disable(model)
            again, _ = run(model, args)  # disable restores the model's own attention
            report[f"sp{size}/{name}"] = dict(
                output=(out - ref_out).abs().max().item(), output_scale=ref_out.abs().max().item(),
                grad=max((grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads),
                grad_scale=max(g.abs().max().item() for g in ref_grads.values()),
                zero_grads=sorted(k for k, g in ref_grads.items() if g.abs().max() == 0),
                params=len(ref_grads), restored=(again - ref_out).abs().max().item(), **counts)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
