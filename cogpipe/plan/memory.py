"""Peak GPU memory of a training step: what autograd keeps per block and outside the blocks, and the estimate
over the phases of a step (weights, optimizer state, activations, gradients), sharded or not."""

from __future__ import annotations

import dataclasses

from cogpipe import family

from .flops import train_flops
from .model import GB, largest_shape, lora_targets, model_stats, per_gpu_shape, resolve_transformer_config

# mixed precision -> bytes of an activation element
_ACT_BYTES = {"bf16": 2, "fp16": 2, "no": 4}
# model.weight_dtype -> bytes of a stored weight
_DTYPE_BYTES = {name: dtype.itemsize for name, dtype in family.DTYPES.items()}
# allowance on top of the allocated peak: CUDA context (~0.5 GB) and allocator fragmentation
RESERVE_GB, RESERVE_FRACTION = 0.75, 0.05
# DeepSpeed's reduce and all-gather buckets at their defaults (5e8 elements each, 16-bit)
DEEPSPEED_BUCKETS = 2 * 5e8 * 2


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


def block_activations(transformer_config: dict, shape: dict, mode: str, policy: dict, lora_rank: int = 0,
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
    heads = transformer_config["num_attention_heads"]
    H = heads * transformer_config["attention_head_dim"]
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
        in_block = [(nm, i, o) for nm, i, o in lora_targets(model_stats(transformer_config)["linears"], target_modules)
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


def outside_activations(transformer_config: dict, shape: dict, mode: str, policy: dict, loss: bool = True) -> int:
    """Bytes kept outside the blocks: the LayerNorm inputs of norm_final and norm_out over the video
    tokens; (full) norm_out's normalized output and proj_out's input; the fp32 RoPE cos/sin tables
    (shared by all blocks); and (loss=True) ~3 fp32 tensors of the latents' size in the loss."""
    B, Sv = shape["batch"], shape["video_tokens"]
    H = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    a, n = policy["act"], policy["norm"]
    Xv = B * Sv * H
    kept = 2 * Xv * n + (Xv * n + Xv * a if mode == "full" else 0)
    if transformer_config.get("use_rotary_positional_embeddings"):
        kept += 2 * Sv * transformer_config["attention_head_dim"] * 4
    latents = B * shape["latent_frames"] * 16 * shape["latent_height"] * shape["latent_width"]
    return kept + (3 * latents * 4 if loss else 0)


def workspace(transformer_config: dict, shape: dict, policy: dict) -> int:
    """Transient peak inside one block's backward: the MLP's two B*S*4H gradient buffers plus an fp32
    B*S*H cast (LoRA inputs, LayerNorm under autocast)."""
    H = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    X = shape["batch"] * shape["tokens"] * H
    return 2 * 4 * X * policy["act"] + 4 * X


# ---------------------------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------------------------

STRATEGIES = ("single", "ddp", "zero2", "zero3", "fsdp")


def estimate(cfg, *, device: str = "cuda", strategy: str = "single", num_gpus: int = 1,
             adam_bytes: int | None = None, frozen_bytes: int | None = None,
             transformer_config: dict | None = None) -> dict:
    """Peak GPU memory (per GPU) of training `cfg`, with and without gradient checkpointing.

    strategy: single | ddp | zero2 | zero3 | fsdp across `num_gpus`. adam_bytes: AdamW state per trainable
    parameter (default from the config: 8, two fp32 moments; 2 with an 8-bit AdamW switch). frozen_bytes:
    storage of a frozen weight (default: model.weight_dtype, 1 with an fp8 switch). device: "cuda" (the
    CUDA autocast policy) or "cpu".
    Returns the parts and totals in GB (1e9 bytes).

    Memory over a step, as training.py runs it (P = transformer parameters, T = trainable ones):
      kept all along   frozen weights (LoRA: P x weight dtype) or fp32 master weights (full: 4P),
                       LoRA weights 4T, AdamW moments 8T (present from the first step on), the EMA 4T
                       with train.ema_decay
      forward end      + autocast's half-precision copies of trained weights (full: 2P; freed when the
                       autocast region exits, but the saved tensors of the backward keep them)
                       + activations: every block's (no checkpointing) or only each block's inputs
      backward         + gradients (4T) fill up while the activations are freed; with checkpointing one
                       block is recomputed at a time, plus a workspace of its backward
      optimizer step   + gradients 4T (training.py's fused AdamW updates in place in one kernel: no sqrt(v)
                       buffer as the foreach implementation's; `cogpipe plan --simulate` measured the difference)
    The peak is the largest of these phases. Sharding divides the kept and trainable parts by N
    (ZeRO-2: gradients and AdamW state; ZeRO-3 and FSDP: weights too, plus one or two gathered blocks;
    DeepSpeed also keeps its communication buckets and runs the module itself in 16-bit).
    train.sequence_parallel S: the activations are those of the tokens one GPU holds (`per_gpu_shape`: all text
    tokens, 1/S of the video tokens); the attention's q, k, v and output are the whole sequence's at heads/S,
    about the same bytes. Sharding still spans all N GPUs (world = DP x SP).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    note = None
    if transformer_config is None:
        transformer_config, note = resolve_transformer_config(cfg.model)
    stats = model_stats(transformer_config)
    shape = largest_shape(cfg, transformer_config)
    sp = getattr(cfg.train, "sequence_parallel", 1)
    if strategy != "single" and num_gpus % sp:
        raise ValueError(f"train.sequence_parallel {sp} does not divide {num_gpus} GPUs")
    local = per_gpu_shape(shape, sp)
    mode, mp = cfg.train.mode, cfg.train.mixed_precision
    policy = precision_policy(mp, device)
    N = max(1, num_gpus) if strategy != "single" else 1
    P, L = stats["params"], transformer_config["num_layers"]
    H = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]

    switched_adam, switched_frozen = memory_switches(cfg)
    adam_bytes = adam_bytes or switched_adam
    layerwise_fp8 = frozen_bytes is None and switched_frozen == 1  # diffusers' layerwise casting: not every weight
    frozen_bytes = frozen_bytes or switched_frozen
    rank = cfg.lora.rank if mode == "lora" else 0
    targets = lora_targets(stats["linears"], cfg.lora.target_modules) if mode == "lora" else []
    T = sum(rank * (i + o) for _, i, o in targets) if mode == "lora" else P
    wdt = _DTYPE_BYTES[cfg.model.weight_dtype] if mode == "lora" else 4
    frozen = P * (frozen_bytes or wdt) if mode == "lora" else 0
    if mode == "lora" and layerwise_fp8:  # norms, embeddings and proj_out keep model.weight_dtype
        frozen = P * wdt - stats["fp8_params"] * (wdt - 1)
    if mode == "lora" and getattr(cfg.model, "quantize_frozen", "none") == "int8":  # the blocks' Linears in 1 byte
        frozen -= L * stats["block_linear_params"] * ((frozen_bytes or wdt) - 1)
    swapped = min(getattr(cfg.train, "blocks_to_swap", 0), L) if mode == "lora" else 0
    host = 0
    if swapped:  # offload.py: their frozen weights in host memory, at most two of them on the GPU at a time
        per_block = frozen / P * stats["block_params"]
        host += swapped * per_block
        frozen -= max(0, swapped - 2) * per_block
    buffers = stats["buffers"] * wdt  # position tables (2B sincos, 5B-I2V learned), cast with the model
    master, grads, adam = 4 * T, 4 * T, adam_bytes * T
    ema = 4 * T if cfg.train.ema_decay > 0 else 0  # fp32 copy of the trained weights, beside them on the GPU
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
            frozen, half_module, ema = frozen / N, half_module / N, ema / N
            gathered += 2 * stats["block_params"] * 2  # the running block and the prefetched one, 16-bit
    elif strategy == "fsdp":  # full shard
        frozen, master, grads, adam, ema = frozen / N, master / N, grads / N, adam / N, ema / N
        gathered = 2 * stats["block_params"] * (4 if mode == "full" else wdt)
        copies = copies / L  # only the gathered block's weights are cast at a time

    blk = block_activations(transformer_config, local, mode, policy, rank, cfg.lora.target_modules)
    block = sum(blk.values())
    outside = outside_activations(transformer_config, local, mode, policy)
    work = workspace(transformer_config, local, policy)
    ckpt_inputs = L * local["batch"] * local["tokens"] * H * policy["act"]  # hidden + text states per block
    if getattr(cfg.train, "activation_offload", False) and cfg.train.gradient_checkpointing:
        host += ckpt_inputs  # offload.py: in host memory, one block's back on the GPU while it is recomputed
        ckpt_inputs = ckpt_inputs / L

    kept = frozen + buffers + master + half_module + adam + ema + gathered
    no_ckpt = kept + max(copies + L * block + outside + work, grads)
    with_ckpt = kept + max(copies + ckpt_inputs + outside,
                           max(ckpt_inputs + outside, grads) + block + work + copies / L,
                           grads)
    chosen = with_ckpt if cfg.train.gradient_checkpointing else no_ckpt
    return dict(
        model=dict(version=family.version(transformer_config), i2v=family.is_i2v(transformer_config), layers=L,
                   hidden=H,
                   heads=transformer_config["num_attention_heads"], params=P, note=note),
        shape=shape, sequence_parallel=sp, tokens_per_gpu=local["tokens"], mode=mode, lora_rank=rank or None,
        trainable_params=T,
        weight_dtype=cfg.model.weight_dtype if mode == "lora" else "fp32", mixed_precision=mp,
        gradient_checkpointing=cfg.train.gradient_checkpointing, strategy=strategy, num_gpus=N, device=device,
        gb=dict(
            weights=(frozen + buffers + half_module + (master if mode == "full" else 0)) / GB,
            trainable_params=(master if mode == "lora" else 0) / GB,
            grads=grads / GB, adam=adam / GB, ema=ema / GB,
            autocast_weight_copies=copies / GB, gathered_blocks=gathered / GB,
            activations_one_block=block / GB, activations_all_blocks=L * block / GB,
            checkpointed_inputs=ckpt_inputs / GB, outside_blocks=outside / GB, backward_workspace=work / GB,
            activations_without_checkpointing=(L * block + outside + work) / GB,
            activations_with_checkpointing=(ckpt_inputs + outside + block + work) / GB,
            peak_without_checkpointing=no_ckpt / GB, peak_with_checkpointing=with_ckpt / GB, peak=chosen / GB,
            host_offloaded=host / GB,
            vae_and_text_encoder=0.0),
        block_items_gb={k: v / GB for k, v in blk.items()},
        flops_per_step=train_flops(transformer_config, shape, mode, rank, cfg.lora.target_modules),
    )


def needed_gb(peak_gb: float) -> float:
    """GPU memory a run with this allocated peak needs: + CUDA context and allocator slack."""
    return peak_gb * (1 + RESERVE_FRACTION) + RESERVE_GB


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
