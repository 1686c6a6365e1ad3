"""Sequence parallelism (Ulysses) for CogVideoXTransformer3DModel: a group of N processes shares one sample.

    enable(transformer, group)   installs three things on the transformer, leaving diffusers' forward as it is:
      - a forward hook on `patch_embed`: the patch embedding (positions included: 2B's sin-cos table, 5B-I2V's
        learned one) runs on the whole sample; the hook keeps all text tokens and this rank's 1/N of the video
        tokens (padded with zero tokens to a multiple of N);
      - `UlyssesAttnProcessor` on every CogVideoXAttention: q, k, v of the local tokens, one all-to-all from
        sequence-split to head-split (each rank: every token, H/N heads), attention over the whole joint
        text+video sequence with the rotary tables applied there in full, one all-to-all back;
      - a forward hook on `proj_out`: the output tokens are gathered (and the padding dropped) before the
        unpatchify, so every rank of the group returns the whole sample's output, equal to one process's.

The text tokens (226 in the released models) are replicated: every rank computes the text stream identically.
Their gradients are counted once as follows (docs/multi_gpu.md, "Sequence parallel"): each rank's gradients are a
*part* whose sum over the group is the sample's gradient. The video tokens give this by construction (each rank
holds its own tokens). For the text, each rank attends with its H/N heads of the text's q, k, v (its part of the
gradient there), and the heads are put together for the text's output projection by an all-gather whose backward
is a reduce-scatter (the parts summed). Every other text operation is linear in its incoming gradient, so it
keeps the parts. The output gather's backward hands each rank the gradient of its own tokens only: every rank
computes the same loss from the same gathered output. So: the sum over the group of every parameter's gradient
is one process's gradient; under DDP/FSDP/ZeRO, which average over all world = DP x SP ranks, the loss is scaled
by N (`loss_scale`) and the average becomes the mean over the DP groups.

`COUNTS` counts the collectives run and the bytes each rank sent (tests check an all-to-all really ran; the
bench reports the bytes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

COUNTS = {"all_to_all": 0, "all_gather": 0, "bytes_sent": 0}


def reset_counts() -> None:
    for k in COUNTS:
        COUNTS[k] = 0


# ---- groups ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """Where a rank sits in world = DP x SP: SP groups are runs of `sp` consecutive ranks (one machine's GPUs,
    where the all-to-alls are fast); the data-parallel rank is the group's index."""
    rank: int
    world: int
    sp: int

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp

    @property
    def dp_world(self) -> int:
        return self.world // self.sp

    def group_ranks(self, index: int) -> list[int]:
        return list(range(index * self.sp, (index + 1) * self.sp))


def new_group(layout: Layout):
    """This rank's SP process group (a collective: every rank creates every group, in the same order)."""
    if layout.sp == 1:
        return None
    mine = None
    for g in range(layout.dp_world):
        group = dist.new_group(layout.group_ranks(g))
        if g == layout.dp_rank:
            mine = group
    return mine


def valid_sizes(heads: int, world: Optional[int] = None, up_to: int = 8) -> list[int]:
    """SP sizes > 1 that divide the head count (and the world size, when given), at most `up_to`."""
    return [n for n in range(2, up_to + 1) if heads % n == 0 and (world is None or world % n == 0)]


def problem(sp: int, heads: int, world: Optional[int]) -> Optional[str]:
    """Why `sp` cannot run (None: it can): it must divide the attention head count and the process count."""
    if sp < 1:
        return f"must be >= 1, got {sp}"
    if sp == 1:
        return None
    valid = "1, " + ", ".join(map(str, valid_sizes(heads, world, up_to=world or heads)))
    if heads % sp:
        return (f"{sp} does not divide the model's {heads} attention heads (Ulysses gives each rank heads/N of "
                f"them); valid values{' here' if world else ''}: {valid.rstrip(', ')}")
    if world is not None and world % sp:
        return (f"{sp} does not divide the {world} processes launched (world = data parallel x sequence parallel); "
                f"valid values here: {valid.rstrip(', ')}")
    return None


# ---- the collectives, differentiable --------------------------------------------------------------------------

def _sent(t: torch.Tensor, n: int) -> int:
    return t.numel() * t.element_size() * (n - 1) // n


def _all_to_all(x: torch.Tensor, group, n: int, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Chunk j of x along scatter_dim goes to rank j; the chunks received are joined along gather_dim."""
    send = torch.stack(x.chunk(n, dim=scatter_dim)).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    COUNTS["all_to_all"] += 1
    COUNTS["bytes_sent"] += _sent(send, n)
    return torch.cat(recv.unbind(0), dim=gather_dim)


def _all_gather(x: torch.Tensor, group, n: int, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=group)
    COUNTS["all_gather"] += 1
    COUNTS["bytes_sent"] += x.numel() * x.element_size() * (n - 1)
    return torch.cat(parts, dim=dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, n, scatter_dim, gather_dim):
        ctx.args = group, n, scatter_dim, gather_dim
        return _all_to_all(x, group, n, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        group, n, scatter_dim, gather_dim = ctx.args
        return _all_to_all(grad, group, n, gather_dim, scatter_dim), None, None, None, None


class _GatherSummedBack(torch.autograd.Function):
    """All-gather along dim; backward: the incoming gradients (parts) summed over the group, this rank's chunk
    (a reduce-scatter, done as an all-to-all and a sum so that gloo runs it too)."""

    @staticmethod
    def forward(ctx, x, group, n, rank, dim):
        ctx.args = group, n, dim
        return _all_gather(x, group, n, dim)

    @staticmethod
    def backward(ctx, grad):
        group, n, dim = ctx.args
        send = torch.stack(grad.chunk(n, dim=dim)).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)
        COUNTS["all_to_all"] += 1
        COUNTS["bytes_sent"] += _sent(send, n)
        return recv.sum(0), None, None, None, None


class _GatherOwnBack(torch.autograd.Function):
    """All-gather along dim; backward: this rank's chunk of the gradient (every rank computed the same loss from the
    same gathered tensor, so each one's gradient of its own chunk is already whole)."""

    @staticmethod
    def forward(ctx, x, group, n, rank, dim):
        ctx.args = rank, x.shape[dim], dim
        return _all_gather(x, group, n, dim)

    @staticmethod
    def backward(ctx, grad):
        rank, size, dim = ctx.args
        return grad.narrow(dim, rank * size, size), None, None, None, None


# ---- the transformer ------------------------------------------------------------------------------------------

@dataclass
class SequenceParallel:
    """One SP group's state for one transformer: the group, and the current sample's video token count."""
    group: object
    size: int
    rank: int
    video_tokens: int = 0  # the sample's true video token count (set by the patch embedding hook)
    handles: list = field(default_factory=list)
    old_processors: dict = field(default_factory=dict)

    @property
    def padded(self) -> int:
        return math.ceil(self.video_tokens / self.size) * self.size

    @property
    def local(self) -> int:
        return self.padded // self.size


class UlyssesAttnProcessor:
    """diffusers' CogVideoXAttnProcessor2_0 (joint text + video attention, qk-norm, rotary on the video tokens),
    with the video tokens split across the group and the heads split for the attention itself."""

    def __init__(self, sp: SequenceParallel, kernel=None):
        from cogpipe.attention import Kernel

        self.sp = sp
        self.kernel = kernel or Kernel("sdpa")  # cogpipe.attention: the attention itself, on the full sequence

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        import torch.nn.functional as F

        if attention_mask is not None:
            raise ValueError("sequence parallel attention takes no attention_mask (CogVideoX passes none)")
        sp, n = self.sp, self.sp.size
        text_len = encoder_hidden_states.size(1)
        batch = hidden_states.size(0)
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # text + this rank's video tokens
        qkv = torch.stack([attn.to_q(x), attn.to_k(x), attn.to_v(x)])  # (3, B, T + S/N, H*d)
        heads = attn.heads
        head_dim = qkv.shape[-1] // heads
        qkv = qkv.view(3, batch, -1, heads, head_dim)
        local_heads = heads // n
        # text: every rank holds it; take this rank's heads (its part of their gradient)
        text = qkv[:, :, :text_len].narrow(3, sp.rank * local_heads, local_heads)
        # video: sequence-split -> head-split; then the padding tokens leave before the attention
        video = _AllToAll.apply(qkv[:, :, text_len:], sp.group, n, 3, 2)[:, :, :sp.video_tokens]
        q, k, v = torch.cat([text, video], dim=2).transpose(2, 3).unbind(0)  # (B, H/N, T + S, d) each
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:  # the whole sequence is here: the full tables apply, no slicing
            from diffusers.models.embeddings import apply_rotary_emb

            q = torch.cat([q[:, :, :text_len], apply_rotary_emb(q[:, :, text_len:], image_rotary_emb)], dim=2)
            if not attn.is_cross_attention:
                k = torch.cat([k[:, :, :text_len], apply_rotary_emb(k[:, :, text_len:], image_rotary_emb)], dim=2)
        out = self.kernel(q, k, v)
        out = out.transpose(1, 2)  # (B, T + S, H/N, d)
        text_out = _GatherSummedBack.apply(out[:, :text_len].contiguous(), sp.group, n, sp.rank, 2)
        video_out = out[:, text_len:]
        pad = sp.padded - sp.video_tokens
        if pad:
            video_out = F.pad(video_out, (0, 0, 0, 0, 0, pad))
        video_out = _AllToAll.apply(video_out, sp.group, n, 1, 2)  # head-split -> sequence-split
        out = torch.cat([text_out, video_out], dim=1).reshape(batch, -1, heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        return out[:, text_len:], out[:, :text_len]


def _split_tokens(sp: SequenceParallel):
    def hook(module, args, output):
        text_len = args[0].shape[1]  # patch_embed(text_embeds, image_embeds)
        video = output[:, text_len:]
        sp.video_tokens = video.shape[1]
        pad = sp.padded - sp.video_tokens
        if pad:
            video = torch.nn.functional.pad(video, (0, 0, 0, pad))
        return torch.cat([output[:, :text_len], video[:, sp.rank * sp.local:(sp.rank + 1) * sp.local]], dim=1)
    return hook


def _gather_tokens(sp: SequenceParallel):
    def hook(module, args, output):
        return _GatherOwnBack.apply(output, sp.group, sp.size, sp.rank, 1)[:, :sp.video_tokens]
    return hook


def _attention_modules(transformer):
    from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

    return [(name + ".attn1", block.attn1) for name, block in transformer.named_modules()
            if isinstance(block, CogVideoXBlock)]


def enable(transformer, group, size: Optional[int] = None) -> Optional[SequenceParallel]:
    """Make `transformer` (a CogVideoXTransformer3DModel, unwrapped; LoRA layers are fine) run each sample across
    `group`. Every rank of the group must call the model with the same inputs. Returns the state (for `disable`);
    None when the group has one rank (nothing to do)."""
    size = size or (dist.get_world_size(group) if group is not None or dist.is_initialized() else 1)
    if size == 1:
        return None
    modules = _attention_modules(transformer)
    heads = modules[0][1].heads
    if heads % size:
        raise ValueError(f"sequence parallel: {size} processes do not divide the model's {heads} heads")
    sp = SequenceParallel(group=group, size=size, rank=dist.get_rank(group))
    processor = UlyssesAttnProcessor(sp)
    for name, attn in modules:
        sp.old_processors[name] = attn.processor
        attn.set_processor(processor)
    sp.handles = [transformer.patch_embed.register_forward_hook(_split_tokens(sp)),
                  transformer.proj_out.register_forward_hook(_gather_tokens(sp))]
    transformer._cogpipe_sequence_parallel = sp
    return sp


def disable(transformer) -> None:
    """Undo `enable`: the model's own processors and no hooks."""
    sp = getattr(transformer, "_cogpipe_sequence_parallel", None)
    if sp is None:
        return
    for name, attn in _attention_modules(transformer):
        attn.set_processor(sp.old_processors[name])
    for handle in sp.handles:
        handle.remove()
    del transformer._cogpipe_sequence_parallel


def loss_scale(sp_size: int) -> float:
    """What to multiply the loss by before a backward that averages gradients over all world ranks (DDP, FSDP2,
    ZeRO): each rank's gradient is a part of its group's sample gradient, so the world average is 1/N of the mean
    over the DP groups."""
    return float(sp_size)


def exchanged_bytes(cfg: dict, video_tokens: int, text_tokens: int, batch: int, sp: int, element_size: int,
                    backward: bool = True, checkpointing: bool = False) -> dict:
    """Bytes one rank sends in one forward (and backward) of the whole transformer, analytically. Per block: one
    all-to-all of q, k, v and one of the attention output (each rank keeps 1/N of what it holds and sends the rest),
    the all-gather of the text tokens' heads (backward: a reduce-scatter of the same tensor); once a forward, the
    gather of the output tokens. Backward: each all-to-all once more, reversed. Gradient checkpointing recomputes
    every block's forward in the backward."""
    if sp == 1:
        return {"forward": 0, "backward": 0, "recompute": 0, "step": 0}
    hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    layers = cfg["num_layers"]
    local = math.ceil(video_tokens / sp)
    out_ch = cfg["patch_size"] ** 2 * (cfg.get("patch_size_t") or 1) * (cfg.get("out_channels") or 16)
    a2a = batch * local * hidden * element_size * (sp - 1) // sp
    text = batch * text_tokens * (hidden // sp) * element_size * (sp - 1)  # all-gather: my heads to N-1 ranks
    text_back = batch * text_tokens * hidden * element_size * (sp - 1) // sp
    gather = batch * local * out_ch * element_size * (sp - 1)
    blocks = layers * (3 * a2a + a2a + text)
    forward = blocks + gather
    back = layers * (a2a + 3 * a2a + text_back) if backward else 0
    recompute = blocks if backward and checkpointing else 0
    return {"forward": forward, "backward": back, "recompute": recompute, "step": forward + back + recompute}


def setup(rank: int, world: int, size: int) -> tuple[Layout, object]:
    """A training run's place in world = DP x SP and its SP group (None at SP 1); every rank calls it."""
    if world % size:
        raise ValueError(f"train.sequence_parallel: {size} does not divide the {world} processes launched")
    layout = Layout(rank, world, size)
    return layout, new_group(layout)


def inference_launch(size: int, device) -> str:
    """The launch that starts `size` processes on this machine: beside CUDA accelerate's default does; on CPUs
    (or MPS) it starts one process unless told to run several CPU processes through the DDP config."""
    if getattr(device, "type", device) == "cuda":
        return f"accelerate launch --num_processes {size}"
    import os

    from cogpipe.paths import repo_path

    try:
        config = repo_path("configs/accelerate/ddp.yaml", "--config_file")
        rel = os.path.relpath(config)
        config = rel if not rel.startswith("..") else str(config)
    except FileNotFoundError:
        config = "configs/accelerate/ddp.yaml"
    return f"ACCELERATE_USE_CPU=1 accelerate launch --config_file {config} --num_processes {size}"


def start_inference(size: int, device, heads: int) -> int:
    """infer.py --sequence-parallel N under `accelerate launch --num_processes N` (or torchrun): join the launch's
    process group (NCCL beside CUDA, gloo elsewhere) and return this rank; every rank then runs the same video.
    The process count and the head count are checked first, naming the flag."""
    import os

    world = int(os.environ["WORLD_SIZE"]) if os.environ.get("WORLD_SIZE") else None
    if world != size:
        raise ValueError(f"--sequence-parallel {size}: launch {size} processes, e.g. `{inference_launch(size, device)} "
                         f"infer.py ... --sequence-parallel {size}` (this run has "
                         f"{world or 'no launcher, one process'})")
    message = problem(size, heads, world)
    if message:
        raise ValueError(f"--sequence-parallel {message}")
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank()
