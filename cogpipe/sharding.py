"""What differs between the launchers (configs/accelerate/: DDP, DeepSpeed ZeRO-2/3, FSDP), in one place.

    DeepSpeed    the engine steps inside its own backward: the recipe's micro-batch, accumulation and clipping
                 go into its config before `prepare` (accelerate would take them from a dataloader this loop
                 does not use, and clip at 1.0); inputs go in the engine's dtype (it runs the module in bf16/fp16
                 itself, autocast does nothing); a non-finite window is discarded by ZeRO's own overflow check
                 (`engine.was_step_applied()` says so on every rank alike); LoRA checkpoints leave the frozen
                 weights out; only trainable weights are gathered for `trainable.safetensors`.
    FSDP         trainable weights are gathered from the shards with a full state dict (every rank takes part).
    ZeRO-3/FSDP  parameters are shards: the EMA keeps a shard beside each, gathered only to be saved.
"""

from __future__ import annotations

import os

import torch

from cogpipe import models
from cogpipe.weights import materialize, open_state_dict


def allow_cpu_deepspeed() -> None:
    """DeepSpeed ZeRO on CPU processes (DS_ACCELERATOR=cpu, gloo): how the launcher tests run ZeRO-2/3 without a
    GPU, and a way to debug a sharded recipe on a laptop. accelerate joins DeepSpeed's process group there but
    finds no backend of its own for a machine without an accelerator, and so counts one process; telling it the
    backend is gloo (what DeepSpeed's CPU accelerator uses) makes it count the ranks. No effect where CUDA exists or
    DS_ACCELERATOR is not "cpu"."""
    if os.environ.get("DS_ACCELERATOR") != "cpu" or torch.cuda.is_available():  # also set for FSDP on CPUs
        return
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    original = PartialState._prepare_backend
    if getattr(original, "_cogpipe_cpu_deepspeed", False):
        return

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        chosen, distributed_type = original(self, cpu, sagemaker_dp, backend)
        sharded = any(os.environ.get(f"ACCELERATE_USE_{k}", "false").lower() == "true" for k in ("DEEPSPEED", "FSDP"))
        if chosen is None and sharded and int(os.environ.get("LOCAL_RANK", -1)) != -1:
            return "gloo", DistributedType.MULTI_CPU
        return chosen, distributed_type

    prepare_backend._cogpipe_cpu_deepspeed = True
    PartialState._prepare_backend = prepare_backend


def weights_from_main_process() -> bool:
    """True on every process but the first of an FSDP launch with fsdp_cpu_ram_efficient_loading: there the
    pretrained transformer is built with its parameters on the meta device (nothing read from disk) and
    accelerate broadcasts the first process's weights into each shard, so a machine holds one copy in host RAM."""
    return (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
            and os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() in ("true", "1")
            and int(os.environ.get("RANK", "0")) != 0)


def kind(accelerator) -> str:
    """ "deepspeed" | "fsdp" | "ddp" (one process included)."""
    from accelerate.utils import DistributedType

    t = accelerator.distributed_type
    return "deepspeed" if t == DistributedType.DEEPSPEED else "fsdp" if t == DistributedType.FSDP else "ddp"


def zero_stage(accelerator) -> int:
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.zero_stage) if plugin is not None else 0


def configure(accelerator, train_cfg) -> None:
    """Before `prepare`: the recipe's micro-batch, accumulation and clipping in DeepSpeed's config."""
    if kind(accelerator) != "deepspeed":
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = train_cfg.batch_size
    config["gradient_accumulation_steps"] = train_cfg.grad_accum
    config["train_batch_size"] = train_cfg.batch_size * train_cfg.grad_accum * accelerator.num_processes
    config["gradient_clipping"] = train_cfg.max_grad_norm


def engine(accelerator):
    """The DeepSpeed engine after `prepare`, else None."""
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    return wrapped.engine if wrapped is not None else None


def input_dtype(accelerator, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype the prepared model takes its inputs in: DeepSpeed's module dtype (bf16/fp16 when its mixed
    precision is on), else the frozen base's (autocast casts inside)."""
    e = engine(accelerator)
    if e is None:
        return weight_dtype
    return torch.bfloat16 if e.bfloat16_enabled() else torch.float16 if e.fp16_enabled() else torch.float32


def deepspeed_update(accelerator, loss: torch.Tensor) -> tuple[bool, float | None] | None:
    """Backward (and, at the accumulation boundary, the update) through the DeepSpeed engine; None off DeepSpeed.
    Returns (applied, grad norm) at a boundary, (True, None) between: ZeRO skips an update whose gradients are not
    finite and clears them, the same on every rank."""
    e = engine(accelerator)
    if e is None:
        return None
    e.set_gradient_accumulation_boundary(accelerator.sync_gradients)
    e.backward(loss)
    if not accelerator.sync_gradients:
        return True, None
    e.step()
    norm = e.get_global_grad_norm()
    return e.was_step_applied(), float(norm) if norm is not None else None


def save_state_kwargs(accelerator, mode: str) -> dict:
    """accelerate.save_state keyword arguments: DeepSpeed leaves a LoRA's frozen weights out of its checkpoint."""
    return {"exclude_frozen_parameters": True} if kind(accelerator) == "deepspeed" and mode == "lora" else {}


def load_state_kwargs(accelerator, mode: str) -> dict:
    """accelerate.load_state keyword arguments matching save_state_kwargs (the frozen weights come from the base)."""
    return {"load_module_strict": False} if kind(accelerator) == "deepspeed" and mode == "lora" else {}


def end_sharded_setup() -> None:
    """After training: forget the ZeRO-3 config accelerate registered with transformers, so single-process work
    (the export and render on the main process) loads models plainly instead of partitioning them with
    collectives the other, finished, processes would never join."""
    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    except ImportError:
        return
    unset_hf_deepspeed_config()


def trainable_state_dict(accelerator, model, names: list[str]) -> dict[str, torch.Tensor] | None:
    """Full copies of the trainable weights `names` on the main process (None on the others); every process
    calls it. DeepSpeed: each parameter's fp32 master, gathered one at a time (ZeRO-3 shards included), never the
    frozen base; FSDP: the full state dict, gathered on the main process; DDP: the parameters as they are."""
    unwrapped = accelerator.unwrap_model(model)
    main = accelerator.is_main_process
    if kind(accelerator) == "deepspeed":
        from deepspeed.utils import safe_get_full_fp32_param

        params = dict(unwrapped.named_parameters())
        out = {}
        for name in names:
            full = safe_get_full_fp32_param(params[name])  # a collective: every process, same order
            if main:
                out[name] = full.detach().cpu().clone()
        return out if main else None
    if kind(accelerator) == "fsdp":
        state = accelerator.get_state_dict(model)  # a collective; full weights on the main process
        return {clean_name(n): t for n, t in state.items() if clean_name(n) in set(names)} if main else None
    return {n: p.detach() for n, p in unwrapped.named_parameters() if n in set(names)}


def clean_name(name: str) -> str:
    """A parameter name as the plain model has it (FSDP and activation checkpointing insert wrapper names)."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def zero3_full_fine_tune(accelerator, model_cfg) -> bool:
    """Whether the transformer is built partitioned (ZeRO-3 init): a full fine-tune of a pretrained model under
    ZeRO-3, where every process holding the whole fp32 model would take 4 bytes a parameter of host RAM per GPU."""
    return kind(accelerator) == "deepspeed" and zero_stage(accelerator) == 3 and bool(model_cfg.pretrained)


def zero3_transformer(accelerator, model_cfg, train_cfg):
    """The pretrained transformer built under deepspeed.zero.Init (each process allocates only its shard of every
    parameter) and filled module by module from the first process, which reads the weights lazily one module at a
    time: host RAM stays at a shard per process plus one module. Buffers (position tables) load on every process."""
    import deepspeed
    from diffusers import CogVideoXTransformer3DModel

    configure(accelerator, train_cfg)  # zero.Init reads the (complete) DeepSpeed config
    config = models.read_component_config(model_cfg.pretrained, "transformer")
    with deepspeed.zero.Init(config_dict_or_path=accelerator.state.deepspeed_plugin.deepspeed_config):
        model = CogVideoXTransformer3DModel.from_config(config)
    source = open_state_dict(models.pretrained_folder(model_cfg.pretrained, ["transformer"]) / "transformer")
    main = accelerator.is_main_process
    for prefix, module in model.named_modules():
        params = list(module.named_parameters(recurse=False))
        if params:
            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0):
                if main:
                    for name, p in params:
                        p.data.copy_(materialize(source[f"{prefix}.{name}" if prefix else name]).to(p.dtype))
        for name, b in module.named_buffers(recurse=False):
            key = f"{prefix}.{name}" if prefix else name
            if key in source:
                b.copy_(materialize(source[key]).to(b.dtype))
    return model.requires_grad_(True)


def clip_grad_norm(accelerator, params, max_norm: float) -> torch.Tensor:
    """Clip the gradients' global norm; returns it (a device tensor). accelerate's version unscales fp16 gradients
    and handles DTensor shards (FSDP2); a plain DDP or single-process run without a GradScaler needs neither, and
    torch's own is measurably cheaper per step at small sizes (bench/loop_overhead.py)."""
    if kind(accelerator) == "ddp" and accelerator.scaler is None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    return accelerator.clip_grad_norm_(params, max_norm)
