"""train(cfg): cache latents, then one visible accelerate loop with checkpoints, resume and export.

    setup      _start (accelerator, tracking), _prepare_data (checks, latent cache, data order),
               _prepare_model (transformer, LoRA or full), _prepare_optimizer (AdamW, LR schedule, EMA,
               accelerate.prepare, checkpoint hooks), _resume
    the loop   draw a batch (batches.py), model inputs and loss (diffusion.py), one micro-step, then per
               optimizer step: log, checkpoint, validate, stop on a signal
    the end    export a Diffusers pipeline (+ LoRA) and render the validation videos

Reproducibility (same weights after a resume, on 1 or 2 processes with the same global batch) comes from
batches.py: every random draw is seeded by (seed, micro-step, slot).
"""

from __future__ import annotations

import gc
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm

from cogpipe import checkpoint, models, offload, rundir, sequence_parallel, sharding, tracking, video
from cogpipe.config import Config, save_config, to_yaml
from cogpipe.data import stages
from cogpipe.data.batches import Draws, EpochPlan, PlanSampler, draw_batch, examples
from cogpipe.data.cache import CachedDataset, build_cache, load_prompt_embeds
from cogpipe.data.checks import usable_samples
from cogpipe.data.reader import StoreDataset, StorePlan, training_data
from cogpipe.devices import compute_dtype, cpu_threads, loader_workers
from cogpipe.diffusion import RotaryTables, diffusion_loss, model_inputs
from cogpipe.export import export
from cogpipe.optim import make_optimizer, step_unless_skipped, update_ema
from cogpipe.signals import Interrupted, StopSignals
from cogpipe.tracking import StepMeter
from cogpipe.validation import render_validation, validate_in_training, validation_inputs


@dataclass
class TrainState:
    """The loop's position; the first three fields are what a checkpoint records (trainer_state.json)."""
    step: int = 0  # optimizer steps done
    micro_step: int = 0  # micro-batches done (grad_accum of them per optimizer step)
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss
    bad_in_a_row: int = 0  # not saved: a resumed run counts afresh

    def saved(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "bad_in_a_row"}

    @classmethod
    def restored(cls, saved: dict) -> "TrainState":
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})


@dataclass
class Run:
    """This process's view of the run."""
    cfg: Config
    accelerator: Any
    out: Path
    resume: Optional[Path]  # the checkpoint to continue from, None for a fresh start
    failpoints: bool = False  # COGPIPE_FAILPOINT is set (the fault tests): the loop's failpoints are live
    layout: sequence_parallel.Layout = None  # world = DP x SP: this rank's data-parallel rank and SP group
    sp_group: Any = None  # the SP process group (None at train.sequence_parallel 1)

    @property
    def log(self) -> Callable:
        return self.accelerator.print


@dataclass
class TrainData:
    dataset: CachedDataset | StoreDataset
    plan: EpochPlan | StorePlan
    draws: Draws
    extra_embeds: dict  # {prompt: (L, D)} for validation prompts and "" (the unconditional embedding)


@dataclass
class Model:
    transformer: torch.nn.Module  # wrapped by accelerate after _prepare_optimizer
    transformer_config: dict
    weight_dtype: torch.dtype
    input_dtype: torch.dtype  # what the prepared model takes (DeepSpeed: its engine's dtype)
    alphas_cumprod: torch.Tensor
    rotary: RotaryTables
    params: list  # the trainable parameters (retaken after accelerate.prepare: FSDP2 replaces them)
    trainable_names: list[str] = None
    trainable: list = None  # (name, parameter) of the prepared model's trainable weights
    unwrapped: torch.nn.Module = None  # the transformer inside accelerate's wrapper (unwrapping costs ~1 ms)


@dataclass
class Optimization:
    optimizer: Any
    lr_scheduler: Any
    ema: Optional[dict]  # {name: fp32 tensor} of the trainable weights (this process's part), when train.ema_decay > 0
    save_state: Callable = None  # (folder): the training state of a checkpoint, every launcher (sharding.save_state)
    load_state: Callable = None


class WorldNotFormed(RuntimeError):
    """The launch's processes did not form the world the launcher asked for (sharding.world_problem)."""


OOM_ADVICE = ("out of memory. Turn on memory switches: train.gradient_checkpointing=true, a smaller "
              "train.batch_size with more train.grad_accum, train.mode=lora (or a lower lora.rank), "
              "model.weight_dtype=bf16, fewer data.frames or a smaller data.height/width; "
              "`cogpipe plan --config <recipe>` estimates what fits")


# ---- setup ----------------------------------------------------------------------------------------------------

def _start(cfg: Config) -> Run:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, set_seed

    out = Path(cfg.output_dir)
    sharding.allow_cpu_sharding()
    timeout = InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.train.collective_timeout_min))
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision,
                              gradient_accumulation_steps=cfg.train.grad_accum,
                              log_with=tracking.tracker(cfg), project_dir=str(out), kwargs_handlers=[timeout])
    problem = sharding.world_problem(accelerator)  # every process alike, before any write
    if problem is not None:
        raise WorldNotFormed(problem)
    if os.environ.get(sharding.CHOSE_CPU) and accelerator.is_main_process:
        accelerator.print("no CUDA: DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu, set by cogpipe) and gloo")
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg.train.cpu_threads))
    resume = checkpoint.resolve(out, cfg.train.resume_from)  # fails early on a missing path
    _claim_output_dir(cfg, accelerator)  # before anything is written: refused, or the folder is this run's
    try:
        set_seed(cfg.train.seed)  # the same on every process: LoRA initialisation, dropout
        layout, sp_group = sequence_parallel.setup(accelerator.process_index, accelerator.num_processes,
                                                   cfg.train.sequence_parallel)
    except BaseException:
        if accelerator.is_main_process:
            rundir.release(out)
        raise
    return Run(cfg=cfg, accelerator=accelerator, out=out, resume=resume,
               failpoints=checkpoint.failpoints_armed(), layout=layout, sp_group=sp_group)


def _claim_output_dir(cfg: Config, accelerator) -> None:
    """The main process makes output_dir this run's (cogpipe.rundir: the lock, the used-folder refusal or
    train.overwrite's move aside); every rank learns its verdict before any writes, and a refused launch writes
    nothing anywhere."""
    problem, error = None, None
    if accelerator.is_main_process:
        try:
            rundir.claim(cfg.output_dir, cfg.train.resume_from, cfg.train.overwrite, cfg.data.cache_dir,
                         log=accelerator.print)
        except BaseException as e:  # the other ranks must hear of any failure, or they wait at the broadcast
            problem, error = f"{type(e).__name__}: {e}", e
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [problem]
        broadcast_object_list(box)
        problem = box[0]
    if error is not None:
        raise error
    if problem is not None:
        raise rundir.RefusedByMainProcess(f"the main process refused the output folder: {problem}")


def _prepare_data(run: Run) -> TrainData:
    """Check the data, encode every clip and prompt once (cached; the VAE and T5 leave memory after); or, with
    data.store, read the latent store's index (cogpipe.data.reader)."""
    cfg, acc = run.cfg, run.accelerator
    if not cfg.data.store:
        run.log(f"video backend: {video.backend_name()} (cogpipe.video; {video.ENV} forces one)")
    samples = [] if cfg.data.store else usable_samples(cfg, run.log, run.accelerator.device)
    if acc.is_main_process:
        save_config(cfg, run.out / "config.yaml")
        for path in checkpoint.remove_partial(run.out):
            run.log(f"removed {path}, left by a killed write")
    extra = stages.extra_prompts(cfg, [p for p, _ in validation_inputs(cfg)] if cfg.validation.every else [])
    if cfg.data.store:
        dataset, plan, extra_embeds = training_data(cfg, run.layout.dp_rank, run.layout.dp_world, acc.device, extra,
                                                    acc.process_index, acc.num_processes, acc.wait_for_everyone,
                                                    run.log)
    else:
        entries = build_cache(cfg, samples, acc.device, acc.process_index, acc.num_processes, acc.wait_for_everyone,
                              run.log, extra)
        dataset = CachedDataset(entries)
        # sequence parallel: the ranks of an SP group draw the same examples (the data order is per DP rank)
        plan = EpochPlan([s.shape for s in samples], cfg.train.batch_size, cfg.train.seed, run.layout.dp_rank,
                         run.layout.dp_world)
        extra_embeds = load_prompt_embeds(cfg, extra, acc.device)
    if plan.per_epoch == 0:
        raise ValueError(f"{'data.store' if cfg.data.store else 'data.root'}: no bucket holds one global batch of "
                         f"train.batch_size {cfg.train.batch_size} x {run.layout.dp_world} data-parallel processes "
                         f"({len(dataset)} clips)")
    scheduler = models.build_scheduler(cfg.model)
    empty = extra_embeds.get("")
    draws = Draws(seed=cfg.train.seed, num_timesteps=len(scheduler.alphas_cumprod),
                  caption_dropout=cfg.train.caption_dropout,
                  empty_embeds=empty.to(acc.device) if empty is not None else None,  # onto the device once
                  timestep_sampling=cfg.train.timestep_sampling, logit_mean=cfg.train.timestep_logit_mean,
                  logit_std=cfg.train.timestep_logit_std,
                  patch_t=models.component_configs(cfg.model)[0].get("patch_size_t"))
    return TrainData(dataset=dataset, plan=plan, draws=draws, extra_embeds=extra_embeds)


def _prepare_model(run: Run) -> Model:
    """The transformer: frozen with a LoRA adapter, or fully trainable."""
    cfg = run.cfg
    weight_dtype = models.DTYPES[cfg.model.weight_dtype]
    if cfg.train.mode == "full" and sharding.zero3_full_fine_tune(run.accelerator, cfg.model):
        transformer = sharding.zero3_transformer(run.accelerator, cfg.model, cfg.train)  # partitioned as built
    else:
        transformer = models.build_transformer(cfg.model, weight_dtype if cfg.train.mode == "lora" else torch.float32,
                                               empty=sharding.weights_from_main_process())
    offload.make_trainable(transformer, cfg)  # fp8/int8 storage of the frozen base, then the adapter (or all)
    if run.sp_group is not None:  # each sample's video tokens split across the SP group (Ulysses attention)
        sequence_parallel.enable(transformer, run.sp_group)
    if cfg.train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    offload.apply(transformer, cfg.train, run.accelerator.device, launcher=sharding.kind(run.accelerator))
    if cfg.train.compile:
        models.compile_blocks(transformer)
    transformer_config = dict(transformer.config)
    alphas_cumprod = models.build_scheduler(cfg.model).alphas_cumprod.to(run.accelerator.device)
    return Model(transformer=transformer, transformer_config=transformer_config, weight_dtype=weight_dtype,
                 input_dtype=weight_dtype, alphas_cumprod=alphas_cumprod, rotary=RotaryTables(transformer_config),
                 params=[p for p in transformer.parameters() if p.requires_grad])


def _prepare_optimizer(run: Run, model: Model) -> Optimization:
    """AdamW, the LR schedule and the EMA; accelerate wraps model and optimizer; checkpoints keep only the
    trainable weights (the hooks below)."""
    from accelerate.utils import DistributedType
    from diffusers.optimization import get_scheduler

    cfg, acc = run.cfg, run.accelerator
    optimizer = make_optimizer(cfg.train, model.params, acc.device.type)
    lr_scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer, num_warmup_steps=cfg.train.warmup_steps,
                                 num_training_steps=cfg.train.max_steps)
    sharding.configure(acc, cfg.train)
    model.transformer, optimizer = acc.prepare(model.transformer, optimizer)
    model.input_dtype = sharding.input_dtype(acc, model.weight_dtype)
    acc.register_for_checkpointing(lr_scheduler)
    model.unwrapped = acc.unwrap_model(model.transformer)
    model.trainable = sharding.trainable_parameters(acc, model.transformer)  # after prepare: FSDP2's DTensors
    model.params = [p for _, p in model.trainable]
    model.trainable_names = [n for n, _ in model.trainable]
    run.log("sharding: " + json.dumps(sharding.describe(acc, model.transformer)))  # what the launch really is
    # the EMA lives where the trained parameters live (after prepare: on the accelerator's device), in fp32, one
    # part a parameter as this process holds it (a shard under FSDP2 and ZeRO-3), gathered only to be saved
    ema = sharding.init_ema(model.trainable) if cfg.train.ema_decay > 0 else None
    deepspeed = acc.distributed_type == DistributedType.DEEPSPEED

    def write_trainable(directory):
        # trainable.safetensors holds the full trainable weights, for export and resume under any launcher; only
        # they are gathered (a collective: every process calls it), never the frozen base
        state_dict = sharding.trainable_state_dict(acc, model.transformer, model.trainable_names)
        if acc.is_main_process:
            checkpoint.save_trainable(state_dict, model.trainable_names, directory)

    def save_hook(models_, weights, directory):
        write_trainable(directory)
        weights.clear()  # only the trainable weights are saved, not the frozen base

    def read_trainable(directory):
        checkpoint.load_trainable(model.unwrapped, directory, assign=sharding.assign)

    def load_hook(models_, directory):
        if not deepspeed:  # DeepSpeed restores its (sharded) weights from its own checkpoint files
            models_.pop()  # accelerate would load a whole-model file the checkpoint does not hold
            read_trainable(directory)

    acc.register_save_state_pre_hook(save_hook)
    acc.register_load_state_pre_hook(load_hook)
    mode = cfg.train.mode
    return Optimization(optimizer=optimizer, lr_scheduler=lr_scheduler, ema=ema,
                        save_state=lambda d: sharding.save_state(acc, d, mode, model.transformer, optimizer,
                                                                 write_trainable),
                        load_state=lambda d: sharding.load_state(acc, d, mode, model.transformer, optimizer,
                                                                 read_trainable))


def _resume(run: Run, model: Model, opt: Optimization) -> TrainState:
    """The state to start from: a fresh one, or the checkpoint's (weights, optimizer, schedule, RNG, EMA)."""
    state = TrainState()
    if run.resume is not None:
        opt.load_state(run.resume)
        state = TrainState.restored(checkpoint.read_state(run.resume))
        if opt.ema is not None:
            opt.ema = sharding.ema_from_full(checkpoint.load_ema(run.resume, opt.ema), model.trainable)
        run.log(f"resumed from {run.resume} at step {state.step}")
    tracking.start(run.accelerator, run.cfg, state.step)
    return state


# ---- one step -------------------------------------------------------------------------------------------------

def _micro_step(run: Run, model: Model, opt: Optimization, inputs, meter: StepMeter, step: int):
    """Forward, loss and backward of one micro-batch; at the last of grad_accum, the update. Returns None between,
    and at the last (mean loss, grad norm, skipped) as device tensors: nothing here waits for the device."""
    acc, cfg = run.accelerator, run.cfg
    with acc.accumulate(model.transformer):
        with acc.autocast():
            v_pred = model.transformer(**inputs.kwargs)[0]
        loss = diffusion_loss(v_pred, inputs.target)
        if run.failpoints:  # the fault tests' kills and non-finite losses
            checkpoint.failpoint(f"train-step:{step + 1}")
            if checkpoint.failpoint(f"loss:{step + 1}:{acc.process_index}") == "NAN":
                loss = loss * float("nan")
        meter.add(loss)
        if cfg.train.sequence_parallel > 1:  # gradients are averaged over DP x SP ranks: see sequence_parallel.py
            loss = loss * sequence_parallel.loss_scale(cfg.train.sequence_parallel)
        deepspeed = sharding.deepspeed_update(acc, loss)  # DeepSpeed: its backward, and its update at a boundary
        if deepspeed is None:
            acc.backward(loss)
        if not acc.sync_gradients:
            return None
        if deepspeed is not None:  # ZeRO discarded a non-finite window itself
            applied, norm = deepspeed
            mean, skipped = meter.end_step(acc, also_skipped=not applied)
            grad_norm = torch.tensor(float("nan") if norm is None else norm)
        else:
            mean, skipped = meter.end_step(acc)
            grad_norm = sharding.clip_grad_norm(acc, model.params, cfg.train.max_grad_norm)
            step_unless_skipped(opt.optimizer, skipped)
        if opt.ema is not None:
            update_ema(opt.ema, {n: sharding.local_weights(p) for n, p in model.trainable}, cfg.train.ema_decay,
                       skipped)
    return mean, grad_norm, skipped


def _count_skips(run: Run, state: TrainState, meter: StepMeter, loss: float) -> None:
    """At the logging cadence: take the skipped-step counts from the device and report new ones."""
    skipped, in_a_row = int(meter.skipped.item()), int(meter.in_a_row.item())
    if skipped > state.skipped_steps:
        run.log(f"step {state.step}: non-finite loss ({loss}); update skipped ({in_a_row} in a row, {skipped} in all)")
    state.skipped_steps, state.bad_in_a_row = skipped, in_a_row


def _stop_if_diverged(run: Run, state: TrainState, save: Callable) -> None:
    """After train.max_bad_steps non-finite losses in a row (as last counted): save the last good weights, stop."""
    limit = run.cfg.train.max_bad_steps
    if state.bad_in_a_row >= limit:
        saved = save()
        raise FloatingPointError(f"{state.bad_in_a_row} non-finite losses in a row (train.max_bad_steps={limit}) at "
                                 f"step {state.step}; the last good weights are saved in {saved}. Lower train.lr, "
                                 f"check the data, or use train.mixed_precision=bf16 instead of fp16")


def _validate(run: Run, model: Model, data: TrainData, step: int) -> None:
    acc = run.accelerator
    validate_in_training(run.cfg, acc.unwrap_model(model.transformer), step, run.layout.dp_rank,
                         run.layout.dp_world, acc.device, data.extra_embeds, write=run.layout.sp_rank == 0)
    acc.wait_for_everyone()
    if acc.is_main_process:
        tracking.log_videos(acc, run.cfg, step)


# ---- the run --------------------------------------------------------------------------------------------------

def train(cfg: Config) -> Path:
    """Train as configured; returns the output folder (checkpoints/, export/, lora/, validation/). The run holds
    output_dir's lock (cogpipe.rundir) from its start to its end."""
    offload.check_available(cfg.model)  # an optional package a switch needs, before anything is written or loaded
    run = _start(cfg)
    try:
        return _train(run)
    finally:
        if run.accelerator.is_main_process:
            rundir.release(run.out)


def _train(run: Run) -> Path:
    cfg = run.cfg
    acc, tc = run.accelerator, cfg.train
    data = _prepare_data(run)
    model = _prepare_model(run)
    opt = _prepare_optimizer(run, model)
    state = _resume(run, model, opt)
    if run.resume is not None:  # the data order goes on from the checkpoint's cursor
        data.plan.check_cursor(checkpoint.read_state(run.resume).get("data"), state.micro_step)
    config_yaml = to_yaml(cfg)

    meter = StepMeter(tc.grad_accum, acc.device)
    meter.skipped += state.skipped_steps

    def save() -> Path:
        state.skipped_steps = int(meter.skipped.item())
        ema = sharding.gather_ema(acc, opt.ema, model.trainable)  # a collective: full fp32 on the main process
        return checkpoint.save(acc, run.out, state.step, {**state.saved(), "data": data.plan.cursor(state.micro_step)},
                               config_yaml, tc.checkpoints_total_limit, ema, opt.save_state)

    batches = iter(_loader(run, data, state))
    metrics = tracking.MetricsFile(acc, cfg)
    bar = tqdm(total=tc.max_steps, initial=state.step, disable=not acc.is_local_main_process, desc="train")
    model.transformer.train()
    try:
        with StopSignals() as stop, _setup_heap_frozen():
            while state.step < tc.max_steps:
                batch = draw_batch(next(batches), micro_step=state.micro_step, rank=run.layout.dp_rank,
                                   world=run.layout.dp_world, draws=data.draws, device=acc.device)
                inputs = model_inputs(batch.x0, batch.noise, batch.timesteps, batch.prompt_embeds, batch.image_latents,
                                      transformer_config=model.transformer_config,
                                      alphas_cumprod=model.alphas_cumprod, rotary=model.rotary,
                                      dtype=model.input_dtype)
                try:
                    stepped = _micro_step(run, model, opt, inputs, meter, state.step)
                except torch.OutOfMemoryError as e:
                    raise MemoryError(f"step {state.step + 1}: {OOM_ADVICE}") from e
                state.micro_step += 1
                if stepped is None:  # more micro-batches to accumulate
                    continue
                opt.lr_scheduler.step()
                state.step += 1
                bar.update(1)
                cadence = state.step % tc.log_every == 0 or state.step == tc.max_steps  # the host reads the device
                if cadence:
                    mean, grad_norm, skipped = (t.item() for t in stepped)
                    logs = {"loss": mean, "lr": opt.lr_scheduler.get_last_lr()[0],
                            "grad_norm": float("nan") if skipped else grad_norm, "steps_per_s": meter.rate()}
                    _count_skips(run, state, meter, mean)
                    tracking.log_step(acc, metrics, state.step, {**logs, "skipped_steps": state.skipped_steps}, bar)
                    _stop_if_diverged(run, state, save)
                if state.step == tc.max_steps or (tc.checkpoint_every and state.step % tc.checkpoint_every == 0):
                    save()
                if cfg.validation.every and state.step % cfg.validation.every == 0 and state.step < tc.max_steps:
                    _validate(run, model, data, state.step)
                if cadence and state.step < tc.max_steps and (signum := _stop_signal(acc, stop)):
                    done = checkpoint.checkpoints_dir(run.out) / f"checkpoint-{state.step:06d}"
                    raise Interrupted(signum, done if done.exists() else save())
    except BaseException:
        acc.end_training()
        raise
    finally:
        bar.close()
        metrics.close()
    if run.sp_group is not None:
        c = sequence_parallel.COUNTS
        run.log(f"sequence parallel {tc.sequence_parallel}: {c['all_to_all']} all-to-alls and {c['all_gather']} "
                f"all-gathers, {c['bytes_sent']} bytes sent by the first rank")
    _release(acc, model, opt)  # the export reads the final checkpoint
    sharding.end_sharded_setup()
    _finish(run, state)
    return run.out


def _release(acc, model: Model, opt: Optimization) -> None:
    """Free training before the export and render load T5 and the transformer again: the model, AdamW and its
    state, the LR schedule (which holds the optimizer), the EMA and the parameter lists, here and in accelerate's
    registered objects (prepared models/optimizers, and the schedule registered for checkpointing)."""
    model.transformer = model.unwrapped = None
    model.params, model.trainable = [], []
    opt.optimizer = opt.lr_scheduler = opt.ema = opt.save_state = opt.load_state = None
    acc._custom_objects.clear()  # register_for_checkpointing: free_memory leaves these
    acc.free_memory()  # accelerate's _models, _optimizers, _schedulers; then gc and the device cache


def _loader(run: Run, data: TrainData, state: TrainState):
    """Cached examples in the plan's order from the resumed position, read ahead by DataLoader workers into pinned
    memory on a GPU (data.num_workers; cogpipe.devices.loader_workers by default)."""
    acc, tc = run.accelerator, run.cfg.train
    workers = run.cfg.data.num_workers if run.cfg.data.num_workers is not None else loader_workers(acc.device)
    sampler = PlanSampler(data.plan, state.micro_step, tc.max_steps * tc.grad_accum)
    if workers == 0:  # read in this process: the DataLoader's machinery would only add to every step
        return ([data.dataset[i] for i in indices] for indices in sampler)
    return torch.utils.data.DataLoader(data.dataset, batch_sampler=sampler, collate_fn=examples, num_workers=workers,
                                       pin_memory=acc.device.type == "cuda", prefetch_factor=4 if workers else None,
                                       persistent_workers=False)


@contextmanager
def _setup_heap_frozen():
    """Garbage collection in the loop looks only at what the loop allocates. The setup leaves hundreds of thousands
    of live objects (the libraries, tokenizer, configs); Python's periodic full collections would walk them all (a
    third of a second each on a small CPU), so they are collected once (which also frees the encoders' cycles) and
    frozen for the loop's duration."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _stop_signal(accelerator, stop: StopSignals) -> int:
    """The largest signal number any process received (0: none): a collective, so only at the logging cadence."""
    if accelerator.num_processes == 1:
        return stop.signum
    return int(accelerator.reduce(torch.tensor(stop.signum, device=accelerator.device), "max").item())


def _finish(run: Run, state: TrainState) -> None:
    """Export the final weights as a Diffusers pipeline (+ LoRA) and render the validation videos, on the main
    process, on its device in the dtype training computed in. The other processes leave first (the final
    checkpoint is complete: its save ended in a barrier), so none waits in a collective through minutes of
    single-process work."""
    acc, cfg = run.accelerator, run.cfg
    group = run.sp_group if run.layout.dp_rank == 0 else None  # sequence parallel: the first group renders
    if not acc.is_main_process and group is None:
        acc.end_training()  # ends this process's trackers and its part of the process group
        return
    if acc.is_main_process:
        export(run.out)
    if group is not None:
        torch.distributed.barrier(group=group)  # the export is written
    dtype = compute_dtype(cfg.train.mixed_precision, models.DTYPES[cfg.model.weight_dtype], cfg.train.mode)
    render_validation(run.out, cfg, state.step, device=acc.device, dtype=dtype, sequence_group=group)
    if acc.is_main_process:
        tracking.log_videos(acc, cfg, state.step)
    acc.end_training()
