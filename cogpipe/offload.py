"""Low-VRAM training switches: block swapping, activation offload and int8 storage of the frozen base.

    train.blocks_to_swap: N       the frozen weights of the first N transformer blocks live in (pinned) host memory;
                                  each is copied to the GPU just before its block runs, on a side stream, the next
                                  block's copy started while the current one computes (in the backward, whose
                                  gradient checkpointing runs each block again, in reverse order); a block's GPU
                                  copy is dropped when the next block starts. Frozen weights never change, so
                                  nothing is copied back. At most two swapped blocks are on the GPU at a time.
    train.activation_offload      what gradient checkpointing keeps of each block (its hidden and text states) is
                                  copied to pinned host memory as the forward leaves the block, without blocking,
                                  and back when the backward recomputes the block.
    model.quantize_frozen: int8   the frozen Linear weights of the transformer blocks stored as int8 with a scale a
                                  row (torchao's Int8WeightOnlyConfig), computed in model.weight_dtype.

All three change where and how bytes are kept, never the arithmetic of a step: swapping and offloading copy tensors
and copy them back unchanged, so gradients equal the plain path's exactly; int8 storage computes with the dequantized
weights (tests/test_offload.py). On a CUDA device copies run on a side stream into pinned memory; elsewhere
(the CPU, the meta device of `cogpipe plan --simulate`) the same hooks run in the same order and copy synchronously.
Every copy is counted (`Mover.copies`, `Mover.bytes`), which is how the tests see the path ran and how the plan
prices each switch in bytes over PCIe a step.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from cogpipe.config import ConfigError
from cogpipe.family import DTYPES
from cogpipe.lora import add_lora


class Mover:
    """Copies between the compute device and host memory. On CUDA: pinned host buffers, a side stream, events that
    the compute stream waits on, `record_stream` so the allocator keeps a buffer until the stream using it is done.
    Elsewhere: plain copies. `observer` (the simulation's tracker) is told of every host buffer and every fetched
    weight, so it can count them where they live."""

    def __init__(self, device: torch.device, host: torch.device | None = None, observer=None):
        self.device = torch.device(device)
        self.host = torch.device(host) if host is not None else torch.device("cpu")
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.observer = observer
        self.copies = {"to_host": 0, "to_device": 0}
        self.bytes = {"to_host": 0, "to_device": 0}

    def _count(self, way: str, t: torch.Tensor) -> None:
        self.copies[way] += 1
        self.bytes[way] += t.numel() * t.element_size()

    def to_host(self, t: torch.Tensor, kind: str = "activation") -> torch.Tensor:
        """A host copy of `t`, started without blocking the compute stream; `kind` ("parameter" | "activation")
        for the observer."""
        h = torch.empty(t.shape, dtype=t.dtype, device=self.host, pin_memory=self.cuda)
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # `t` is ready on the compute stream
            with torch.cuda.stream(self.stream):
                h.copy_(t, non_blocking=True)
            t.record_stream(self.stream)  # not reused before the copy has read it
        else:
            h.copy_(t)
        self._count("to_host", t)
        if self.observer is not None:
            self.observer.to_host(h, kind)
        return h

    def to_device(self, h: torch.Tensor, side: bool = True):
        """(device copy of `h`, event or None). side=True: on the side stream (wait on the event before use)."""
        event = None
        if self.cuda and side:
            with torch.cuda.stream(self.stream):  # allocated on the side stream: its blocks come back to it only
                d = torch.empty(h.shape, dtype=h.dtype, device=self.device)  # when record_stream's uses are done
                d.copy_(h, non_blocking=True)
                event = self.stream.record_event()
        else:
            d = torch.empty(h.shape, dtype=h.dtype, device=self.device)
            if self.cuda:  # `h` may still be being written by a side-stream copy to the host
                torch.cuda.current_stream(self.device).wait_stream(self.stream)
            d.copy_(h, non_blocking=self.cuda)  # on the compute stream: ordered before what reads it
        self._count("to_device", h)
        return d, event

    def wait(self, event, tensors) -> None:
        """Make the compute stream wait for a side-stream copy, and keep its buffers until that stream is done."""
        if event is None:
            return
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for t in tensors:
            t.record_stream(current)


# ---- storage of a weight, plain or a tensor subclass (torchao's int8) ------------------------------------------


def parts(t: torch.Tensor) -> dict:
    """The plain tensors that hold `t`: itself, or a wrapper subclass's inner tensors (int8 data and scales)."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return {n: getattr(t, n) for n in names}
    return {"": t}


def _rebuild(like: torch.Tensor, pieces: dict) -> torch.Tensor:
    if is_traceable_wrapper_subclass(like):
        _, ctx = like.__tensor_flatten__()
        return type(like).__tensor_unflatten__(pieces, ctx, like.size(), like.stride())
    return pieces[""]


def _empty_like_parts(t: torch.Tensor, device) -> torch.Tensor:
    return _rebuild(t, {n: torch.empty(0, dtype=p.dtype, device=device) for n, p in parts(t).items()})


def in_backward() -> bool:
    """Whether autograd's engine is running a backward on this thread (checkpointed blocks rerun there)."""
    return torch._C._current_graph_task_id() != -1


class BlockSwap:
    """The frozen weights of `blocks[:n]` in host memory, fetched block by block (see the module's docstring).

    `events` records ("fetch", i), ("wait", i), ("release", i) in order, for the tests and for a log."""

    def __init__(self, blocks, n: int, mover: Mover, record: bool = False):
        if not 0 < n <= len(blocks):
            raise ValueError(f"train.blocks_to_swap: must be between 1 and the model's {len(blocks)} blocks, got {n}")
        self.blocks, self.n, self.mover = blocks, n, mover
        self.record, self.events = record, []
        self.stored = {}  # block index -> [(module, name, host tensor of the weight (same class), its shape)]
        self.resident = {}  # block index -> (event, device tensors)
        for i in range(n):
            entries = []
            for module in blocks[i].modules():
                for name, p in list(module._parameters.items()):
                    if p is None or p.requires_grad:
                        continue  # trained weights (LoRA) stay on the device
                    host = _rebuild(p, {k: mover.to_host(v.detach(), "parameter") for k, v in parts(p).items()})
                    entries.append((module, name, host))
                    self._set(module, name, _empty_like_parts(p, mover.device))
            self.stored[i] = entries
        self.handles = [b.register_forward_pre_hook(self._pre_hook(j)) for j, b in enumerate(blocks)]

    @staticmethod
    def _set(module, name, tensor) -> None:
        module._parameters[name] = torch.nn.Parameter(tensor, requires_grad=False)

    def host_tensors(self):
        return [part for entries in self.stored.values() for _, _, h in entries for part in parts(h).values()]

    def block_bytes(self, i: int) -> int:
        return sum(p.numel() * p.element_size() for _, _, h in self.stored[i] for p in parts(h).values())

    def bytes_per_step(self) -> int:
        """Host-to-device bytes of one training step: each swapped block fetched for the forward and again for
        the checkpointed backward."""
        return 2 * sum(self.block_bytes(i) for i in self.stored)

    def _log(self, what: str, i: int) -> None:
        if self.record:
            self.events.append((what, i))

    def _fetch(self, i: int) -> None:
        if i in self.resident or i not in self.stored:
            return
        tensors, event = [], None
        for module, name, host in self.stored[i]:
            pieces = {}
            for k, h in parts(host).items():
                pieces[k], event = self.mover.to_device(h)
                tensors.append(pieces[k])
            weight = _rebuild(host, pieces)
            self._set(module, name, weight)
            if self.mover.observer is not None:
                self.mover.observer.fetched(weight)
        self.resident[i] = (event, tensors)
        self._log("fetch", i)

    def _release(self, i: int) -> None:
        for module, name, host in self.stored[i]:
            self._set(module, name, _empty_like_parts(host, self.mover.device))
        del self.resident[i]
        self._log("release", i)

    def _pre_hook(self, j: int):
        def hook(module, args):
            ahead = j - 1 if in_backward() else j + 1
            for i in list(self.resident):
                if i not in (j, ahead):
                    self._release(i)
            if j in self.stored:
                self._fetch(j)  # a no-op when it was prefetched
                event, tensors = self.resident[j]
                self.mover.wait(event, tensors)
                self._log("wait", j)
            if 0 <= ahead < len(self.blocks):
                self._fetch(ahead)
        return hook

    def remove(self) -> None:
        """Put every swapped weight back on the device and remove the hooks."""
        for h in self.handles:
            h.remove()
        for i in self.stored:
            self._fetch(i)
            event, tensors = self.resident[i]
            self.mover.wait(event, tensors)
        self.resident.clear()


def checkpoint(module, *args, context_fn=None):
    """diffusers' gradient checkpointing (torch's non-reentrant checkpoint of the block's __call__, hooks
    included); `context_fn` as torch's (the simulation re-enters its autocast stand-in for the recompute)."""
    kwargs = {"context_fn": context_fn} if context_fn is not None else {}
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, **kwargs)


class ActivationOffload:
    """A gradient checkpointing function (diffusers' `enable_gradient_checkpointing(gradient_checkpointing_func)`)
    that runs torch's non-reentrant checkpoint under saved-tensor hooks: the block inputs the checkpoint keeps (its
    hidden and text states; not the shared time embedding and rotary tables, which live on anyway) go to host
    memory as they are saved and come back when the backward recomputes the block."""

    def __init__(self, mover: Mover, offloaded_args: int = 2, context_fn=None):
        self.mover, self.offloaded_args, self.context_fn = mover, offloaded_args, context_fn
        self._ids: set[int] = set()
        self.moved = 0  # bytes copied either way since construction (or since `moved` was last set to 0)

    def _pack(self, t: torch.Tensor):
        if id(t) not in self._ids or isinstance(t, torch.nn.Parameter):
            return t
        self.moved += t.numel() * t.element_size()
        return (self.mover.to_host(t.detach()),)

    def _unpack(self, packed):
        if not isinstance(packed, tuple):
            return packed
        self.moved += packed[0].numel() * packed[0].element_size()
        t, _ = self.mover.to_device(packed[0], side=False)
        return t

    def __call__(self, module, *args):
        self._ids = {id(a) for a in args[:self.offloaded_args] if isinstance(a, torch.Tensor)}
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                return checkpoint(module, *args, context_fn=self.context_fn)
        finally:
            self._ids = set()


class Offload:
    """The switches applied to one transformer: the swap (or None), the activation offload (or None), one mover."""

    def __init__(self, mover: Mover, swap: BlockSwap | None, activations: ActivationOffload | None):
        self.mover, self.swap, self.activations = mover, swap, activations

    def host_tensors(self):
        return self.swap.host_tensors() if self.swap is not None else []

    def bytes_per_step(self) -> int:
        """Bytes over PCIe a training step: the swap's (computed) and the activations' (as counted since the last
        `reset`, both directions)."""
        return (self.swap.bytes_per_step() if self.swap else 0) + (self.activations.moved if self.activations else 0)


def check_available(model_cfg) -> None:
    """model.quantize_frozen needs torchao (the `quantize` extra): said when the run starts, before any weights load."""
    from importlib.util import find_spec

    kind = getattr(model_cfg, "quantize_frozen", "none")
    if kind != "none" and find_spec("torchao") is None:
        raise ConfigError(f"model.quantize_frozen={kind} needs torchao: pip install -e \".[quantize]\"")


def quantize_frozen(transformer, model_cfg) -> bool:
    """model.quantize_frozen=int8: the transformer blocks' Linear weights stored as int8 with one scale a row
    (torchao, weight-only: computed in their dtype). Call it before the LoRA adapter is added: the adapter's own
    weights stay in fp32. Returns whether it quantized."""
    if getattr(model_cfg, "quantize_frozen", "none") == "none":
        return False
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as e:
        raise ImportError("model.quantize_frozen=int8 needs torchao: pip install -e \".[quantize]\"") from e

    def frozen_block_linear(module, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and fqn.startswith("transformer_blocks.")

    quantize_(transformer, Int8WeightOnlyConfig(), filter_fn=frozen_block_linear)
    return True


def apply(transformer, train_cfg, device, host=None, observer=None, record: bool = False,
          context_fn=None, launcher: str = "ddp") -> Offload | None:
    """Turn on train.blocks_to_swap and train.activation_offload on a transformer set up for training (LoRA added,
    gradient checkpointing on) and not yet on `device`: swapped weights go to host memory from where they are, the
    rest moves with the model. `launcher` (sharding.kind): the swap needs whole weights, so DDP or one process.
    Returns the Offload (None when both switches are off); it stays reachable as `transformer._cogpipe_offload`."""
    n, offload_acts = getattr(train_cfg, "blocks_to_swap", 0), getattr(train_cfg, "activation_offload", False)
    if not n and not offload_acts:
        return None
    if n and launcher != "ddp":
        raise ConfigError(f"train.blocks_to_swap: swaps whole frozen weights between host and GPU; under {launcher} "
                          f"the weights are sharded by the launcher: use DDP or one process, or set it to 0")
    mover = Mover(device, host, observer)
    activations = None
    if offload_acts:
        activations = ActivationOffload(mover, context_fn=context_fn)
        transformer.enable_gradient_checkpointing(gradient_checkpointing_func=activations)
    swap = BlockSwap(transformer.transformer_blocks, n, mover, record=record) if n else None
    transformer._cogpipe_offload = Offload(mover, swap, activations)
    return transformer._cogpipe_offload


def make_trainable(transformer, cfg) -> None:
    """The recipe's trainable transformer, in the order its storage needs: the frozen base stored in fp8
    (model.fp8_frozen) or int8 (model.quantize_frozen) first, then a LoRA adapter on it (its own weights in fp32), or
    every weight trainable (train.mode=full). Training, `cogpipe plan --simulate` and bench/memory_measure.py use it."""
    if cfg.model.fp8_frozen:  # before the adapter: only the frozen base layers are stored in fp8
        transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn,
                                             compute_dtype=DTYPES[cfg.model.weight_dtype])
    quantize_frozen(transformer, cfg.model)
    if cfg.train.mode == "lora":
        add_lora(transformer, cfg.lora)
    else:
        transformer.requires_grad_(True)
