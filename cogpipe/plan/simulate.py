"""`cogpipe plan --simulate`: a recipe's real training step run on the meta device and measured.

The recipe's real `CogVideoXTransformer3DModel` is built at its real size on the meta device (tensors carry shape
and dtype, no storage) with the recipe's switches (LoRA or full, weight dtype, fp8 or int8 storage, gradient
checkpointing, the low-VRAM switches of cogpipe/offload.py, the optimizer), and cogpipe's own step runs on it:
`diffusion.model_inputs`, the forward under mixed precision, `diffusion.diffusion_loss`, backward, gradient
clipping and the optimizer step, as cogpipe/training.py runs them. torch's `MemTracker` records every tensor that
step creates, frees and keeps, by category; the peak of the meta device stands for the GPU's
`max_memory_allocated`, and what cogpipe/offload.py keeps in host memory is counted as such.

What stands in for a GPU's kernels, and why:

- attention: SDPA's math kernel (the only one a meta or CPU tensor has) would allocate the sequence x sequence
  score matrix, which no GPU kernel allocates. `FlashAttentionMemory` has flash attention's memory: it keeps q, k,
  v, the output and the fp32 log-sum-exp for the backward, and its backward returns dq, dk, dv.
- autocast: torch.autocast does not run on meta tensors. `CudaAutocast` casts as CUDA autocast does, above
  autograd as autocast does: matmuls and convolutions in the half dtype (casts of trained weights cached for the
  forward, as autocast caches them), LayerNorm/GroupNorm/softmax and the MSE loss in fp32.
- 8-bit AdamW: bitsandbytes has no meta kernels; `AdamW8bitMemory` keeps bitsandbytes' state (two uint8 moments
  and an fp32 absmax per 256-element block) and allocates the gradient-sized temporary its kernel does not.
- the optimizer state exists before the measured step (the steady state: every step after the first).

The simulation is of one process. Sharded launchers are accounted from its peak categories (`per_rank`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
import weakref

import torch
from torch.overrides import TorchFunctionMode

from cogpipe import family, offload
from cogpipe.diffusion import RotaryTables, diffusion_loss, model_inputs, padded_frames

from .memory import needed_gb
from .model import largest_shape, resolve_transformer_config

GiB = 2 ** 30

# ---------------------------------------------------------------------------------------------------------------
# stand-ins for the GPU's kernels
# ---------------------------------------------------------------------------------------------------------------


class FlashAttentionMemory(torch.autograd.Function):
    """Attention with flash attention's memory and no arithmetic: the output is uninitialised. Saved for the
    backward: q, k, v, the output and the fp32 log-sum-exp (B, heads, S); the backward returns dq, dk, dv and holds
    an fp32 dq accumulator while it runs (flash attention 2's)."""

    @staticmethod
    def forward(ctx, q, k, v):  # (B, heads, S, d) each
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        accumulator = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dq = torch.empty_like(q)
        del accumulator
        return dq, torch.empty_like(k), torch.empty_like(v)


def _attention_stand_in(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    if attn_mask is not None:
        raise NotImplementedError("the attention stand-in has no mask; CogVideoX trains without one")
    return FlashAttentionMemory.apply(query, key, value)


def _functions(*names):
    import torch.nn.functional as F  # noqa: N812

    found = set()
    for name in names:
        for owner in (F, torch, torch.Tensor):
            if hasattr(owner, name):
                found.add(getattr(owner, name))
    return found


class CudaAutocast(TorchFunctionMode):
    """CUDA autocast's casts for meta tensors (torch.autocast refuses the meta device), and SDPA replaced by
    `FlashAttentionMemory`. `half`: the lower dtype (None: no autocast, only the attention stand-in). Casts of
    trained leaf tensors (weights) are cached while `caching` is on (the forward), as autocast caches them."""

    _HALF = _functions("linear", "matmul", "mm", "bmm", "baddbmm", "addmm", "addbmm", "conv1d", "conv2d", "conv3d",
                       "__matmul__")
    _FP32 = _functions("layer_norm", "group_norm", "softmax", "log_softmax", "mse_loss", "logsumexp")

    def __init__(self, half: torch.dtype | None):
        super().__init__()
        self.half, self.caching, self._cache = half, False, {}
        import torch.nn.functional as F  # noqa: N812

        self._sdpa = F.scaled_dot_product_attention

    def _cast(self, x, dtype):
        if not (isinstance(x, torch.Tensor) and x.is_floating_point()) or x.dtype in (dtype, torch.float64):
            return x
        if x.dtype.itemsize == 1:  # fp8 storage: diffusers' layerwise casting hooks cast it first
            return x
        if self.caching and x.is_leaf and x.requires_grad:
            key = id(x)
            if key not in self._cache:
                self._cache[key] = (weakref.ref(x), x.to(dtype))
            return self._cache[key][1]
        return x.to(dtype)

    def end_forward(self):
        self.caching, self._cache = False, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is self._sdpa:
            if self.half is not None:
                args = tuple(self._cast(a, self.half) for a in args)
            return _attention_stand_in(*args, **kwargs)
        if self.half is not None and func in self._HALF:
            args = tuple(self._cast(a, self.half) for a in args)
            kwargs = {k: self._cast(v, self.half) for k, v in kwargs.items()}
        elif self.half is not None and func in self._FP32:
            args = tuple(self._cast(a, torch.float32) for a in args)
            kwargs = {k: self._cast(v, torch.float32) for k, v in kwargs.items()}
        return func(*args, **kwargs)


class AdamW8bitMemory(torch.optim.Optimizer):
    """bitsandbytes' AdamW8bit as memory (no arithmetic): per parameter two uint8 moments and one fp32 absmax per
    256-element block each (blockwise quantization), and during the step the fp32 update of one parameter."""

    def __init__(self, params, **kwargs):
        super().__init__(params, dict(lr=1e-3))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    blocks = (p.numel() + 255) // 256
                    state["state1"] = torch.empty(p.shape, dtype=torch.uint8, device=p.device)
                    state["state2"] = torch.empty(p.shape, dtype=torch.uint8, device=p.device)
                    state["absmax1"] = torch.empty(blocks, dtype=torch.float32, device=p.device)
                    state["absmax2"] = torch.empty(blocks, dtype=torch.float32, device=p.device)
                update = torch.empty(p.shape, dtype=torch.float32, device=p.device)
                del update


# ---------------------------------------------------------------------------------------------------------------
# the tracker
# ---------------------------------------------------------------------------------------------------------------


def _first_gradient_hook(register, tensors, fn, mode="all"):
    """register_multi_grad_hook as ModTracker's backward bookkeeping uses it, in mode "any" (see Tracker)."""
    if mode == "any":
        return register(tensors, fn, mode="any")
    return register(tensors, lambda grad: fn([grad]), mode="any")


def _tracker_class():
    from torch.distributed._tools import mod_tracker
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType, _UpdateType

    class Tracker(MemTracker):
        """torch's MemTracker, with four changes: gradient hooks only on trained parameters (it registers them on
        every parameter, which a frozen one refuses); only the whole-step peak is kept (not each module's, which
        costs a pass over every module at every operation); tensors `to_host` names are counted on the CPU; and
        its module tracker's backward hooks fire on a module's first input gradient instead of holding each one
        until all have arrived (mode "any" of register_multi_grad_hook, not "all"): in a full fine-tune every
        block takes the time embedding, whose gradient is complete only after the last block's backward, so the
        tracker itself would keep a hidden-state gradient a block alive, memory no real run holds."""

        def __init__(self):
            super().__init__()
            self._host_winfos = weakref.WeakSet()

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            memory = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
            if install_grad_hooks:
                for param in module.parameters():
                    if not param.requires_grad or self._param_to_grad_hook_handles.get(param) is not None:
                        continue

                    def grad_hook(grad):
                        self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

                    self._param_to_grad_hook_handles[param] = (
                        param.register_hook(grad_hook),
                        param.register_post_accumulate_grad_hook(lambda p: grad_hook(p.grad)))
            return memory

        def __enter__(self):
            if self._depth == 0:
                self._patched = mod_tracker.register_multi_grad_hook
                mod_tracker.register_multi_grad_hook = functools.partial(_first_gradient_hook, self._patched)
            return super().__enter__()

        def __exit__(self, *args):
            super().__exit__(*args)
            if self._depth == 0:
                mod_tracker.register_multi_grad_hook = self._patched

        def _update_peak_stats(self, peak_state) -> None:
            for dev, snap in self._curr_mem_snap.items():
                total = snap["Total"]
                if self._peak_mem.get(dev, 0) < total:
                    self._peak_mem[dev] = total
                    self._peak_mem_snap[dev] = dict(snap)

        def to_host(self, tensor: torch.Tensor, kind: str = "activation") -> None:
            """Count `tensor` as host memory (the CPU side of a meta simulation), a parameter or an activation."""
            from torch.distributed._tools.common_utils import get_untyped_storages

            reftype = _MemRefType.PARAM if kind == "parameter" else _MemRefType.ACT
            self._update_and_maybe_create_winfos(tensor, reftype)
            for st in get_untyped_storages(tensor):
                winfo, _ = self._WINFO[st]
                if winfo.device.type == "cpu":
                    continue
                if winfo.mem_consumed > 0:
                    self._update_snap(_UpdateType.DEL, winfo)
                winfo.device = torch.device("cpu")
                if winfo.mem_consumed > 0:
                    self._update_snap(_UpdateType.ADD, winfo)
            self._update_peak_stats(None)

        def fetched(self, weight: torch.Tensor) -> None:
            """A weight brought to the device by the block swap: counted as a parameter, not an activation."""
            self._update_and_maybe_create_winfos(weight, _MemRefType.PARAM)

        def categories(self, device: str, kind: str = "peak") -> dict:
            snap = self.get_tracker_snapshot(kind)
            for dev, values in snap.items():
                if dev.type == device:
                    return {str(getattr(k, "value", k)): v for k, v in values.items()}
            return {}

    return Tracker


# ---------------------------------------------------------------------------------------------------------------
# the simulation
# ---------------------------------------------------------------------------------------------------------------

_NAMES = {"Parameter": "parameters", "Buffer": "buffers", "Gradient": "gradients", "Activation": "activations",
          "Temp": "temporaries", "Optstate": "optimizer_state", "Other": "inputs", "Total": "total"}


def _gib(values: dict) -> dict:
    return {_NAMES.get(k, k): round(v / GiB, 3) for k, v in values.items()}


def build_meta_model(cfg, transformer_config: dict, observer=None, context_fn=None):
    """The recipe's transformer on the meta device, with its switches, as training.py sets it up (the order of
    cogpipe/training.py's _prepare_model): dtype, fp8 or int8 storage, LoRA, gradient checkpointing, offload."""
    from diffusers import CogVideoXTransformer3DModel

    lora = cfg.train.mode == "lora"
    weight_dtype = family.DTYPES[cfg.model.weight_dtype]
    with torch.device("meta"):
        model = CogVideoXTransformer3DModel(**transformer_config)
    # torch's own cast: diffusers' ModelMixin.to warns on every dtype cast of a class that lists its float32 modules,
    # even an empty list (CogVideoX's), once per simulation; there is nothing to keep in float32 here
    model = torch.nn.Module.to(model, weight_dtype if lora else torch.float32)
    offload.make_trainable(model, cfg)
    if cfg.train.gradient_checkpointing:
        model.enable_gradient_checkpointing(
            gradient_checkpointing_func=functools.partial(offload.checkpoint, context_fn=context_fn))
    swapper = offload.apply(model, cfg.train, torch.device("meta"), host=torch.device("meta"), observer=observer,
                            context_fn=context_fn)
    return model, swapper


def _make_optimizer(cfg, params):
    if cfg.train.optimizer == "adamw8bit":
        return AdamW8bitMemory(params)
    # training.py runs fused AdamW on a GPU: one kernel, no temporaries of the foreach implementation (an sqrt(v)
    # buffer the size of every trained weight). Fused has no meta kernel; the single-tensor implementation stands
    # in: its temporaries are one parameter's at a time.
    t = cfg.train
    return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps, weight_decay=t.weight_decay,
                             foreach=False, fused=False)


def simulate(cfg, transformer_config: dict | None = None) -> dict:
    """Peak memory of one training step of `cfg` (one process, the largest clip shape), by category, in GiB.

    Returns dict(peak_allocated_gib, categories (the device's at its peak), host_peak_gib, host_categories,
    shape, seconds, ...)."""
    if transformer_config is None:
        transformer_config, _ = resolve_transformer_config(cfg.model)
    shape = largest_shape(cfg, transformer_config)
    start = time.perf_counter()
    tracker = _tracker_class()()
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision)
    autocast = CudaAutocast(half)
    model, swapper = build_meta_model(cfg, transformer_config, observer=tracker,
                                      context_fn=lambda: (contextlib.nullcontext(), autocast))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _make_optimizer(cfg, params)
    for p in params:  # the steady state: AdamW's moments exist before the step (created by the first one)
        p.grad = torch.empty_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    B, device = shape["batch"], torch.device("meta")
    channels = family.LATENT_CHANNELS
    latent = (B, shape["latent_frames"], channels, shape["latent_height"], shape["latent_width"])
    if transformer_config.get("patch_size_t"):  # model_inputs pads; the cache holds the unpadded count
        latent = (B, (shape["frames"] - 1) // family.VAE_TEMPORAL + 1, *latent[2:])
    cache_dtype = torch.bfloat16  # the latent cache's dtype beside a GPU (devices.encoder_dtype)
    scheduler_alphas = torch.empty(1000, dtype=torch.float32, device=device)
    input_dtype = half or (family.DTYPES[cfg.model.weight_dtype] if cfg.train.mode == "lora" else torch.float32)
    rotary = RotaryTables(transformer_config)
    tracker.track_external(model, optimizer)
    with tracker:
        x0 = torch.empty(latent, dtype=cache_dtype, device=device)
        # the noise has the padded frame count (1.5: fresh noise in the padding frame), as batches.draw_batch draws it
        noise = torch.empty((B, padded_frames(latent[1], transformer_config.get("patch_size_t")), *latent[2:]),
                            dtype=cache_dtype, device=device)
        prompt = torch.empty(B, transformer_config["max_text_seq_length"], transformer_config["text_embed_dim"],
                             dtype=cache_dtype, device=device)
        image = torch.empty(latent, dtype=cache_dtype, device=device) if family.is_i2v(transformer_config) else None
        timesteps = torch.zeros(B, dtype=torch.long, device=device)
        inputs = model_inputs(x0, noise, timesteps, prompt, image, transformer_config=transformer_config,
                              alphas_cumprod=scheduler_alphas, rotary=rotary, dtype=input_dtype)
        del x0, noise, prompt, image
        with autocast:
            autocast.caching = True
            v_pred = model(**inputs.kwargs)[0]
            autocast.end_forward()
            loss = diffusion_loss(v_pred, inputs.target)
            del v_pred, inputs
            loss.backward()
            del loss
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    gpu, host = tracker.categories("meta"), tracker.categories("cpu")
    result = dict(
        peak_allocated_gib=round(gpu.get("Total", 0) / GiB, 3), categories=_gib(gpu),
        host_peak_gib=round(host.get("Total", 0) / GiB, 3), host_categories=_gib(host),
        peak_allocated_bytes=gpu.get("Total", 0), host_peak_bytes=host.get("Total", 0),
        category_bytes={_NAMES.get(k, k): v for k, v in gpu.items()},
        host_category_bytes={_NAMES.get(k, k): v for k, v in host.items()},
        mode=cfg.train.mode, lora_rank=cfg.lora.rank if cfg.train.mode == "lora" else None,
        weight_dtype=cfg.model.weight_dtype if cfg.train.mode == "lora" else "fp32",
        mixed_precision=cfg.train.mixed_precision, gradient_checkpointing=cfg.train.gradient_checkpointing,
        optimizer=cfg.train.optimizer, fp8_frozen=cfg.model.fp8_frozen, quantize_frozen=cfg.model.quantize_frozen,
        blocks_to_swap=cfg.train.blocks_to_swap, activation_offload=cfg.train.activation_offload,
        shape=dict(batch=B, frames=shape["frames"], height=shape["height"], width=shape["width"],
                   tokens=shape["tokens"]),
        pcie_bytes_per_step=swapper.bytes_per_step() if swapper is not None else 0,
        seconds=round(time.perf_counter() - start, 1))
    return result


# ---------------------------------------------------------------------------------------------------------------
# sharded launchers, from the simulation's categories
# ---------------------------------------------------------------------------------------------------------------


def per_rank(sim: dict, strategy: str, num_gpus: int, block_param_gib: float = 0.0) -> dict:
    """One rank's share of a simulated peak under a launcher, from the peak's categories (GiB):

        ddp          everything, plus a gradient-sized bucket (gradient_as_bucket_view is off)
        zero2        gradients and optimizer state / N
        zero3, fsdp  parameters, gradients and optimizer state / N, plus two gathered blocks (the running one
                     and the prefetched one: `block_param_gib` each)
    Activations and temporaries are a rank's own (data parallel: each rank runs its own batch). This divides the
    categories at the single-process peak; the sharded step's own peak may fall at another moment, so it is an
    estimate built on the simulation, not a simulation of the sharded step."""
    c, n = dict(sim["categories"]), max(1, num_gpus)
    if strategy == "ddp" and n > 1:
        c["gradients"] = c.get("gradients", 0) * 2
    if strategy in ("zero2", "zero3", "fsdp"):
        c["gradients"] = c.get("gradients", 0) / n
        c["optimizer_state"] = c.get("optimizer_state", 0) / n
    if strategy in ("zero3", "fsdp"):
        c["parameters"] = c.get("parameters", 0) / n + 2 * block_param_gib
    total = sum(v for k, v in c.items() if k != "total")
    return dict(strategy=strategy, num_gpus=n, peak_allocated_gib=round(total, 3),
                categories={k: round(v, 3) for k, v in c.items() if k != "total"})


def dumps(result: dict) -> str:
    return json.dumps(result)


def with_overrides(cfg, **sections):
    """`cfg` with fields replaced: with_overrides(cfg, train=dict(blocks_to_swap=36))."""
    return dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s), **v) for s, v in sections.items()})


# ---------------------------------------------------------------------------------------------------------------
# which switches make a recipe fit, measured
# ---------------------------------------------------------------------------------------------------------------

PCIE_BYTES_PER_S = 25e9  # what a PCIe 4.0 x16 link moves in practice, one way


def _needed_gb(peak_bytes: int) -> float:
    return needed_gb(peak_bytes / 1e9)


def simulated_advice(cfg, transformer_config: dict, gpu_memory: float, log=None) -> dict:
    """The low-VRAM switches that make `cfg` fit a GPU of `gpu_memory` GB (1e9 bytes; allocated peak + the CUDA
    context and allocator slack of `needed_gb`), each simulated, added cheapest first until it fits:

      train.activation_offload=true        the block inputs to host memory (costs PCIe time: out and back)
      model.fp8_frozen=true / model.quantize_frozen=int8 (LoRA)   frozen weights in 1 byte (small numeric cost)
      train.optimizer=adamw8bit (full)     8-bit AdamW state
      train.blocks_to_swap=N (LoRA)        the fewest blocks that fit: N from the measured per-block bytes, then
                                           simulated (costs PCIe time: each swapped block fetched twice a step)
    Each step's cost in step time is its bytes over PCIe a step at PCIE_BYTES_PER_S, an upper bound: the copies run
    on a side stream, hidden behind compute where the compute takes longer."""
    log = log or (lambda *_: None)
    steps, cur, overrides = [], cfg, []

    def measure(c, label, extra):
        sim = simulate(c, transformer_config)
        needs = _needed_gb(sim["peak_allocated_bytes"])
        pcie = sim["pcie_bytes_per_step"]
        step = dict(switch=label, overrides=list(extra), peak_allocated_gib=sim["peak_allocated_gib"],
                    host_peak_gib=sim["host_peak_gib"], needs_gb=round(needs, 2), fits=needs <= gpu_memory,
                    pcie_gb_per_step=round(pcie / 1e9, 2), pcie_seconds_per_step=round(pcie / PCIE_BYTES_PER_S, 3))
        log(step)
        return step, sim

    first, sim = measure(cur, "as configured", [])
    steps.append(first)
    lora = cfg.train.mode == "lora"
    ladder = [(dict(train=dict(activation_offload=True)), "train.activation_offload=true")]
    if lora and cfg.model.weight_dtype != "fp32" and not cfg.model.fp8_frozen and cfg.model.quantize_frozen == "none":
        ladder.append((dict(model=dict(fp8_frozen=True)), "model.fp8_frozen=true"))
    elif lora and not cfg.model.fp8_frozen and cfg.model.quantize_frozen == "none":
        ladder.append((dict(model=dict(quantize_frozen="int8")), "model.quantize_frozen=int8"))
    if not lora and cfg.train.optimizer != "adamw8bit":
        ladder.append((dict(train=dict(optimizer="adamw8bit")), "train.optimizer=adamw8bit"))
    for change, label in ladder:
        if steps[-1]["fits"]:
            break
        if label.startswith("train.activation_offload") and cur.train.activation_offload:
            continue
        if not cur.train.gradient_checkpointing:
            cur, overrides = with_overrides(cur, train=dict(gradient_checkpointing=True)), overrides + [
                "train.gradient_checkpointing=true"]
        cur, overrides = with_overrides(cur, **change), overrides + [label]
        step, sim = measure(cur, label, overrides)
        steps.append(step)
    if lora and not steps[-1]["fits"]:
        layers = transformer_config["num_layers"]
        block = _block_frozen_bytes(cur, transformer_config)
        over = steps[-1]["needs_gb"] - gpu_memory  # GB to save
        n = min(layers, max(1, int(over * 1e9 / 1.05 / block) + 3))  # + the two swapped blocks kept on the GPU
        while True:
            label = f"train.blocks_to_swap={n}"
            step, sim = measure(with_overrides(cur, train=dict(blocks_to_swap=n)), label, overrides + [label])
            steps.append(step)
            if step["fits"] or n == layers:
                break
            n = min(layers, n + max(1, layers // 8))
    return dict(gpu_memory_gb=gpu_memory, fits=steps[0]["fits"], steps=steps, fits_after_steps=steps[-1]["fits"],
                pcie_bytes_per_s=PCIE_BYTES_PER_S)


def _block_frozen_bytes(cfg, transformer_config: dict) -> int:
    """Bytes of one block's frozen weights as `cfg` stores them (from a meta build)."""
    model, _ = build_meta_model(with_overrides(cfg, train=dict(blocks_to_swap=0, activation_offload=False)),
                                transformer_config)
    block = model.transformer_blocks[0]
    return sum(t.numel() * t.element_size() for p in block.parameters() if not p.requires_grad
               for t in offload.parts(p).values())


def format_simulation(sim: dict, per_rank_rows=()) -> str:
    c, h = sim["categories"], sim["host_categories"]
    s = sim["shape"]
    lines = [f"simulated step: batch {s['batch']} x {s['frames']} frames x {s['height']}x{s['width']} "
             f"({s['tokens']:,} tokens), {sim['mode']}, {sim['seconds']:.0f} s to simulate",
             f"{'GiB (2**30 bytes) at the peak':34s} {'GPU':>8s} {'host':>8s}"]
    for key in ("parameters", "buffers", "gradients", "optimizer_state", "activations", "temporaries", "inputs"):
        lines.append(f"{key:34s} {c.get(key, 0):8.2f} {h.get(key, 0):8.2f}")
    lines.append(f"{'peak allocated':34s} {sim['peak_allocated_gib']:8.2f} {sim['host_peak_gib']:8.2f}")
    if sim["pcie_bytes_per_step"]:
        lines.append(f"PCIe traffic a step: {sim['pcie_bytes_per_step'] / 1e9:.2f} GB "
                     f"(<= {sim['pcie_bytes_per_step'] / PCIE_BYTES_PER_S:.2f} s at {PCIE_BYTES_PER_S / 1e9:.0f} GB/s)")
    for r in per_rank_rows:
        lines.append(f"  {r['strategy']} on {r['num_gpus']} GPUs: {r['peak_allocated_gib']:.2f} GiB a rank")
    return "\n".join(lines)


def format_advice(advice: dict) -> str:
    lines = [f"switches for {advice['gpu_memory_gb']:g} GB (simulated, cheapest first, each added to the last):"]
    for st in advice["steps"]:
        mark = "fits" if st["fits"] else "    "
        cost = f", PCIe {st['pcie_gb_per_step']:.1f} GB/step (<= {st['pcie_seconds_per_step']:.2f} s)" \
            if st["pcie_gb_per_step"] else ""
        lines.append(f"  {mark}  {st['switch']:32s} peak {st['peak_allocated_gib']:6.2f} GiB, needs "
                     f"{st['needs_gb']:6.1f} GB, host {st['host_peak_gib']:.1f} GiB{cost}")
    if not advice["fits_after_steps"]:
        lines.append("  none of these fits; see the formula's advice without --simulate (rank, frames, size, GPUs)")
    else:
        lines.append("  overrides: " + " ".join(advice["steps"][-1]["overrides"]))
    return "\n".join(lines)
