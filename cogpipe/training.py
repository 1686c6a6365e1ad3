"""train(cfg): cache latents, then one visible accelerate loop with checkpoints, resume and export.

Randomness that shapes a step (latent sample, noise, timestep) is drawn per example from a generator
seeded by (train.seed, micro-step, global batch slot), and the data order of each epoch from
(train.seed, epoch): a run is reproducible, resumes exactly from a checkpoint, and gives the same
global batch on 1 process with batch 2 as on 2 processes with batch 1.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from cogpipe import checkpoint, models
from cogpipe.cache import CachedDataset, build_cache, load_prompt_embeds
from cogpipe.config import Config, ConfigError, save_config, to_yaml
from cogpipe.diffusion import add_noise, diffusion_loss, pad_for_patch_t, rotary_embeddings, sample_timestep


def epoch_batches(shapes: list, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This process's batches of one epoch. Examples are grouped by bucket `shapes[i]`, shuffled with
    a seeded generator and cut into global batches of batch_size x world from one bucket; process r
    takes every world-th example of each global batch, so the global batch is the same for any
    number of processes."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    size = batch_size * world
    chunks = []
    for shape in sorted(set(shapes)):
        members = [i for i, s in enumerate(shapes) if s == shape]
        members = [members[i] for i in torch.randperm(len(members), generator=g).tolist()]
        chunks += [members[i:i + size] for i in range(0, len(members) - size + 1, size)]
    return [chunks[i][rank::world] for i in torch.randperm(len(chunks), generator=g).tolist()]


def example_generator(seed: int, micro_step: int, slot: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(((seed * 1_000_003 + micro_step) * 65_537 + slot) % 2**62)


def training_batch(batch: dict, seed: int, micro_step: int, rank: int, world: int, num_timesteps: int, device,
                   caption_dropout: float = 0.0, empty_embeds=None, timesteps: tuple = ("uniform", 0.0, 1.0)):
    """Per-example randomness for a batch, each example from its own seeded generator: the latent
    sample, noise, timestep (`timesteps`: sampling, logit mean, logit std, see diffusion.sample_timestep),
    caption dropout and which cached first-frame encoding (image-to-video).

    Returns x0 and noise (B, F, C, H, W), timesteps (B,), prompt embeddings (B, L, D) and the image
    latents padded with zeros over time (B, F, C, H, W), or None for text-to-video."""
    x0, noise, t, embeds, images = [], [], [], [], []
    for j in range(batch["mean"].shape[0]):
        g = example_generator(seed, micro_step, j * world + rank, device)
        mean, std = batch["mean"][j].to(device), batch["std"][j].to(device)
        x0.append(mean + std * torch.randn(mean.shape, generator=g, device=device))
        noise.append(torch.randn(mean.shape, generator=g, device=device))
        t.append(sample_timestep(num_timesteps, g, *timesteps))
        drop = caption_dropout > 0 and torch.rand((), generator=g, device=device).item() < caption_dropout
        embeds.append(empty_embeds if drop else batch["prompt_embeds"][j])
        if "image_latents" in batch:
            variants = batch["image_latents"][j]  # (K, C, 1, H, W)
            k = torch.randint(0, variants.shape[0], (1,), generator=g, device=device).item()
            image = torch.zeros_like(mean)  # (C, F, H, W): the first frame's latent, then zeros
            image[:, :1] = variants[k].to(device)
            images.append(image)
    to_bfchw = lambda xs: torch.stack(xs).permute(0, 2, 1, 3, 4)  # (B, C, F, H, W) -> (B, F, C, H, W)
    return (to_bfchw(x0), to_bfchw(noise), torch.cat(t), torch.stack(embeds).to(device),
            to_bfchw(images) if images else None)


def _collate(items: list[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _setup_tracking(cfg: Config):
    if cfg.report_to == "wandb":
        os.environ.setdefault("WANDB_MODE", cfg.wandb_mode)
        os.environ.setdefault("WANDB_DIR", str(Path(cfg.output_dir).resolve()))
        os.environ.setdefault("WANDB_SILENT", "true")
    return None if cfg.report_to == "none" else cfg.report_to


def make_optimizer(train_cfg, params):
    kwargs = dict(lr=train_cfg.lr, betas=tuple(train_cfg.adam_betas), eps=train_cfg.adam_eps,
                  weight_decay=train_cfg.weight_decay)
    if train_cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    try:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    except Exception as e:  # not installed, or no build for this device
        raise ConfigError(f"train.optimizer: adamw8bit needs bitsandbytes with support for this device "
                          f"(pip install bitsandbytes; a CUDA GPU): {type(e).__name__}: {e}. "
                          f"Use train.optimizer=adamw instead") from None


@torch.no_grad()
def update_ema(ema: dict, model, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * weights, for every trained parameter."""
    for name, p in model.named_parameters():
        if name in ema:
            ema[name].lerp_(p.detach().float(), 1.0 - decay)


def log_videos(accelerator, cfg, out: Path, step: int) -> None:
    """Send this step's validation mp4s to wandb (no-op for other trackers)."""
    if cfg.report_to != "wandb":
        return
    import wandb

    videos = sorted((out / "validation").glob(f"step-{step:06d}-*.mp4"))
    if videos:
        accelerator.log({"validation": [wandb.Video(str(v), caption=v.with_suffix(".txt").read_text().strip(),
                                                    format="mp4") for v in videos]}, step=step)


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived: a checkpoint was saved and the run stopped."""

    def __init__(self, signum: int, saved: Path):
        super().__init__(f"stopped by signal {signum} after saving {saved}")
        self.signum, self.saved = signum, saved


OOM_ADVICE = ("out of memory. Turn on memory switches: train.gradient_checkpointing=true, a smaller "
              "train.batch_size with more train.grad_accum, train.mode=lora (or a lower lora.rank), "
              "model.weight_dtype=bf16, fewer data.frames or a smaller data.height/width; "
              "`cogpipe plan --config <recipe>` estimates what fits")


def _trim_metrics(file: Path, step: int) -> None:
    """Drop metric lines past the resumed step (they are about to be recomputed)."""
    if file.exists():
        keep = [line for line in file.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        file.write_text("".join(line + "\n" for line in keep))


def train(cfg: Config) -> Path:
    """Train as configured; returns the output folder (checkpoints/, export/, lora/, validation/)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, InitProcessGroupKwargs, set_seed
    from diffusers.optimization import get_scheduler

    from cogpipe.check import usable_samples

    out = Path(cfg.output_dir)
    timeout = InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.train.collective_timeout_min))
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision,
                              gradient_accumulation_steps=cfg.train.grad_accum,
                              log_with=_setup_tracking(cfg), project_dir=str(out), kwargs_handlers=[timeout])
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    log = accelerator.print
    resume = checkpoint.resolve(out, cfg.train.resume_from)  # fails early on a missing path
    set_seed(cfg.train.seed)  # the same on every process: LoRA initialisation, dropout

    # 1. Check the data, encode every clip and prompt once (cached); the VAE and T5 leave memory after.
    samples = usable_samples(cfg, log)
    if accelerator.is_main_process:
        save_config(cfg, out / "config.yaml")
        checkpoint.remove_partial(out)
    from cogpipe.validation import validation_inputs, validate_in_training

    val_prompts = [p for p, _ in validation_inputs(cfg)] if cfg.validation.every else []
    need_empty = cfg.train.caption_dropout > 0 or bool(val_prompts)
    extra = val_prompts + ([""] if need_empty else [])
    entries = build_cache(cfg, samples, device, rank, world, accelerator.wait_for_everyone, log, extra)
    dataset = CachedDataset(entries)
    extra_embeds = load_prompt_embeds(cfg, extra)
    empty_embeds = extra_embeds.get("")
    shapes = [s.shape for s in samples]
    per_epoch = len(epoch_batches(shapes, cfg.train.batch_size, cfg.train.seed, 0, rank, world))
    if per_epoch == 0:
        raise ValueError(f"data.root: no bucket holds one global batch of train.batch_size "
                         f"{cfg.train.batch_size} x {world} processes ({len(dataset)} clips)")

    # 2. The transformer: frozen with a LoRA adapter, or fully trainable.
    weight_dtype = models.DTYPES[cfg.model.weight_dtype]
    transformer = models.build_transformer(cfg.model, weight_dtype if cfg.train.mode == "lora" else torch.float32)
    if cfg.model.fp8_frozen:  # before the adapter: only the frozen base layers are stored in fp8
        transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=weight_dtype)
    if cfg.train.mode == "lora":
        from cogpipe.lora import add_lora

        add_lora(transformer, cfg.lora)
    else:
        transformer.requires_grad_(True)
    if cfg.train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    tcfg = dict(transformer.config)
    alphas_cumprod = models.build_scheduler(cfg.model).alphas_cumprod.to(device)
    num_timesteps = len(alphas_cumprod)

    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg.train, params)
    ema = {n: p.detach().clone().float() for n, p in transformer.named_parameters() if p.requires_grad} \
        if cfg.train.ema_decay > 0 else None
    lr_scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer, num_warmup_steps=cfg.train.warmup_steps,
                                 num_training_steps=cfg.train.max_steps)
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)

    trainable_names = [n for n, p in accelerator.unwrap_model(transformer).named_parameters() if p.requires_grad]
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED

    def save_hook(models_, weights, directory):
        # trainable.safetensors holds full weights for export and resume under any launcher:
        # get_state_dict gathers ZeRO-3 / FSDP shards (a collective: every process calls it).
        state_dict = accelerator.get_state_dict(models_[0])
        if accelerator.is_main_process:
            checkpoint.save_trainable(state_dict, trainable_names, directory)
        weights.clear()  # only the trainable weights are saved, not the frozen base

    def load_hook(models_, directory):
        if not deepspeed:  # DeepSpeed restores its (sharded) weights from its own checkpoint files
            checkpoint.load_trainable(accelerator.unwrap_model(models_.pop()), directory)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    state = {"step": 0, "micro_step": 0, "skipped_steps": 0}
    if resume is not None:
        accelerator.load_state(str(resume))
        state.update(checkpoint.read_state(resume))
        if ema is not None:
            ema = checkpoint.load_ema(resume, ema)
        log(f"resumed from {resume} at step {state['step']}")
    if accelerator.is_main_process:
        _trim_metrics(out / "metrics.jsonl", state["step"])
        if cfg.report_to != "none":
            from omegaconf import OmegaConf

            accelerator.init_trackers(cfg.wandb_project, config=OmegaConf.to_container(OmegaConf.structured(cfg)))

    config_yaml = to_yaml(cfg)

    def save():
        return checkpoint.save(accelerator, out, state["step"], dict(state), config_yaml,
                               cfg.train.checkpoints_total_limit, ema)

    timesteps = (cfg.train.timestep_sampling, cfg.train.timestep_logit_mean, cfg.train.timestep_logit_std)

    # SIGTERM / SIGINT: finish the optimizer step in flight, save a checkpoint, stop.
    stop = {"signum": 0}
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            handlers[signum] = signal.signal(signum, lambda n, _f: stop.update(signum=n))

    # 3. The loop: one optimizer step = grad_accum micro-batches on every process.
    bar = tqdm(total=cfg.train.max_steps, initial=state["step"], disable=not accelerator.is_local_main_process,
               desc="train")
    transformer.train()
    tic, steps_timed, loss_sum, bad_micro, bad_in_a_row = time.perf_counter(), 0, 0.0, False, 0
    try:
        while state["step"] < cfg.train.max_steps:
            micro = state["micro_step"]
            epoch, pos = divmod(micro, per_epoch)
            indices = epoch_batches(shapes, cfg.train.batch_size, cfg.train.seed, epoch, rank, world)[pos]
            batch = _collate([dataset[i] for i in indices])
            x0, noise, t, embeds, image = training_batch(batch, cfg.train.seed, micro, rank, world, num_timesteps,
                                                         device, cfg.train.caption_dropout, empty_embeds,
                                                         timesteps)
            patch_t = tcfg.get("patch_size_t")
            x0, noise = pad_for_patch_t(x0, patch_t), pad_for_patch_t(noise, patch_t)
            noisy = add_noise(x0, noise, t, alphas_cumprod)  # (B, F, C, H, W)
            model_input = noisy if image is None else torch.cat([noisy, pad_for_patch_t(image, patch_t)], dim=2)
            rope = rotary_embeddings(tcfg, x0.shape[1], x0.shape[3], x0.shape[4], device)
            ofs = torch.full((x0.shape[0],), 2.0, device=device) if tcfg.get("ofs_embed_dim") else None
            try:
                with accelerator.accumulate(transformer):
                    with accelerator.autocast():
                        v_pred = transformer(hidden_states=model_input.to(weight_dtype),
                                             encoder_hidden_states=embeds.to(weight_dtype), timestep=t, ofs=ofs,
                                             image_rotary_emb=rope, return_dict=False)[0]
                    loss = diffusion_loss(v_pred, x0, noisy, t, alphas_cumprod)
                    checkpoint.failpoint(f"train-step:{state['step'] + 1}")
                    accelerator.backward(loss)
                    bad_micro |= not bool(torch.isfinite(loss.detach()))
                    if accelerator.sync_gradients:
                        bad = accelerator.reduce(torch.tensor(float(bad_micro), device=device), "sum").item() > 0
                        if not bad:
                            grad_norm = accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm)
                            optimizer.step()
                            if ema is not None:
                                update_ema(ema, accelerator.unwrap_model(transformer), cfg.train.ema_decay)
                        optimizer.zero_grad(set_to_none=True)
            except torch.OutOfMemoryError as e:
                raise MemoryError(f"step {state['step'] + 1}: {OOM_ADVICE}") from e
            state["micro_step"] = micro + 1
            loss_sum += loss.detach().float().item()
            if not accelerator.sync_gradients:
                continue
            lr_scheduler.step()
            state["step"] += 1
            steps_timed += 1
            step = state["step"]
            mean_loss = accelerator.reduce(torch.tensor(loss_sum / cfg.train.grad_accum, device=device), "mean").item()
            loss_sum, bad_micro = 0.0, False
            if bad:  # a non-finite loss: the update was skipped
                state["skipped_steps"] += 1
                bad_in_a_row += 1
                log(f"step {step}: non-finite loss ({mean_loss}); update skipped "
                    f"({bad_in_a_row} in a row, {state['skipped_steps']} in all)")
                if bad_in_a_row >= cfg.train.max_bad_steps:
                    saved = save()
                    raise FloatingPointError(
                        f"{bad_in_a_row} non-finite losses in a row (train.max_bad_steps={cfg.train.max_bad_steps})"
                        f" at step {step}; the last good weights are saved in {saved}. Lower train.lr, "
                        f"check the data, or use train.mixed_precision=bf16 instead of fp16")
            else:
                bad_in_a_row = 0
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                rate = steps_timed / (time.perf_counter() - tic)
                logs = {"loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0],
                        "grad_norm": float(grad_norm) if not bad else float("nan"), "steps_per_s": rate,
                        "skipped_steps": state["skipped_steps"]}
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{logs['lr']:.2e}", it_s=f"{rate:.2f}")
                accelerator.log(logs, step=step)
                if accelerator.is_main_process:
                    with open(out / "metrics.jsonl", "a") as f:
                        f.write(json.dumps({"step": step, **logs}) + "\n")
            bar.update(1)
            if step == cfg.train.max_steps or (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0):
                save()
            if cfg.validation.every and step % cfg.validation.every == 0 and step < cfg.train.max_steps:
                validate_in_training(cfg, accelerator.unwrap_model(transformer), step, rank, world, device,
                                     extra_embeds)
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    log_videos(accelerator, cfg, out, step)
            signum = int(accelerator.reduce(torch.tensor(stop["signum"], device=device), "max").item())
            if signum and step < cfg.train.max_steps:
                saved = save() if not (out / "checkpoints" / f"checkpoint-{step:06d}").exists() else None
                raise Interrupted(signum, saved or checkpoint.checkpoints_dir(out) / f"checkpoint-{step:06d}")
    except BaseException:
        accelerator.end_training()
        raise
    finally:
        bar.close()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)

    # 4. Export the final weights as a Diffusers pipeline (+ LoRA) and render the validation videos.
    del transformer, optimizer
    if accelerator.is_main_process:
        from cogpipe.export import export
        from cogpipe.validation import render_validation

        export(out)
        render_validation(out, cfg, state["step"])
        log_videos(accelerator, cfg, out, state["step"])
    accelerator.wait_for_everyone()
    accelerator.end_training()  # also ends the process group: no collective after this
    return out
