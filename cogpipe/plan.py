"""`cogpipe plan`: estimate a recipe's peak GPU memory and name the switches that make it fit.

    cogpipe plan --config configs/cogvideox_5b_lora.yaml --gpu-memory 24 [key=value ...] [--json]

Everything is computed from the transformer's config (built on the meta device: no weights, no GPU) and
the clip shape; `estimate(cfg)` returns the numbers as a dict. Memory is what
`torch.cuda.max_memory_allocated` counts (tensors), in GB = 1e9 bytes; the CUDA context and the
allocator's slack come on top (`fits` allows for them). The VAE and T5 are not counted: training encodes
every clip and prompt into the latent cache first and both leave the GPU before the transformer is built.

The activation model follows what autograd really keeps for a CogVideoXBlock (diffusers) under CUDA
autocast; the per-block formula is in `block_activations`, the phases of a step in `estimate`.
tests/test_plan.py checks the formula against the tensors autograd saves for real blocks and the whole
estimate against every tensor's bytes over two training steps (both with the CPU autocast policy, which
keeps LayerNorm in bf16), and against bench/results/ where GPU measurements exist.
The FLOP count (`forward_flops`, `train_flops`) is shared with bench/train_step.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys

GB = 1e9
# mixed precision -> bytes of an activation element
_ACT_BYTES = {"bf16": 2, "fp16": 2, "no": 4}
_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
# hub ids of the released models -> preset with the same shapes (used when the hub cannot be reached)
KNOWN_HUB_IDS = {
    "cogvideox-2b": "2b", "cogvideox-5b": "5b", "cogvideox-5b-i2v": "5b-i2v",
    "cogvideox1.5-5b": "1.5-5b", "cogvideox1.5-5b-i2v": "1.5-5b-i2v",
}
# allowance on top of the allocated peak: CUDA context (~0.5 GB) and allocator fragmentation
RESERVE_GB, RESERVE_FRACTION = 0.75, 0.05
# DeepSpeed's reduce and all-gather buckets at their defaults (5e8 elements each, 16-bit)
DEEPSPEED_BUCKETS = 2 * 5e8 * 2


# ---------------------------------------------------------------------------------------------------------
# The model: its config, parameter counts and token counts
# ---------------------------------------------------------------------------------------------------------

def resolve_model(model_cfg) -> tuple[dict, str | None]:
    """(transformer config with defaults, stand-in preset or None).

    From model.pretrained when it can be read. A hub id that cannot be read (offline, not cached) stands
    in with the shapes of `model.preset`, or, where the recipe left the preset at tiny, of the released
    model the id names (KNOWN_HUB_IDS). Planning an unreadable model with the tiny shapes would be
    meaningless: that is an error that says what to set.
    """
    import warnings

    from cogpipe.models import PRESETS, component_configs

    if not model_cfg.pretrained:
        return component_configs(model_cfg)[0], None
    with warnings.catch_warnings(record=True) as caught:  # models.py warns when it falls back to the preset
        warnings.simplefilter("always")
        try:
            tcfg, error = component_configs(model_cfg)[0], None
        except Exception as e:  # a missing local folder, a hub error models.py does not catch, ...
            tcfg, error = None, f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
    if error is None and not any(str(model_cfg.pretrained) in str(w.message) for w in caught):
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return tcfg, None
    known = KNOWN_HUB_IDS.get(str(model_cfg.pretrained).rstrip("/").split("/")[-1].lower())
    preset = model_cfg.preset if model_cfg.preset != "tiny" else known
    if preset not in PRESETS:
        raise ValueError(f"model.pretrained: cannot read {model_cfg.pretrained!r}{f' ({error})' if error else ''}; "
                         f"set model.preset to its size ({', '.join(p for p in PRESETS if p != 'tiny')}) or "
                         f"pass model.pretrained=null")
    return component_configs(dataclasses.replace(model_cfg, pretrained=None, preset=preset))[0], preset


def _stand_in_note(model_cfg, preset) -> str | None:
    return None if preset is None else (f"model.pretrained {model_cfg.pretrained!r} could not be read here; "
                                        f"planned with the shapes of preset {preset!r}")


def resolve_transformer_config(model_cfg) -> tuple[dict, str | None]:
    """(transformer config, note): `resolve_model` with a sentence saying which preset stood in, if any."""
    tcfg, preset = resolve_model(model_cfg)
    return tcfg, _stand_in_note(model_cfg, preset)


@functools.lru_cache(maxsize=16)
def _model_stats(tcfg_json: str) -> dict:
    """Parameter and buffer counts and every nn.Linear of the transformer, from a meta-device build."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import CogVideoXTransformer3DModel

    with init_empty_weights():  # parameters on meta; buffers (position tables) are real but small
        model = CogVideoXTransformer3DModel(**json.loads(tcfg_json))
    linears = [(name, m.in_features, m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)]
    block = model.transformer_blocks[0]
    return dict(params=sum(p.numel() for p in model.parameters()),
                buffers=sum(b.numel() for b in model.buffers() if b.is_floating_point()),
                block_params=sum(p.numel() for p in block.parameters()),
                linears=linears)


def model_stats(tcfg: dict) -> dict:
    return _model_stats(json.dumps(tcfg, sort_keys=True, default=list))


def lora_targets(linears, target_modules) -> list[tuple[str, int, int]]:
    """The nn.Linear layers peft wraps: name equal to a target or ending in '.' + target."""
    return [(n, i, o) for n, i, o in linears if any(n == t or n.endswith("." + t) for t in target_modules)]


def token_shape(tcfg: dict, frames: int, height: int, width: int, batch: int = 1) -> dict:
    """Latent and token counts of one training sample (DESIGN.md §4: 4x temporal, 8x spatial VAE)."""
    p, p_t = tcfg["patch_size"], tcfg.get("patch_size_t")
    latent_frames = (frames - 1) // 4 + 1
    if p_t:  # CogVideoX 1.5 pads an odd latent frame count to a multiple of patch_t
        latent_frames = math.ceil(latent_frames / p_t) * p_t
    lh, lw = height // 8, width // 8
    video = (latent_frames // (p_t or 1)) * (lh // p) * (lw // p)
    text = tcfg["max_text_seq_length"]
    return dict(batch=batch, frames=frames, height=height, width=width, latent_frames=latent_frames,
                latent_height=lh, latent_width=lw, video_tokens=video, text_tokens=text, tokens=video + text)


def largest_shape(cfg, tcfg: dict) -> dict:
    """The training shape with the most tokens: data.frames x height x width, or a larger bucket
    (data.buckets, where the schema has them): the peak is set by the largest batch."""
    shapes = [(cfg.data.frames, cfg.data.height, cfg.data.width)]
    shapes += [tuple(b) for b in getattr(cfg.data, "buckets", None) or []]
    return max((token_shape(tcfg, f, h, w, cfg.train.batch_size) for f, h, w in shapes), key=lambda s: s["tokens"])


# ---------------------------------------------------------------------------------------------------------
# FLOPs (shared with bench/train_step.py)
# ---------------------------------------------------------------------------------------------------------

def forward_flops(tcfg: dict, shape: dict, lora_rank: int = 0, target_modules=()) -> dict:
    """Forward FLOPs of one step (all samples): 2*in*out per row of every Linear (and the patch conv),
    plus attention 4*S^2*H per layer (QK^T and PV). Elementwise ops are not counted."""
    B, S, Sv, St = shape["batch"], shape["tokens"], shape["video_tokens"], shape["text_tokens"]
    H = tcfg["num_attention_heads"] * tcfg["attention_head_dim"]
    L = tcfg["num_layers"]
    linear = 0
    for name, i, o in model_stats(tcfg)["linears"]:
        if name.startswith("transformer_blocks."):
            rows = B if name.endswith("norm1.linear") or name.endswith("norm2.linear") else B * S
        elif name == "patch_embed.text_proj":
            rows = B * St
        elif name in ("patch_embed.proj", "proj_out"):
            rows = B * Sv
        else:  # time/ofs embeddings, norm_out.linear: once per sample
            rows = B
        linear += 2 * i * o * rows
    if tcfg.get("patch_size_t") is None:  # 1.0: patch embedding is a Conv2d (stride = kernel = patch)
        p, c = tcfg["patch_size"], tcfg["in_channels"]
        linear += 2 * c * p * p * H * B * Sv
    attention = 4 * S * S * H * L * B
    lora = 0
    if lora_rank:
        for name, i, o in lora_targets(model_stats(tcfg)["linears"], target_modules):
            rows = B if name.endswith(("norm1.linear", "norm2.linear")) else B * S
            lora += 2 * lora_rank * (i + o) * rows
    return dict(linear=linear, attention=attention, lora=lora, total=linear + attention + lora)


def train_flops(tcfg: dict, shape: dict, mode: str, lora_rank: int = 0, target_modules=()) -> int:
    """Model FLOPs of one training step, without the recompute of gradient checkpointing.

    full: 3x forward (backward = input gradients + weight gradients, each as costly as the forward).
    lora: the frozen linears need only input gradients (1x), attention has no weights so its backward is
    2x its forward either way, and the LoRA matrices get both gradients (2x)."""
    f = forward_flops(tcfg, shape, lora_rank if mode == "lora" else 0, target_modules)
    if mode == "full":
        return 3 * f["total"]
    return 2 * f["linear"] + 3 * f["attention"] + 3 * f["lora"]


# ---------------------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------------------

def precision_policy(mixed_precision: str, device: str = "cuda") -> dict:
    """Bytes of the tensors autograd keeps, by kind.

    act: activations in the autocast dtype (fp32 without mixed precision).
    norm: LayerNorm inputs/outputs; CUDA autocast runs layer_norm in fp32 (CPU autocast does not).
    sdpa_out_shared: to_out reads SDPA's output in place (flash/efficient kernels on CUDA return it in
        (B, S, heads, d) layout); the CPU kernel's output needs a copy.
    """
    act = _ACT_BYTES[mixed_precision]
    autocast = mixed_precision != "no"
    return dict(act=act, norm=4 if (autocast and device == "cuda") else act, autocast=autocast,
                sdpa_out_shared=device == "cuda")


def block_activations(tcfg: dict, shape: dict, mode: str, policy: dict, lora_rank: int = 0,
                      target_modules=()) -> dict:
    """Bytes autograd keeps for the backward of ONE CogVideoXBlock, itemised (S = video + text tokens).

    Let X = B*S*H elements, a = activation bytes, n = LayerNorm bytes (4 under CUDA autocast).
    Both modes:
      LayerNorm inputs of norm1/norm2 (block input, residual after attention)     2 X n
      q and k before their LayerNorm (norm_q, norm_k)                             2 X n
      SDPA q, k, v and output (flash/efficient keep O(S), not S^2)                4 X a
      GELU input (the MLP's 4H projection)                                        4 X a
    Full fine-tune adds (every Linear keeps its input for its weight gradient):
      norm1/norm2 normalized outputs (multiplied by a trained adaLN scale)        2 X n
      input of to_q/to_k/to_v and of ff.net.0.proj: one shared half-precision    2 X a
        tensor for q/k/v, but under CUDA autocast the normalized input is fp32 and
        each of to_q/to_k/to_v casts (and keeps) its own copy                    (4 X a)
      input of to_out.0 (shared with the SDPA output on CUDA)                     0|1 X a
      input of ff.net.2 (GELU output)                                             4 X a
      attention and MLP outputs (multiplied by the trained adaLN gates)           2 X a
    LoRA adds, per wrapped Linear: its own copy of the input (peft casts it to the fp32 adapter dtype,
    autocast casts it back: no sharing between to_q, to_k, to_v) X*in/H*a, and the rank-r
    intermediate B*S*r*a. Frozen Linears keep nothing (their input gradient needs only the weight).
    Small terms (LayerNorm statistics, attention log-sum-exp: fp32 per row) are included.
    """
    B, S = shape["batch"], shape["tokens"]
    heads, H = tcfg["num_attention_heads"], tcfg["num_attention_heads"] * tcfg["attention_head_dim"]
    X = B * S * H
    F = 4 * X  # MLP inner width is 4H in CogVideoX (FeedForward default)
    a, n = policy["act"], policy["norm"]
    items = {
        "norm inputs (norm1, norm2)": 2 * X * n,
        "q, k before norm_q/norm_k": 2 * X * n,
        "attention q, k, v, out": 4 * X * a,
        "GELU input": F * a,
        "row statistics (LayerNorm, log-sum-exp)": (2 * 2 * B * S + 2 * 2 * B * S * heads + B * S * heads) * 4,
    }
    if mode == "full":
        items["normalized outputs (adaLN scale)"] = 2 * X * n
        qkv = 3 if (policy["autocast"] and n == 4) else 1  # fp32 LayerNorm output: a cast per Linear
        items["Linear inputs: to_q/k/v, ff.net.0.proj"] = (qkv + 1) * X * a
        items["Linear input: to_out.0"] = 0 if policy["sdpa_out_shared"] else X * a
        items["Linear input: ff.net.2"] = F * a
        items["gated outputs (adaLN gates)"] = 2 * X * a
    elif lora_rank:
        in_block = [(nm, i, o) for nm, i, o in lora_targets(model_stats(tcfg)["linears"], target_modules)
                    if nm.startswith("transformer_blocks.0.") and not nm.endswith(("norm1.linear", "norm2.linear"))]
        if policy["autocast"] or a != 4:
            # peft casts the input to the fp32 adapter dtype and autocast casts it back (or, without autocast,
            # a half-precision input is cast up): every wrapped Linear keeps its own copy
            inputs = sum(B * S * i * (a if policy["autocast"] else 4) for _, i, _ in in_block)
        else:  # fp32 throughout: no casts; to_q/k/v share their input, to_out.0 may read SDPA's output in place
            groups = {}
            for nm, i, _ in in_block:
                if nm.endswith(("to_q", "to_k", "to_v")):
                    groups["qkv"] = i
                elif not (nm.endswith("to_out.0") and policy["sdpa_out_shared"]):
                    groups[nm] = i
            inputs = sum(B * S * i * 4 for i in groups.values())
        items["LoRA inputs (a copy per wrapped Linear)"] = inputs
        items["LoRA rank-r intermediates"] = len(in_block) * B * S * lora_rank * a
    return items


def outside_activations(tcfg: dict, shape: dict, mode: str, policy: dict, loss: bool = True) -> int:
    """Bytes kept outside the blocks: the LayerNorm inputs of norm_final and norm_out over the video
    tokens; (full) norm_out's normalized output and proj_out's input; the fp32 RoPE cos/sin tables
    (shared by all blocks); and (loss=True) ~3 fp32 tensors of the latents' size in the loss."""
    B, Sv = shape["batch"], shape["video_tokens"]
    H = tcfg["num_attention_heads"] * tcfg["attention_head_dim"]
    a, n = policy["act"], policy["norm"]
    Xv = B * Sv * H
    kept = 2 * Xv * n + (Xv * n + Xv * a if mode == "full" else 0)
    if tcfg.get("use_rotary_positional_embeddings"):
        kept += 2 * Sv * tcfg["attention_head_dim"] * 4
    latents = B * shape["latent_frames"] * 16 * shape["latent_height"] * shape["latent_width"]
    return kept + (3 * latents * 4 if loss else 0)


def workspace(tcfg: dict, shape: dict, policy: dict) -> int:
    """Transient peak inside one block's backward: the MLP's two B*S*4H gradient buffers plus an fp32
    B*S*H cast (LoRA inputs, LayerNorm under autocast)."""
    X = shape["batch"] * shape["tokens"] * tcfg["num_attention_heads"] * tcfg["attention_head_dim"]
    return 2 * 4 * X * policy["act"] + 4 * X


# ---------------------------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------------------------

STRATEGIES = ("single", "ddp", "zero2", "zero3", "fsdp")


def estimate(cfg, *, device: str = "cuda", strategy: str = "single", num_gpus: int = 1,
             adam_bytes: int | None = None, frozen_bytes: int | None = None, tcfg: dict | None = None) -> dict:
    """Peak GPU memory (per GPU) of training `cfg`, with and without gradient checkpointing.

    strategy: single | ddp | zero2 | zero3 | fsdp across `num_gpus`. adam_bytes: AdamW state per trainable
    parameter (default from the config: 8, two fp32 moments; 2 with an 8-bit AdamW switch). frozen_bytes:
    storage of a frozen weight (default: model.weight_dtype, 1 with an fp8 switch). device: "cuda" (the
    CUDA autocast policy) or "cpu".
    Returns the parts and totals in GB (1e9 bytes).

    Memory over a step, as training.py runs it (P = transformer parameters, T = trainable ones):
      kept all along   frozen weights (LoRA: P x weight dtype) or fp32 master weights (full: 4P),
                       LoRA weights 4T, AdamW moments 8T (present from the first step on)
      forward end      + autocast's half-precision copies of trained weights (full: 2P; freed when the
                       autocast region exits, but the saved tensors of the backward keep them)
                       + activations: every block's (no checkpointing) or only each block's inputs
      backward         + gradients (4T) fill up while the activations are freed; with checkpointing one
                       block is recomputed at a time, plus a workspace of its backward
      optimizer step   + gradients 4T + AdamW's sqrt(v) buffer 4T (foreach implementation)
    The peak is the largest of these phases. Sharding divides the kept and trainable parts by N
    (ZeRO-2: gradients and AdamW state; ZeRO-3 and FSDP: weights too, plus one or two gathered blocks;
    DeepSpeed also keeps its communication buckets and runs the module itself in 16-bit).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    note = None
    if tcfg is None:
        tcfg, note = resolve_transformer_config(cfg.model)
    stats = model_stats(tcfg)
    shape = largest_shape(cfg, tcfg)
    mode, mp = cfg.train.mode, cfg.train.mixed_precision
    policy = precision_policy(mp, device)
    N = max(1, num_gpus) if strategy != "single" else 1
    P, L = stats["params"], tcfg["num_layers"]
    H = tcfg["num_attention_heads"] * tcfg["attention_head_dim"]

    switched_adam, switched_frozen = memory_switches(cfg)
    adam_bytes = adam_bytes or switched_adam
    frozen_bytes = frozen_bytes or switched_frozen
    rank = cfg.lora.rank if mode == "lora" else 0
    targets = lora_targets(stats["linears"], cfg.lora.target_modules) if mode == "lora" else []
    T = sum(rank * (i + o) for _, i, o in targets) if mode == "lora" else P
    wdt = _DTYPE_BYTES[cfg.model.weight_dtype] if mode == "lora" else 4
    frozen = P * (frozen_bytes or wdt) if mode == "lora" else 0
    buffers = stats["buffers"] * wdt  # position tables (2B sincos, 5B-I2V learned), cast with the model
    master, grads, adam = 4 * T, 4 * T, adam_bytes * T
    half_module = 0  # DeepSpeed runs the module itself in half precision, the fp32 master in the optimizer
    copies = P * policy["act"] if (mode == "full" and policy["autocast"]) else 0
    gathered = 0
    if strategy == "ddp" and N > 1:
        grads += 4 * T  # DDP's gradient buckets (gradient_as_bucket_view is off)
    elif strategy in ("zero2", "zero3"):
        if mode == "full":
            half_module, copies = 2 * P, 0
        master, grads, adam = master / N, grads / N, adam / N
        gathered = DEEPSPEED_BUCKETS
        if strategy == "zero3":
            frozen, half_module = frozen / N, half_module / N
            gathered += 2 * stats["block_params"] * 2  # the running block and the prefetched one, 16-bit
    elif strategy == "fsdp":  # full shard
        frozen, master, grads, adam = frozen / N, master / N, grads / N, adam / N
        gathered = 2 * stats["block_params"] * (4 if mode == "full" else wdt)
        copies = copies / L  # only the gathered block's weights are cast at a time
    step_buffer = 4 * T / (N if strategy in ("zero2", "zero3", "fsdp") else 1)

    blk = block_activations(tcfg, shape, mode, policy, rank, cfg.lora.target_modules)
    block = sum(blk.values())
    outside = outside_activations(tcfg, shape, mode, policy)
    work = workspace(tcfg, shape, policy)
    ckpt_inputs = L * shape["batch"] * shape["tokens"] * H * policy["act"]  # hidden + text states per block

    kept = frozen + buffers + master + half_module + adam + gathered
    no_ckpt = kept + max(copies + L * block + outside + work, grads + step_buffer)
    with_ckpt = kept + max(copies + ckpt_inputs + outside,
                           max(ckpt_inputs + outside, grads) + block + work + copies / L,
                           grads + step_buffer)
    chosen = with_ckpt if cfg.train.gradient_checkpointing else no_ckpt
    return dict(
        model=dict(version="1.0" if tcfg.get("patch_size_t") is None else "1.5",
                   i2v=tcfg["in_channels"] == 2 * (tcfg.get("out_channels") or 16),
                   layers=L, hidden=H, heads=tcfg["num_attention_heads"], params=P, note=note),
        shape=shape, mode=mode, lora_rank=rank or None, trainable_params=T,
        weight_dtype=cfg.model.weight_dtype if mode == "lora" else "fp32", mixed_precision=mp,
        gradient_checkpointing=cfg.train.gradient_checkpointing, strategy=strategy, num_gpus=N, device=device,
        gb=dict(
            weights=(frozen + buffers + half_module + (master if mode == "full" else 0)) / GB,
            trainable_params=(master if mode == "lora" else 0) / GB,
            grads=grads / GB, adam=adam / GB, optimizer_step_buffer=step_buffer / GB,
            autocast_weight_copies=copies / GB, gathered_blocks=gathered / GB,
            activations_one_block=block / GB, activations_all_blocks=L * block / GB,
            checkpointed_inputs=ckpt_inputs / GB, outside_blocks=outside / GB, backward_workspace=work / GB,
            activations_without_checkpointing=(L * block + outside + work) / GB,
            activations_with_checkpointing=(ckpt_inputs + outside + block + work) / GB,
            peak_without_checkpointing=no_ckpt / GB, peak_with_checkpointing=with_ckpt / GB, peak=chosen / GB,
            vae_and_text_encoder=0.0),
        block_items_gb={k: v / GB for k, v in blk.items()},
        flops_per_step=train_flops(tcfg, shape, mode, rank, cfg.lora.target_modules),
    )


def needed_gb(peak_gb: float) -> float:
    """GPU memory a run with this allocated peak needs: + CUDA context and allocator slack."""
    return peak_gb * (1 + RESERVE_FRACTION) + RESERVE_GB


# ---------------------------------------------------------------------------------------------------------
# Fit advice
# ---------------------------------------------------------------------------------------------------------

def memory_switches(cfg) -> tuple[int, int | None]:
    """(AdamW bytes per trainable parameter, frozen-weight bytes or None) as the config's switches set them:
    a bool key naming 8bit or a train.optimizer value naming 8bit -> 2 (bitsandbytes: two 1-byte moments);
    a bool key naming fp8, on a LoRA run -> 1. Keys are found by name, so the plan follows the schema."""
    adam, frozen = 8, None
    for section in ("train", "model"):
        part = getattr(cfg, section)
        for f in dataclasses.fields(part):
            value, name = getattr(part, f.name), f.name.lower()
            if ("8bit" in name and value is True) or (name == "optimizer" and "8bit" in str(value).lower()):
                adam = 2
            if "fp8" in name and value is True and cfg.train.mode == "lora":
                frozen = 1
    return adam, frozen


def _switch_on(cfg, word: str):
    """(label, config) with the schema's switch for `word` ('8bit', 'fp8') turned on, or None if the schema
    has none (or the config refuses it): switches that do not exist are reported, not advised."""
    for section in ("train", "model"):
        part = getattr(cfg, section)
        for f in dataclasses.fields(part):
            name = f.name.lower()
            if word in name and isinstance(getattr(part, f.name), bool):
                change = {f.name: True}
            elif word == "8bit" and name == "optimizer" and isinstance(getattr(part, f.name), str):
                change = {f.name: "adamw8bit"}
            else:
                continue
            try:
                return f"{section}.{f.name}={str(next(iter(change.values()))).lower()}", _with(cfg, section, **change)
            except ValueError:  # ConfigError: this value is not one the schema accepts
                return None
    return None


def _with(cfg, section: str, **changes):
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})


def fit_advice(cfg, gpu_memory: float, tcfg: dict | None = None, device: str = "cuda") -> dict:
    """What makes `cfg` fit in `gpu_memory` GB: switches in order of cost, applied one after another until
    it fits, and the fewest GPUs each sharding strategy needs for the recipe (with checkpointing).

    Order of cost: gradient checkpointing (one extra forward, same result), 8-bit AdamW and fp8 frozen
    weights (small numeric cost; advised only where the config has a key for them), LoRA instead of a full
    fine-tune (trains less), a lower LoRA rank, fewer frames, a lower resolution (each changes what is
    learned). Rank, frames and resolution are lowered only as far as needed, and only if that makes it fit.
    """
    from cogpipe.config import frame_rule

    if tcfg is None:
        tcfg, _ = resolve_transformer_config(cfg.model)
    opts = dict(tcfg=tcfg, device=device)

    def needs(c):
        return needed_gb(estimate(c, **opts)["gb"]["peak"])

    start = needs(cfg)
    steps, unavailable, cur = [], [], cfg

    def add(switch, cost, new_cfg):
        nonlocal cur
        cur = new_cfg
        n = needs(cur)
        steps.append(dict(switch=switch, cost=cost, needs_gb=n, fits=n <= gpu_memory))
        return n <= gpu_memory

    def first_fit(candidates):  # the least change among candidates (ordered) that fits, else None
        for c, label in candidates:
            if needs(c) <= gpu_memory:
                return c, label
        return None

    fits = start <= gpu_memory
    if not fits and not cur.train.gradient_checkpointing:
        fits = add("train.gradient_checkpointing=true", "one extra forward per step (~+30% step time), same "
                   "result", _with(cur, "train", gradient_checkpointing=True))
    if not fits and memory_switches(cur)[0] != 2:
        switch = _switch_on(cur, "8bit")
        if switch:
            fits = add(switch[0], "8-bit AdamW state, nearly the same result", switch[1])
        else:
            unavailable.append(dict(switch="8-bit AdamW", saves_gb=estimate(cur, **opts)["gb"]["adam"] * 0.75,
                                    why="no config key for it yet"))
    if not fits and cur.train.mode == "lora" and memory_switches(cur)[1] is None:
        switch = _switch_on(cur, "fp8")
        if switch:
            fits = add(switch[0], "fp8 storage of the frozen weights, small numeric cost", switch[1])
        else:
            unavailable.append(dict(switch="fp8 frozen weights", saves_gb=estimate(cur, **opts)["gb"]["weights"] / 2,
                                    why="no config key for it yet"))
    if not fits and cur.train.mode == "full":
        half = cur.train.mixed_precision if cur.train.mixed_precision != "no" else "bf16"
        fits = add(f"train.mode=lora model.weight_dtype={half}", "trains a rank-r adapter instead of every weight",
                   _with(_with(cur, "train", mode="lora"), "model", weight_dtype=half))
    if not fits and cur.train.mode == "lora":
        ranks = [r for r in (64, 32, 16, 8) if r < cur.lora.rank]
        hit = first_fit([(_with(cur, "lora", rank=r, alpha=cur.lora.alpha * r / cur.lora.rank), f"lora.rank={r}")
                         for r in ranks])
        if hit:
            fits = add(hit[1], "less adapter capacity (alpha scaled with it)", hit[0])
    bucketed = bool(getattr(cur.data, "buckets", None))  # then the largest bucket, not data.frames, sets it
    learned = tcfg.get("use_learned_positional_embeddings")  # 5B-I2V: a position table for 49 x 480 x 720 only
    i2v_15 = tcfg.get("patch_size_t") and tcfg["in_channels"] == 2 * (tcfg.get("out_channels") or 16)
    if not fits and (bucketed or learned):
        unavailable.append(dict(switch="fewer frames / lower resolution", saves_gb=None,
                                why="the largest data.buckets entry sets the peak: lower its frames or size"
                                if bucketed else "the learned position table is for 49 frames at 480x720 only"))
    if not fits and not (bucketed or learned):
        multiple, _ = frame_rule("1.0" if tcfg.get("patch_size_t") is None else "1.5")
        frames = list(range(cur.data.frames - multiple, 0, -multiple))
        hit = first_fit([(_with(cur, "data", frames=f), f"data.frames={f}") for f in frames])
        if hit:
            fits = add(hit[1], "shorter clips", hit[0])
        elif frames:
            fits = add(f"data.frames={frames[-1]}", "shorter clips", _with(cur, "data", frames=frames[-1]))
    if not fits and not (bucketed or learned):
        sizes = []
        for s in (0.875, 0.75, 0.625, 0.5, 0.375, 0.25):
            h, w = max(16, round(cfg.data.height * s / 16) * 16), max(16, round(cfg.data.width * s / 16) * 16)
            if i2v_15:  # CogVideoX1.5-I2V: the shorter side stays 768, only the longer one may shrink
                short = min(cfg.data.height, cfg.data.width)
                h, w = (short, max(short, w)) if cfg.data.height <= cfg.data.width else (max(short, h), short)
            if (h, w) != (cur.data.height, cur.data.width) and all((h, w) != (c.data.height, c.data.width)
                                                                    for c, _ in sizes):
                sizes.append((_with(cur, "data", height=h, width=w), f"data.height={h} data.width={w}"))
        hit = first_fit(sizes)
        if hit:
            fits = add(hit[1], "lower resolution", hit[0])

    sharded = {}
    base = cfg if cfg.train.gradient_checkpointing else _with(cfg, "train", gradient_checkpointing=True)
    if needed_gb(estimate(base, tcfg=tcfg, device=device)["gb"]["peak"]) > gpu_memory:
        # sharding is worth naming only where checkpointing alone is not enough
        for strategy in ("zero2", "zero3", "fsdp"):
            for n in (2, 4, 8, 16, 32, 64):
                e = estimate(base, strategy=strategy, num_gpus=n, tcfg=tcfg, device=device)
                if needed_gb(e["gb"]["peak"]) <= gpu_memory:
                    sharded[strategy] = dict(num_gpus=n, needs_gb=needed_gb(e["gb"]["peak"]))
                    break
    return dict(gpu_memory_gb=gpu_memory, needs_gb=start, fits=start <= gpu_memory, steps=steps,
                fits_after_steps=bool(steps) and steps[-1]["fits"], unavailable=unavailable, sharded=sharded)


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="recipe YAML (configs/*.yaml)")
    parser.add_argument("--gpu-memory", type=float, default=None, metavar="GB",
                        help="memory of one GPU in GB (1e9 bytes); default: this machine's GPU, if any")
    parser.add_argument("--json", action="store_true", help="print the estimate (and advice) as JSON")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for train.py")


def load(path, overrides=()):
    """(config, transformer config, note): the recipe, validated against the model's shapes (frames, size,
    channels); a hub id that cannot be read is checked and planned with its stand-in preset."""
    from cogpipe.config import load_config, validate_against_model

    cfg = load_config(path, overrides, validate_model=False)
    tcfg, preset = resolve_model(cfg.model)
    validate_against_model(cfg if preset is None else _with(cfg, "model", pretrained=None, preset=preset))
    return cfg, tcfg, _stand_in_note(cfg.model, preset)


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
    from cogpipe.config import ConfigError

    try:
        cfg, tcfg, note = load(args.config, args.overrides)
    except (ConfigError, ValueError) as e:
        print(f"cogpipe plan: {e}", file=sys.stderr)
        return 2
    gpu = args.gpu_memory
    if gpu is None:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_properties(0).total_memory / GB
    e = estimate(cfg, tcfg=tcfg)
    e["model"]["note"] = note
    advice = fit_advice(cfg, gpu, tcfg=tcfg) if gpu else None
    if args.json:
        print(json.dumps(dict(config=str(args.config), estimate=e, advice=advice)))
    else:
        print(f"cogpipe plan: {args.config}")
        print(_fmt_table(e, advice))
    return 0
