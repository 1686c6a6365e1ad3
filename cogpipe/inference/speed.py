"""Fast generation: step caching, regional compilation and the attention kernel, for every place cogpipe generates
(infer.py, the web page's Generate tab, validation during training and the end-of-run render). docs/inference.md
has the measured trade-offs and the recommended settings.

    speed = Speed(cache="teacache", threshold=0.1, compile=True, attention="sdpa")
    check(speed, device)              # every rule that needs no weights (before they load)
    report = apply(pipe, speed)       # after load_pipeline (and sequence_parallel.enable, where used)
    frames = generate(pipe, ...)      # report.as_dict(): block evaluations done / skipped, steps skipped, seconds

The cache methods and what `threshold` means for each (0 always gives the uncached video, bit for bit):

    none         nothing cached
    fbc          First Block Cache (diffusers FirstBlockCacheConfig.threshold): after the first block, the rest of the
                 blocks are skipped (their last residual reused) while the first block's residual changed by less
                 than `threshold` (mean |change| / mean |previous|) since the last full step
    teacache     TeaCache (cogpipe's hooks, TeaCacheHook below): a step's blocks are all skipped while the relative
                 L1 change of the timestep embedding that modulates every block, rescaled by a per-model
                 polynomial and summed since the last full step, stays below `threshold`
    magcache     MagCache (diffusers MagCacheConfig.threshold): the blocks are skipped while the error accumulated
                 from the model's magnitude ratios (fitted by `cogpipe teacache-fit`) stays below `threshold`
                 (at most 3 steps in a row, none in the first 20% of the steps)
    pab          Pyramid Attention Broadcast (diffusers): `threshold` is the skip range N, a whole number: every
                 block's attention runs every N-th step and is reused in between, for timesteps 100 to 800
    fastercache  FasterCache (diffusers): `threshold` is the skip range N: attention reused as PAB does (with its
                 low/high-frequency correction) and the unconditional half of the guidance batch computed every
                 N-th step only; N <= 1 is off
    taylorseer   TaylorSeer (diffusers): `threshold` is the interval N: every N-th step runs in full (and the first
                 3), the steps in between predict each block's attention and feed-forward outputs by a first-order
                 Taylor expansion; N <= 1 is off

A block evaluation is counted when the block's feed-forward really runs (so a TaylorSeer step that predicts it
counts as skipped, a PAB step that reuses only the attention does not: the report counts attention evaluations
apart).

Under sequence parallel every rank of a group takes the same decision at every step: the metrics that depend on the
tokens (fbc, teacache) are summed over the group's shards before the comparison, and the decision itself is agreed
(any rank that computes makes all compute). The other methods decide by the step count alone. FasterCache's
frequency split needs every token on one rank and is refused under sequence parallel.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from cogpipe.attention import KERNELS, Kernel, kernel_problem, set_kernel

CACHES = ("none", "fbc", "pab", "fastercache", "teacache", "magcache", "taylorseer")
INTERVAL_METHODS = ("pab", "fastercache", "taylorseer")  # threshold = a whole number of steps
# the threshold each method runs at when none is given (docs/inference.md: measured on tiny-world, and the
# published settings for the released models)
RECOMMENDED = {"fbc": 0.2, "teacache": 0.1, "magcache": 0.1, "pab": 3, "fastercache": 2, "taylorseer": 2}

# TeaCache's published polynomial rescaling per released version (x: relative L1 change of the timestep embedding
# between steps; poly(x): the expected relative change of the model output), highest power first. Source: the
# TeaCache project, TeaCache4CogVideoX1.5/teacache_sample_video.py (github.com/ali-vilab/TeaCache), which fits
# them for CogVideoX-2b, -5b (the I2V model shares 5b's) and 1.5-5B(-I2V).
TEACACHE_COEFFICIENTS = {
    "2b": [-3.10658903e+01, 2.54732368e+01, -5.92380459e+00, 1.75769064e+00, -3.61568434e-03],
    "5b": [-1.53880483e+03, 8.43202495e+02, -1.34363087e+02, 7.97131516e+00, -5.23162339e-02],
    "5b-i2v": [-1.53880483e+03, 8.43202495e+02, -1.34363087e+02, 7.97131516e+00, -5.23162339e-02],
    "1.5-5b": [2.50210439e+02, -1.65061612e+02, 3.57804877e+01, -7.81551492e-01, 3.58559703e-02],
    "1.5-5b-i2v": [1.22842302e+02, -1.04088754e+02, 2.62981677e+01, -3.06009921e-01, 3.71213220e-02],
}
IDENTITY = [0.0, 0.0, 0.0, 1.0, 0.0]  # no rescaling: the raw relative L1 change (a model with no fit)


@dataclass(frozen=True)
class Speed:
    """What a generation does to go faster. threshold None: the method's RECOMMENDED value. `fit`: a JSON from
    `cogpipe teacache-fit` (TeaCache coefficients and MagCache ratios fitted for this model)."""
    cache: str = "none"
    threshold: float | None = None
    compile: bool = False
    attention: str = "sdpa"
    fit: str | None = None

    @property
    def resolved_threshold(self) -> float:
        if self.cache == "none":
            return 0.0
        return float(RECOMMENDED[self.cache] if self.threshold is None else self.threshold)

    @property
    def active(self) -> bool:
        """Whether a cache is installed: not for none, nor for an interval method at an interval <= 1 (every step
        computed). fbc / teacache / magcache install their hooks at any threshold (0: they never skip)."""
        if self.cache == "none":
            return False
        return self.resolved_threshold > 1 if self.cache in INTERVAL_METHODS else True


def from_args(a) -> Speed:
    """The Speed of parsed infer.py arguments."""
    return Speed(a.cache, a.cache_threshold, a.compile, a.attention, a.teacache_coefficients)


def add_arguments(p) -> None:
    """infer.py's speed switches (also the page's Generate tab, which parses its fields with infer.py's parser)."""
    p.add_argument("--cache", choices=CACHES, default="none",
                   help="step caching (docs/inference.md): teacache (cogpipe's), fbc, pab, fastercache, magcache, "
                        "taylorseer (diffusers' hooks); prints the block evaluations it skipped")
    p.add_argument("--cache-threshold", type=float, default=None, metavar="X",
                   help="the method's own knob (0: off, the uncached video): fbc/teacache/magcache a relative-change "
                        "threshold, pab/fastercache/taylorseer a whole number of steps; default: "
                        + ", ".join(f"{k} {v}" for k, v in RECOMMENDED.items()))
    p.add_argument("--teacache-coefficients", default=None, metavar="FILE",
                   help="a JSON from `cogpipe teacache-fit` for this model: TeaCache's rescaling polynomial and "
                        "MagCache's ratios (default: the published ones of the model's version)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block (regional: one graph serves every block)")
    p.add_argument("--attention", choices=KERNELS, default="sdpa",
                   help="the attention kernel: sdpa (torch) or sage (SageAttention, when installed; NVIDIA GPUs)")


def check(speed: Speed, device=None, sequence_parallel: int = 1, steps: int | None = None) -> None:
    """Every rule that needs no weights; ValueError (FileNotFoundError for a missing fit file) naming the flag."""
    if speed.cache not in CACHES:
        raise ValueError(f"--cache must be one of {', '.join(CACHES)}, got {speed.cache!r}")
    t = speed.threshold
    if t is not None:
        if t < 0 or not np.isfinite(t):
            raise ValueError(f"--cache-threshold must be >= 0, got {t}")
        if speed.cache in INTERVAL_METHODS and t != int(t):
            raise ValueError(f"--cache-threshold: for {speed.cache} it is a whole number of steps (the skip "
                             f"range / interval), got {t}")
    problem = kernel_problem(speed.attention, device)
    if problem:
        raise ValueError(problem)
    if speed.cache == "fastercache" and sequence_parallel != 1 and speed.active:
        raise ValueError("--cache fastercache: its low/high-frequency split needs every token on one process; "
                         "under --sequence-parallel use teacache, fbc, pab, magcache or taylorseer")
    if speed.fit is not None:
        read_fit(speed.fit)
    if speed.cache == "magcache" and speed.active and speed.fit is None:
        raise ValueError("--cache magcache needs the model's magnitude ratios: fit them with `cogpipe teacache-fit "
                         "--model DIR --output FIT.json` and pass --teacache-coefficients FIT.json")


def read_fit(path) -> dict:
    """A `cogpipe teacache-fit` JSON: {"teacache_coefficients": [5 numbers], "mag_ratios": [...], ...}."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--teacache-coefficients {p}: no such file")
    try:
        fit = json.loads(p.read_text())
        coefficients = [float(c) for c in fit["teacache_coefficients"]]
        ratios = [float(r) for r in fit.get("mag_ratios") or []]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--teacache-coefficients {p}: not a `cogpipe teacache-fit` file ({e}); it holds "
                         f"teacache_coefficients (5 numbers) and mag_ratios") from None
    if len(coefficients) != 5:
        raise ValueError(f"--teacache-coefficients {p}: teacache_coefficients needs 5 numbers (a degree-4 "
                         f"polynomial, highest power first), got {len(coefficients)}")
    return {**fit, "teacache_coefficients": coefficients, "mag_ratios": ratios}


# ---- the run's report ------------------------------------------------------------------------------------------

@dataclass
class Report:
    """What the speed settings did over the generations since `reset`: every transformer call (one a denoising
    step: guidance runs both halves in one batch) and how many of its blocks / attentions really ran."""
    cache: str
    threshold: float
    attention: str
    compiled: bool
    blocks: int  # transformer blocks in the model
    kernel: Kernel = None  # counts the attention evaluations
    calls: list = field(default_factory=list)  # blocks evaluated in each transformer call
    seconds: float = 0.0
    handles: list = field(default_factory=list, repr=False)
    restore: list = field(default_factory=list, repr=False)  # (attention, its processor, its kernel) before
    compiled_here: list = field(default_factory=list, repr=False)  # blocks `apply` compiled

    @property
    def attention_calls(self) -> int:
        return self.kernel.calls if self.kernel is not None else 0

    def reset(self) -> None:
        self.calls.clear()
        if self.kernel is not None:
            self.kernel.calls = 0
        self.seconds = 0.0

    def as_dict(self) -> dict:
        total = len(self.calls) * self.blocks
        done = sum(self.calls)
        return {"cache": self.cache, "threshold": self.threshold, "attention": self.attention,
                "compiled": self.compiled, "steps": len(self.calls),
                "steps_skipped": sum(1 for c in self.calls if c < self.blocks),
                "block_evaluations": total, "block_evaluations_done": done,
                "block_evaluations_skipped": total - done,
                "skipped_fraction": round((total - done) / total, 4) if total else 0.0,
                "attention_evaluations_done": self.attention_calls,
                "attention_evaluations_skipped": total - self.attention_calls if total else 0,
                "seconds": round(self.seconds, 3), "blocks_per_step": list(self.calls)}

    def line(self) -> str:
        d = self.as_dict()
        what = "no cache" if self.cache == "none" else f"cache {self.cache} (threshold {self.threshold:g})"
        return (f"{what}: {d['block_evaluations_done']}/{d['block_evaluations']} transformer block evaluations done, "
                f"{d['block_evaluations_skipped']} skipped ({100 * d['skipped_fraction']:.1f}%), {d['steps_skipped']}"
                f"/{d['steps']} steps skipped, {d['attention_evaluations_skipped']} attention evaluations skipped; "
                f"attention {self.attention}{', compiled blocks' if self.compiled else ''}; "
                f"{d['seconds']:.1f} s sampling")


def report_of(pipe_or_transformer) -> Report | None:
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    return getattr(transformer, "_cogpipe_speed", None)


# ---- group-wide decisions (sequence parallel) --------------------------------------------------------------------

def _group(module):
    return getattr(module, "_cogpipe_sequence_parallel", None)


def video_token_slice(sp, tokens: int) -> int:
    """How many of this rank's `tokens` local video tokens are real (the last rank's shard ends in padding)."""
    if sp is None:
        return tokens
    return max(0, min(tokens, sp.video_tokens - sp.rank * sp.local))


def relative_change(current: torch.Tensor, previous: torch.Tensor, sp=None) -> float:
    """sum|current - previous| / sum|previous| (the ratio of the mean absolute values), summed in fp64 over the
    sequence-parallel group's shards when `sp` is given: every rank gets the same number, one process's up to
    summation order."""
    sums = torch.stack([(current.double() - previous.double()).abs().sum(), previous.double().abs().sum()])
    if sp is not None:
        import torch.distributed as dist

        if dist.get_backend(sp.group) == "nccl":
            sums = sums.cuda()
        dist.all_reduce(sums, group=sp.group)
    return (sums[0] / sums[1].clamp_min(1e-30)).item()


def agree(compute: bool, sp=None) -> bool:
    """Under sequence parallel: compute if any rank of the group would (the decision made identical)."""
    if sp is None:
        return compute
    import torch.distributed as dist

    flag = torch.tensor([1 if compute else 0], dtype=torch.int32)
    if dist.get_backend(sp.group) == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=sp.group)
    return bool(flag.item())


# ---- TeaCache -----------------------------------------------------------------------------------------------------

def _hook_classes():
    from diffusers.hooks.hooks import BaseState, ModelHook

    class TeaCacheState(BaseState):
        def __init__(self):
            self.step = 0
            self.accumulated = 0.0
            self.previous_emb = None
            self.should_compute = True
            self.head_input = None  # (hidden, encoder) into the first block at the last full step
            self.residual = None  # (hidden, encoder): what the blocks added at the last full step

        def reset(self):
            self.__init__()

    class TeaCacheHeadHook(ModelHook):
        """On the first block: decides for the whole step from the timestep embedding `temb` every block is
        modulated by (TeaCache's CogVideoX signal); when skipping, returns the first block's input plus the residual
        the blocks added at the last full step."""
        _is_stateful = True

        def __init__(self, state_manager, threshold: float, coefficients, transformer, single: bool):
            super().__init__()
            self.state_manager = state_manager
            self.threshold = threshold
            self.rescale = np.poly1d(coefficients)
            self.transformer = transformer
            self.single = single  # a one-block model: the head is also the tail
            self.num_steps = None  # set per generation (the first and the last step always compute)

        @torch.compiler.disable
        def _decide(self, state, temb) -> bool:
            last = self.num_steps is not None and state.step == self.num_steps - 1
            sp = _group(self.transformer)
            if state.step == 0 or state.previous_emb is None or last or state.residual is None:
                compute = True
            else:
                change = relative_change(temb, state.previous_emb, sp)
                state.accumulated += max(float(self.rescale(change)), 0.0)  # a fit's negative tail counts as 0
                compute = state.accumulated >= self.threshold
            compute = agree(compute, sp)
            if compute:
                state.accumulated = 0.0
            state.previous_emb = temb.detach().clone()
            state.step += 1
            return compute

        def new_forward(self, module, *args, **kwargs):
            hidden, encoder, temb = _block_inputs(args, kwargs)
            state = self.state_manager.get_state()
            state.should_compute = self._decide(state, temb)
            if not state.should_compute:
                return hidden + state.residual[0], encoder + state.residual[1]
            state.head_input = (hidden, encoder)
            out = self.fn_ref.original_forward(*args, **kwargs)
            if self.single:
                state.residual = (out[0] - hidden, out[1] - encoder)
            return out

        def reset_state(self, module):
            self.state_manager.reset()
            return module

    class TeaCacheBlockHook(ModelHook):
        """On every other block: runs it at a full step (the last one keeps the residual), passes its input through
        at a skipped one."""

        def __init__(self, state_manager, tail: bool):
            super().__init__()
            self.state_manager = state_manager
            self.tail = tail

        def new_forward(self, module, *args, **kwargs):
            hidden, encoder, _ = _block_inputs(args, kwargs)
            state = self.state_manager.get_state()
            if not state.should_compute:
                return hidden, encoder
            out = self.fn_ref.original_forward(*args, **kwargs)
            if self.tail:
                state.residual = (out[0] - state.head_input[0], out[1] - state.head_input[1])
            return out

    return TeaCacheState, TeaCacheHeadHook, TeaCacheBlockHook


TEACACHE_HEAD, TEACACHE_BLOCK = "cogpipe_teacache_head", "cogpipe_teacache_block"


def _block_inputs(args, kwargs):
    names = ("hidden_states", "encoder_hidden_states", "temb")
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    return values["hidden_states"], values["encoder_hidden_states"], values["temb"]


def teacache_coefficients(transformer_config: dict, fit: dict | None = None, log=print) -> list:
    """The fit's coefficients, else the published ones of the model's released version, else no rescaling."""
    from cogpipe import family

    if fit is not None:
        return list(fit["teacache_coefficients"])
    card = family.released_variant(transformer_config)
    if card is not None and card.name in TEACACHE_COEFFICIENTS:
        return TEACACHE_COEFFICIENTS[card.name]
    log("teacache: no published coefficients for this model (not a released CogVideoX version): the raw relative "
        "change is used; fit them with `cogpipe teacache-fit`")
    return IDENTITY


def apply_teacache(transformer, threshold: float, coefficients) -> None:
    """Install TeaCache (cogpipe's diffusers-style hooks) on a CogVideoXTransformer3DModel."""
    from diffusers.hooks.hooks import HookRegistry, StateManager

    state_cls, head_cls, block_cls = _hook_classes()
    manager = StateManager(state_cls)
    blocks = list(transformer.transformer_blocks)
    head = head_cls(manager, threshold, coefficients, transformer, single=len(blocks) == 1)
    HookRegistry.check_if_exists_or_initialize(blocks[0]).register_hook(head, TEACACHE_HEAD)
    for i, block in enumerate(blocks[1:], start=1):
        HookRegistry.check_if_exists_or_initialize(block).register_hook(
            block_cls(manager, tail=i == len(blocks) - 1), TEACACHE_BLOCK)
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
    transformer._cogpipe_teacache = head


def remove_teacache(transformer) -> None:
    from diffusers.hooks.hooks import HookRegistry

    if getattr(transformer, "_cogpipe_teacache", None) is None:
        return
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.remove_hook(TEACACHE_HEAD, recurse=True)
    registry.remove_hook(TEACACHE_BLOCK, recurse=True)
    registry.invalidate_child_registries_cache()
    del transformer._cogpipe_teacache


# ---- First Block Cache: diffusers' hooks, the decision made group-wide -----------------------------------------------

def _group_fbc(transformer) -> None:
    """diffusers' FBC head hook decides on this process's tokens; swap in the same decision on the whole sample's
    (relative_change over the group, padding excluded, then agreed)."""
    from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK, FBCHeadBlockHook

    head = transformer.transformer_blocks[0]._diffusers_hook.get_hook(_FBC_LEADER_BLOCK_HOOK)

    class GroupFBCHeadBlockHook(FBCHeadBlockHook):
        @torch.compiler.disable
        def _should_compute_remaining_blocks(self, hidden_states_residual):
            state = self.state_manager.get_state()
            sp = _group(transformer)
            if state.head_block_residual is None:
                return agree(True, sp)
            n = video_token_slice(sp, hidden_states_residual.shape[1])
            change = relative_change(hidden_states_residual[:, :n], state.head_block_residual[:, :n], sp)
            return agree(change > self.threshold, sp)

    head.__class__ = GroupFBCHeadBlockHook


# ---- install / remove --------------------------------------------------------------------------------------------

def _diffusers_config(speed: Speed, transformer, steps: int, fit: dict | None, timestep):
    from diffusers import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    t = speed.resolved_threshold
    if speed.cache == "fbc":
        return FirstBlockCacheConfig(threshold=t)
    if speed.cache == "magcache":
        return MagCacheConfig(threshold=t, num_inference_steps=steps, mag_ratios=list(fit["mag_ratios"]))
    n = int(t)
    if speed.cache == "pab":
        return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=n,
                                               spatial_attention_timestep_skip_range=(100, 800),
                                               current_timestep_callback=timestep)
    if speed.cache == "fastercache":
        return FasterCacheConfig(spatial_attention_block_skip_range=n, unconditional_batch_skip_range=n,
                                 spatial_attention_timestep_skip_range=(-1, 681),
                                 unconditional_batch_timestep_skip_range=(-1, 781),
                                 current_timestep_callback=timestep, attention_weight_callback=lambda _: 0.5,
                                 tensor_format="BFCHW", is_guidance_distilled=False)
    if speed.cache == "taylorseer":
        # diffusers' default patterns (".*attn" in full) match no CogVideoX module (its attention is attn1): name
        # the blocks' attention and feed-forward, the two outputs TaylorSeer's paper predicts
        return TaylorSeerCacheConfig(cache_interval=n, disable_cache_before_step=3, max_order=1,
                                     taylor_factors_dtype=torch.float32,
                                     cache_identifiers=[r"transformer_blocks\.\d+\.(attn1|ff)"])
    raise ValueError(f"--cache {speed.cache}: not a diffusers method")


class _Timestep:
    """current_timestep_callback for PAB / FasterCache: the timestep of the transformer's current call."""

    def __init__(self):
        self.value = 1000

    def __call__(self):
        return self.value


def apply(pipe, speed: Speed, steps: int = 50, log=print) -> Report:
    """Install `speed` on a loaded pipeline (after sequence_parallel.enable, where used): the attention kernel,
    the cache hooks, compiled blocks and the counters of the report. Returns the Report (also
    pipe.transformer._cogpipe_speed; sampling.generate_videos fills its seconds)."""
    transformer = pipe.transformer
    remove(transformer)
    fit = read_fit(speed.fit) if speed.fit else None
    kernel = Kernel(speed.attention)
    from cogpipe.attention import attention_modules

    restore = [(attn, attn.processor, getattr(attn.processor, "kernel", None))
               for attn in attention_modules(transformer)]
    set_kernel(transformer, kernel)
    blocks = list(transformer.transformer_blocks)
    report = Report(speed.cache, speed.resolved_threshold, speed.attention, speed.compile, len(blocks), kernel,
                    restore=restore)
    timestep = _Timestep()
    if speed.active:
        if speed.cache == "teacache":
            apply_teacache(transformer, speed.resolved_threshold,
                           teacache_coefficients(dict(transformer.config), fit, log))
        else:
            transformer.enable_cache(_diffusers_config(speed, transformer, steps, fit, timestep))
            if speed.cache == "fbc":
                _group_fbc(transformer)
    handles = report.handles

    def call_started(module, args, kwargs):
        report.calls.append(0)
        t = kwargs.get("timestep", args[2] if len(args) > 2 else None)
        if t is not None:
            timestep.value = int(torch.as_tensor(t).flatten()[0].item())

    def block_ran(module, args, output):
        report.calls[-1] += 1

    handles.append(transformer.register_forward_pre_hook(call_started, with_kwargs=True))
    for block in blocks:  # the feed-forward's first layer runs once in every block evaluation, never in a skipped
        # one (below every cache's hooks, which replace forwards of the block, its attention or its feed-forward)
        handles.append(block.ff.net[0].register_forward_hook(block_ran))
    transformer._cogpipe_speed = report
    if speed.compile:
        from cogpipe.models import compile_blocks

        report.compiled_here = [b for b in blocks if getattr(b, "_compiled_call_impl", None) is None]
        compile_blocks(transformer)
    return report


def begin(pipe, steps: int) -> Report | None:
    """Before a generation of `steps` steps: the report starts over and the hooks that count steps learn the
    count."""
    report = report_of(pipe)
    if report is not None:
        report.reset()
    head = getattr(pipe.transformer, "_cogpipe_teacache", None)
    if head is not None:
        head.num_steps = steps
    return report


def remove(transformer) -> None:
    """Undo `apply`: no cache hooks, no counters, the attention processors and kernels as they were, the blocks
    `apply` compiled uncompiled (validation during training leaves the trained transformer as it found it)."""
    report = getattr(transformer, "_cogpipe_speed", None)
    if report is None:
        return
    for handle in report.handles:
        handle.remove()
    for attn, processor, kernel in report.restore:
        if attn.processor is not processor:
            attn.set_processor(processor)
        if kernel is not None:
            processor.kernel = kernel
    for block in report.compiled_here:
        block._compiled_call_impl = None
    remove_teacache(transformer)
    if getattr(transformer, "is_cache_enabled", False):
        transformer.disable_cache()
    del transformer._cogpipe_speed


def settings_dict(speed: Speed) -> dict:
    return asdict(speed)


class Timer:
    """Wall seconds of a block, added to a report (None: nothing)."""

    def __init__(self, report: Report | None):
        self.report = report

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.report is not None:
            self.report.seconds += time.perf_counter() - self.start
