"""What differs between the launchers (configs/accelerate/: DDP, DeepSpeed ZeRO-2/3, FSDP2), in one place.

    DeepSpeed    the engine steps inside its own backward: the recipe's micro-batch, accumulation and clipping
                 go into its config before `prepare` (accelerate would take them from a dataloader this loop
                 does not use, and clip at 1.0); inputs go in the engine's dtype (it runs the module in bf16/fp16
                 itself, autocast does nothing); a non-finite window is discarded by ZeRO's own overflow check
                 (`engine.was_step_applied()` says so on every rank alike); LoRA checkpoints leave the frozen
                 weights out; only trainable weights are gathered for `trainable.safetensors`.
    FSDP2        parameters are DTensors after `prepare` (the trainable list is taken then); checkpoints are
                 written here (save_state): trainable weights gathered one at a time, the optimizer state sharded
                 by torch.distributed.checkpoint, never the frozen base.
    ZeRO-3/FSDP2 the EMA keeps one fp32 part a parameter beside each shard (local_weights), gathered only to be
                 saved (gather_ema); a resume hands each process its part (part_of).
    CPUs         allow_cpu_sharding: DeepSpeed and FSDP2 launches on gloo, as the tests run them.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch

from cogpipe import models
from cogpipe.weights import materialize, open_state_dict


def allow_cpu_sharding() -> None:
    """DeepSpeed ZeRO and FSDP2 on CPU processes (DS_ACCELERATOR=cpu, gloo): how the launcher tests run the sharded
    launchers without a GPU, and a way to debug a sharded recipe on a laptop. Two gaps in accelerate, both only on
    a machine without an accelerator, and no effect where CUDA exists or DS_ACCELERATOR is not "cpu":

    - it finds no process-group backend for a DeepSpeed/FSDP launch and so counts one process: it is told the
      backend is gloo (what DeepSpeed's CPU accelerator uses), so it counts the ranks (MULTI_CPU);
    - AcceleratorState turns a launch into FSDP only from a GPU-like distributed type, so an FSDP launch on CPUs
      would quietly train plain DDP: once the state is built, a MULTI_CPU launch with ACCELERATE_USE_FSDP becomes
      DistributedType.FSDP with the launch's plugin, as the GPU path sets it. From there accelerate's own FSDP2 code
      runs unchanged (fully_shard per CogVideoXBlock over a CPU device mesh, DTensor parameters, its broadcast of
      the first process's weights, its state-dict and optimizer handling); gloo serves every collective FSDP2
      issues on CPU tensors.

    A DeepSpeed or FSDP launch on a machine without CUDA and without DS_ACCELERATOR gets DS_ACCELERATOR=cpu here
    (`cpu_accelerator_chosen`), before accelerate builds its state: without it accelerate would count each process
    as a world of one. A value the user set is kept (training.py then refuses a launch whose world did not form)."""
    cpu_accelerator_chosen()
    if os.environ.get("DS_ACCELERATOR") != "cpu" or torch.cuda.is_available():
        return
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = PartialState._prepare_backend
    if getattr(original, "_cogpipe_cpu_sharding", False):
        return

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        chosen, distributed_type = original(self, cpu, sagemaker_dp, backend)
        if chosen is None and _sharded_launch() and int(os.environ.get("LOCAL_RANK", -1)) != -1:
            return "gloo", DistributedType.MULTI_CPU
        return chosen, distributed_type

    original_init = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if (fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU
                and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"):
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    prepare_backend._cogpipe_cpu_sharding = True
    PartialState._prepare_backend = prepare_backend
    AcceleratorState.__init__ = init


CHOSE_CPU = "COGPIPE_CHOSE_DS_ACCELERATOR"  # set beside DS_ACCELERATOR=cpu when cogpipe chose it (for the log)


def cpu_accelerator_chosen() -> bool:
    """Set DS_ACCELERATOR=cpu for a DeepSpeed or FSDP launch (a process of it: LOCAL_RANK set) on a machine without
    CUDA where the variable is unset, unless DeepSpeed already picked another accelerator in this process; True when
    cogpipe set it (now or earlier in this process)."""
    if os.environ.get(CHOSE_CPU):
        return True
    if ("DS_ACCELERATOR" in os.environ or not _sharded_launch() or int(os.environ.get("LOCAL_RANK", -1)) == -1
            or torch.cuda.is_available()):
        return False
    import sys

    real = sys.modules.get("deepspeed.accelerator.real_accelerator")
    chosen = getattr(real, "ds_accelerator", None) if real is not None else None
    if chosen is not None and chosen._name != "cpu":
        return False
    os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ[CHOSE_CPU] = "1"
    return True


def world_problem(accelerator) -> str | None:
    """Why the processes of this launch did not form the world the launcher asked for (WORLD_SIZE, set by accelerate
    launch and torchrun, against the processes accelerate counts), or None."""
    launched = int(os.environ["WORLD_SIZE"]) if os.environ.get("WORLD_SIZE") else None
    if launched is None or launched == accelerator.num_processes:
        return None
    kind_ = str(accelerator.distributed_type).split(".")[-1]
    wanted = ("DeepSpeed" if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" else
              "FSDP" if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" else "multi-process")
    message = (f"the launcher started {launched} processes (WORLD_SIZE={launched}) for a {wanted} run, but accelerate "
               f"counts {accelerator.num_processes} (distributed_type {kind_}): each process would train alone and "
               f"all would write the same output_dir. Nothing was written.")
    if not torch.cuda.is_available():
        if wanted in ("DeepSpeed", "FSDP"):
            message += (f" On a machine without CUDA, run DeepSpeed and FSDP on CPU processes with DS_ACCELERATOR=cpu "
                        f"(cogpipe sets it when it is unset; here it is {os.environ.get('DS_ACCELERATOR')!r}): "
                        f"DS_ACCELERATOR=cpu accelerate launch --config_file ... --num_processes {launched} "
                        f"train.py ...")
        else:
            message += (f" On a machine without CUDA, several processes need accelerate's CPU switch: "
                        f"ACCELERATE_USE_CPU=1 accelerate launch ... --num_processes {launched} train.py ... "
                        f"(or `accelerate launch --cpu`)")
    return message


def _sharded_launch() -> bool:
    return any(os.environ.get(f"ACCELERATE_USE_{k}", "false").lower() == "true" for k in ("DEEPSPEED", "FSDP"))


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


@contextmanager
def unpartitioned():
    """Models built inside load whole, as on one process: accelerate registers its ZeRO-3 config with transformers
    (HfDeepSpeedConfig) whatever zero3_init_flag says, and transformers' from_pretrained then builds every model
    partitioned under deepspeed.zero.Init. The encoders (T5, the VAE) run on each process alone while the cache
    is built, never through a DeepSpeed engine, so a partitioned T5 would hold 0-element weights ('weight' must be
    2-D). The registration is lifted for the block and put back after."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:
        yield
        return
    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    registered = ref() if ref is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if registered is not None:
            hf_deepspeed.set_hf_deepspeed_config(registered)


def end_sharded_setup() -> None:
    """After training: forget the ZeRO-3 config accelerate registered with transformers, so single-process work
    (the export and render on the main process) loads models plainly instead of partitioning them with
    collectives the other, finished, processes would never join."""
    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    except ImportError:
        return
    unset_hf_deepspeed_config()


def trainable_parameters(accelerator, model) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every trainable weight of the *prepared* model, names as the plain model has them.
    Taken after `prepare`: FSDP2 replaces each parameter by a DTensor, so a list taken before would go stale (the
    optimizer is remapped by accelerate, a list cogpipe kept would not be)."""
    unwrapped = accelerator.unwrap_model(model)
    return [(clean_name(n), p) for n, p in unwrapped.named_parameters() if p.requires_grad]


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_weights(p: torch.Tensor) -> torch.Tensor:
    """This process's part of a trained parameter as the optimizer updates it: FSDP2, the local shard of the
    DTensor; ZeRO-3, the fp32 master partition (1-D) DeepSpeed's optimizer keeps; otherwise the parameter."""
    if is_dtensor(p):
        return p.to_local()
    if hasattr(p, "ds_id"):  # a ZeRO-3 partitioned parameter
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(p)
    return p


def _zero3_partition(p) -> int:
    return p.ds_tensor.ds_numel  # every rank's partition has this many elements (the last one padded)


def gather_full(accelerator, p: torch.Tensor, local: torch.Tensor) -> torch.Tensor | None:
    """The whole tensor of which `local` is this process's part laid out as parameter `p` is (local_weights), on
    the main process (None on the others). A collective under FSDP2 and ZeRO-3: every process, same order."""
    main = accelerator.is_main_process
    if is_dtensor(p):
        from torch.distributed.tensor import DTensor

        full = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                  stride=p.stride()).full_tensor()
        return full.detach().cpu() if main else None
    if hasattr(p, "ds_id"):
        size = _zero3_partition(p)
        piece = torch.zeros(size, dtype=local.dtype, device=local.device)
        piece[:local.numel()] = local.reshape(-1)
        pieces = [torch.empty_like(piece) for _ in range(accelerator.num_processes)]
        torch.distributed.all_gather(pieces, piece)
        return torch.cat(pieces)[:p.ds_numel].view(p.ds_shape).cpu() if main else None
    return local.detach().cpu() if main else None


def part_of(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This process's part of a full tensor laid out as parameter `p` is (the inverse of gather_full; every process
    holds `full`, so nothing is sent)."""
    full = full.to(local_weights(p).device)
    if is_dtensor(p):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
    if hasattr(p, "ds_id"):
        import torch.distributed as dist

        size, n = _zero3_partition(p), local_weights(p).numel()
        flat = full.reshape(-1)
        start = dist.get_rank() * size
        return flat[start:start + n]
    return full


@torch.no_grad()
def assign(p: torch.Tensor, full: torch.Tensor) -> None:
    """Set a trained parameter from its full value (a resume): each process writes its own part."""
    target = p.to_local() if is_dtensor(p) else p.data
    target.copy_(part_of(p, full).to(target.dtype))


def trainable_state_dict(accelerator, model, names: list[str]) -> dict[str, torch.Tensor] | None:
    """Full copies of the trainable weights `names` on the main process (None on the others); every process
    calls it. DeepSpeed: each parameter's fp32 master, gathered one at a time (ZeRO-3 shards included); FSDP2:
    each trainable DTensor gathered on its own; DDP: the parameters as they are. Never the frozen base."""
    unwrapped = accelerator.unwrap_model(model)
    main = accelerator.is_main_process
    wanted = set(names)
    if kind(accelerator) == "deepspeed":
        from deepspeed.utils import safe_get_full_fp32_param

        params = dict(unwrapped.named_parameters())
        out = {}
        for name in names:
            full = safe_get_full_fp32_param(params[name])  # a collective: every process, same order
            if main:
                out[name] = full.detach().cpu().clone()
        return out if main else None
    out = {}
    for name, p in trainable_parameters(accelerator, model):
        if name in wanted:
            full = gather_full(accelerator, p, p.detach().to_local() if is_dtensor(p) else p.detach())
            if main:
                out[name] = full
    return out if main else None


def gather_ema(accelerator, ema: dict | None, named: list) -> dict | None:
    """The EMA as full fp32 tensors on the main process (None elsewhere, or without an EMA): each process holds
    one fp32 shard a parameter (init_ema), gathered one parameter at a time, only to be saved."""
    if ema is None:
        return None
    out = {}
    for name, p in named:
        full = gather_full(accelerator, p, ema[name])
        if accelerator.is_main_process:
            out[name] = full
    return out if accelerator.is_main_process else None


def init_ema(named: list) -> dict:
    """{name: fp32 copy of this process's part of each trained parameter} (local_weights): the whole weight under
    DDP/ZeRO-2, a DTensor's local shard under FSDP2, the fp32 master partition under ZeRO-3."""
    return {n: local_weights(p).detach().float().clone() for n, p in named}


def ema_from_full(full: dict, named: list) -> dict:
    """This process's EMA parts from a saved (full) EMA (a resume)."""
    return {n: part_of(p, full[n]).float().clone() for n, p in named}


def describe(accelerator, model) -> dict:
    """What the launch really is, read from the prepared objects (the launcher tests assert it): the launcher,
    accelerate's distributed type, the process-group backend, the world size, and how many of the transformer's
    parameters are FSDP2 DTensors (with their placements) or ZeRO-3 partitions (no local data)."""
    import torch.distributed as dist

    params = list(accelerator.unwrap_model(model).parameters())
    dtensors = [p for p in params if is_dtensor(p)]
    return {"launcher": "zero%d" % zero_stage(accelerator) if kind(accelerator) == "deepspeed" else
            "fsdp%d" % accelerator.state.fsdp_plugin.fsdp_version if kind(accelerator) == "fsdp" else "ddp",
            "distributed_type": str(accelerator.distributed_type).split(".")[-1],
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "world": accelerator.num_processes,
            "params": len(params),
            "dtensor_params": len(dtensors),
            "placements": sorted({str(p.placements) for p in dtensors}),
            "partitioned_params": sum(hasattr(p, "ds_id") and p.data.numel() == 0 for p in params),
            "trainable_params": sum(p.requires_grad for p in params),
            "trainable_dtypes": sorted({str(p.dtype) for p in params if p.requires_grad}),
            "frozen_dtypes": sorted({str(p.dtype) for p in params if not p.requires_grad})}


FSDP_OPTIMIZER = "optimizer_0"  # accelerate's folder name for a sharded (DCP) optimizer checkpoint


def save_state(accelerator, directory, mode: str, model, optimizer, write_trainable) -> None:
    """The checkpoint's training state (all processes call it). FSDP2: `write_trainable(directory)` (the trainable
    weights gathered onto the main process, never the frozen base), the optimizer state sharded with
    torch.distributed.checkpoint (each process writes its own shard: `optimizer_0/`) and accelerate's scheduler and
    RNG files; accelerate's own FSDP model save would gather (FULL_STATE_DICT) or write (SHARDED_STATE_DICT) the
    whole model, frozen base included. Other launchers: accelerate.save_state, whose pre-hook writes the trainable
    weights (DeepSpeed writes its own partitioned checkpoint beside them)."""
    if kind(accelerator) != "fsdp":
        accelerator.save_state(str(directory), **save_state_kwargs(accelerator, mode))
        return
    import torch.distributed.checkpoint as dcp
    from accelerate.checkpointing import save_accelerator_state, save_custom_state
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    write_trainable(directory)
    state = get_optimizer_state_dict(model, _inner(optimizer), options=_sharded())
    dcp.save({"optimizer": state}, checkpoint_id=str(Path(directory) / FSDP_OPTIMIZER))
    save_accelerator_state(str(directory), [], [], accelerator._schedulers, accelerator._dataloaders,
                           accelerator.process_index, accelerator.step, accelerator.scaler)
    for i, obj in enumerate(accelerator._custom_objects):  # register_for_checkpointing: the LR schedule
        save_custom_state(obj, str(directory), i)


def load_state(accelerator, directory, mode: str, model, optimizer, read_trainable) -> None:
    """Restore what save_state wrote (all processes call it)."""
    if kind(accelerator) != "fsdp":
        accelerator.load_state(str(directory), **load_state_kwargs(accelerator, mode))
        return
    import torch.distributed.checkpoint as dcp
    from accelerate.checkpointing import load_accelerator_state, load_custom_state
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    read_trainable(directory)
    state = {"optimizer": get_optimizer_state_dict(model, _inner(optimizer), options=_sharded())}
    dcp.load(state, checkpoint_id=str(Path(directory) / FSDP_OPTIMIZER))
    set_optimizer_state_dict(model, _inner(optimizer), state["optimizer"], options=_sharded())
    restored = load_accelerator_state(str(directory), [], [], accelerator._schedulers, accelerator._dataloaders,
                                      accelerator.process_index, accelerator.scaler, map_location="cpu")
    accelerator.step = restored.get("step", accelerator.step)
    for i, obj in enumerate(accelerator._custom_objects):
        load_custom_state(obj, str(directory), i)


def _sharded():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=False)


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


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
