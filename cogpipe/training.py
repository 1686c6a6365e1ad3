"""train(cfg): cache latents, then one visible accelerate loop with checkpoints, resume and export.

Randomness that shapes a step (latent sample, noise, timestep) is drawn per example from a generator
seeded by (train.seed, micro-step, global batch slot), and the data order of each epoch from
(train.seed, epoch): a run is reproducible, resumes exactly from a checkpoint, and gives the same
global batch on 1 process with batch 2 as on 2 processes with batch 1.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cogpipe import checkpoint, models
from cogpipe.cache import CachedDataset, build_cache
from cogpipe.config import Config, save_config, to_yaml
from cogpipe.data import discover
from cogpipe.diffusion import add_noise, diffusion_loss, pad_for_patch_t, rotary_embeddings


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This process's batches of one epoch: a seeded permutation, split across processes."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    shard = perm[rank::world][: n // world]
    return [shard[i:i + batch_size] for i in range(0, len(shard) - batch_size + 1, batch_size)]


def example_generator(seed: int, micro_step: int, slot: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(((seed * 1_000_003 + micro_step) * 65_537 + slot) % 2**62)


def training_batch(batch: dict, seed: int, micro_step: int, rank: int, world: int, num_timesteps: int, device):
    """Sample latents, noise and timesteps for a batch: each example from its own seeded generator."""
    x0, noise, t = [], [], []
    for j in range(batch["mean"].shape[0]):
        g = example_generator(seed, micro_step, j * world + rank, device)
        mean, std = batch["mean"][j].to(device), batch["std"][j].to(device)
        x0.append(mean + std * torch.randn(mean.shape, generator=g, device=device))
        noise.append(torch.randn(mean.shape, generator=g, device=device))
        t.append(torch.randint(0, num_timesteps, (1,), generator=g, device=device))
    x0 = torch.stack(x0).permute(0, 2, 1, 3, 4)  # (B, C, F, H, W) -> (B, F, C, H, W)
    noise = torch.stack(noise).permute(0, 2, 1, 3, 4)
    return x0, noise, torch.cat(t)


def _collate(items: list[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _setup_tracking(cfg: Config):
    if cfg.report_to == "wandb":
        os.environ.setdefault("WANDB_MODE", cfg.wandb_mode)
        os.environ.setdefault("WANDB_DIR", str(Path(cfg.output_dir).resolve()))
        os.environ.setdefault("WANDB_SILENT", "true")
    return None if cfg.report_to == "none" else cfg.report_to


def train(cfg: Config) -> Path:
    """Train as configured; returns the output folder (checkpoints/, export/, lora/, validation/)."""
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    out = Path(cfg.output_dir)
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision,
                              gradient_accumulation_steps=cfg.train.grad_accum,
                              log_with=_setup_tracking(cfg), project_dir=str(out))
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    log = accelerator.print
    resume = checkpoint.resolve(out, cfg.train.resume_from)  # fails early on a missing path
    if accelerator.is_main_process:
        save_config(cfg, out / "config.yaml")

    # 1. Encode every clip and prompt once (cached on disk); the VAE and T5 leave memory after.
    samples = discover(cfg.data.root)
    entries = build_cache(cfg, samples, device, rank, world, accelerator.wait_for_everyone, log)
    dataset = CachedDataset(entries)
    global_batch = cfg.train.batch_size * world
    if len(dataset) < global_batch:
        raise ValueError(f"data.root: {len(dataset)} clips, fewer than one global batch "
                         f"(train.batch_size {cfg.train.batch_size} x {world} processes)")

    # 2. The transformer: frozen with a LoRA adapter, or fully trainable.
    weight_dtype = models.DTYPES[cfg.model.weight_dtype]
    transformer = models.build_transformer(cfg.model, weight_dtype if cfg.train.mode == "lora" else torch.float32)
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
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=tuple(cfg.train.adam_betas),
                                  eps=cfg.train.adam_eps, weight_decay=cfg.train.weight_decay)
    lr_scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer, num_warmup_steps=cfg.train.warmup_steps,
                                 num_training_steps=cfg.train.max_steps)
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    unwrapped = accelerator.unwrap_model(transformer)

    def save_hook(models_, weights, directory):
        if accelerator.is_main_process:
            checkpoint.save_trainable(accelerator.unwrap_model(models_[0]), directory)
        weights.clear()  # only the trainable weights are saved, not the frozen base

    def load_hook(models_, directory):
        checkpoint.load_trainable(accelerator.unwrap_model(models_.pop()), directory)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    step = micro = 0
    if resume is not None:
        accelerator.load_state(str(resume))
        state = checkpoint.read_state(resume)
        step, micro = state["step"], state["micro_step"]
        log(f"resumed from {resume} at step {step}")
    if accelerator.is_main_process and cfg.report_to != "none":
        from omegaconf import OmegaConf

        accelerator.init_trackers(cfg.wandb_project, config=OmegaConf.to_container(OmegaConf.structured(cfg)))

    # 3. The loop: one optimizer step = grad_accum micro-batches on every process.
    config_yaml = to_yaml(cfg)
    per_epoch = len(epoch_batches(len(dataset), cfg.train.batch_size, cfg.train.seed, 0, rank, world))
    bar = tqdm(total=cfg.train.max_steps, initial=step, disable=not accelerator.is_local_main_process,
               desc="train")
    transformer.train()
    tic, steps_timed = time.perf_counter(), 0
    loss_sum = 0.0
    while step < cfg.train.max_steps:
        epoch, pos = divmod(micro, per_epoch)
        indices = epoch_batches(len(dataset), cfg.train.batch_size, cfg.train.seed, epoch, rank, world)[pos]
        batch = _collate([dataset[i] for i in indices])
        x0, noise, t = training_batch(batch, cfg.train.seed, micro, rank, world, num_timesteps, device)
        x0, noise = pad_for_patch_t(x0, tcfg.get("patch_size_t")), pad_for_patch_t(noise, tcfg.get("patch_size_t"))
        noisy = add_noise(x0, noise, t, alphas_cumprod)  # (B, F, C, H, W)
        rope = rotary_embeddings(tcfg, x0.shape[1], x0.shape[3], x0.shape[4], device)
        embeds = batch["prompt_embeds"].to(device)
        with accelerator.accumulate(transformer):
            with accelerator.autocast():
                v_pred = transformer(hidden_states=noisy.to(weight_dtype), encoder_hidden_states=embeds.to(weight_dtype),
                                     timestep=t, image_rotary_emb=rope, return_dict=False)[0]
            loss = diffusion_loss(v_pred, x0, noisy, t, alphas_cumprod)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        micro += 1
        loss_sum += loss.detach().float().item()
        if not accelerator.sync_gradients:
            continue
        lr_scheduler.step()
        step += 1
        steps_timed += 1
        mean_loss = accelerator.reduce(torch.tensor(loss_sum / cfg.train.grad_accum, device=device), "mean").item()
        loss_sum = 0.0
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"loss is {mean_loss} at step {step}")
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            rate = steps_timed / (time.perf_counter() - tic)
            logs = {"loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                    "steps_per_s": rate}
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{logs['lr']:.2e}", it_s=f"{rate:.2f}")
            accelerator.log(logs, step=step)
            if accelerator.is_main_process:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, **logs}) + "\n")
        bar.update(1)
        if step == cfg.train.max_steps or (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0):
            checkpoint.save(accelerator, out, step, {"step": step, "micro_step": micro}, config_yaml,
                            cfg.train.checkpoints_total_limit)
    bar.close()
    accelerator.end_training()

    # 4. Export the final weights as a Diffusers pipeline (+ LoRA) and render the validation videos.
    del transformer, optimizer, unwrapped
    if accelerator.is_main_process:
        from cogpipe.export import export, render_validation

        export(out)
        render_validation(out, cfg, step)
    accelerator.wait_for_everyone()
    return out
