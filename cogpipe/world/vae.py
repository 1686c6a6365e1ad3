"""Train a tiny CogVideoX VAE (AutoencoderKLCogVideoX) to reconstruct clips: L1 + MSE + a small KL term.

    cogpipe world train-vae --config configs/world/tiny_world_vae.yaml [key=value ...]

The VAE keeps the CogVideoX layout (16 latent channels, 4x temporal compression, causal 3D convolutions; 8x
spatial compression with 4 levels, or 4x with 3 for a 64x64 world) with few channels, so it trains on a
laptop CPU. Clips are decoded with cogpipe.data.folders (VideoDataset: decord, even frame sampling, resize/crop to
[-1, 1]). No GAN, no perceptual loss: the world is flat shapes on a plain background. At the end the
latents' spread around each channel's mean sets `scaling_factor` (what a clip shows gets the standard
deviation `model.scaled_latent_std` in the scaled latents: 1 is what the diffusion schedule assumes), the
model is saved with `save_pretrained` and reconstructions of freshly rendered world clips (the held-out
colour included) are scored with cogpipe.world.score.

    <output_dir>/vae/             the trained VAE (config.json + diffusion_pytorch_model.safetensors)
    <output_dir>/checkpoint/      the same every `train.save_every` steps (to continue with model.pretrained)
    <output_dir>/config.yaml      the resolved config;  metrics.jsonl: loss per step;  eval.json: the scores

Saves are atomic (cogpipe.atomic); a run first sweeps what a killed one left in its output folder.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from omegaconf import MISSING

from cogpipe import atomic
from cogpipe.config import ConfigError, add_recipe_arguments, ensure, merge_structured, save_config
from cogpipe.data.folders import VideoDataset
from cogpipe.world import render as world
from cogpipe.world.score import score_many


@dataclass
class VaeModelConfig:
    # 4 levels: the 8x spatial compression of CogVideoX; 3 levels: 4x (more latent pixels for a small world)
    block_out_channels: list[int] = field(default_factory=lambda: [16, 16, 16, 16])
    layers_per_block: int = 1
    norm_num_groups: int = 4
    latent_channels: int = 16  # what every CogVideoX transformer takes
    # a saved VAE folder to continue from (ignores the shape keys above)
    pretrained: Optional[str] = field(default=None, metadata={"path": True})
    init_seed: int = 0
    # the spread (standard deviation around each channel's mean) of the scaled latents a diffusion model trains
    # on: scaling_factor = scaled_latent_std / the measured spread. 1 is the usual choice; above 1 puts less of
    # the noise schedule where a small latent (16x16 pixels) shows nothing
    scaled_latent_std: float = 1.0

    def __post_init__(self):
        ensure(len(self.block_out_channels) in (3, 4), "model.block_out_channels",
               f"needs 3 or 4 levels (4x or 8x spatial compression; the first two also compress time 4x), "
               f"got {len(self.block_out_channels)}")
        ensure(all(c % self.norm_num_groups == 0 for c in self.block_out_channels), "model.norm_num_groups",
               f"must divide every block_out_channels {self.block_out_channels}")
        ensure(self.scaled_latent_std > 0, "model.scaled_latent_std",
               f"must be positive, got {self.scaled_latent_std}")


@dataclass
class VaeDataConfig:
    # clips: prompts.txt + videos.txt, metadata.jsonl/csv or captioned videos
    root: str = field(default=MISSING, metadata={"path": True})
    frames: int = 9  # 8N+1 like CogVideoX (4x temporal compression to an odd latent count, which decodes back)
    height: int = 64
    width: int = 64
    crop: Optional[int] = None  # train on crop x crop windows holding the shape (cheaper; the VAE is convolutional)
    hue_rotate: bool = True  # rotate each training clip's hues by a random angle: the VAE codes every colour

    def __post_init__(self):
        ensure(self.frames >= 1 and (self.frames - 1) % 8 == 0, "data.frames", f"must be 8N+1, got {self.frames}")
        for key in ("height", "width", "crop"):
            value = getattr(self, key)
            ensure(value is None or (value > 0 and value % 8 == 0), f"data.{key}",
                   f"must be a positive multiple of 8 (8x spatial compression), got {value}")
        ensure(self.crop is None or self.crop <= min(self.height, self.width), "data.crop",
               f"must fit in data.height x data.width, got {self.crop}")


@dataclass
class VaeTrainConfig:
    max_steps: int = 1000
    batch_size: int = 4
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 1e-4
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    edge_weight: float = 0.0  # L1 between the spatial gradients of clip and reconstruction: sharper edges
    foreground_weight: float = 0.0  # extra weight of pixels away from the clip's background colour: the shape,
    # a small part of each frame, would otherwise count for little and its colour could be lost
    kl_weight: float = 1e-6  # small: just enough to keep the latent distribution bounded
    max_grad_norm: float = 1.0
    seed: int = 0
    log_every: int = 10
    save_every: int = 200  # steps between saves of <output_dir>/checkpoint; 0 = only at the end
    max_minutes: Optional[float] = None  # time budget: the LR schedule follows steps or time, whichever ends first

    def __post_init__(self):
        for key in ("max_steps", "batch_size", "log_every"):
            ensure(getattr(self, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(self, key)}")
        ensure(self.lr > 0, "train.lr", f"must be positive, got {self.lr}")


@dataclass
class VaeConfig:
    output_dir: str = field(default=MISSING, metadata={"path": True})
    model: VaeModelConfig = field(default_factory=VaeModelConfig)
    data: VaeDataConfig = field(default_factory=VaeDataConfig)
    train: VaeTrainConfig = field(default_factory=VaeTrainConfig)
    eval_clips: int = 60  # world clips (every shape x colour x direction, purple included) scored at the end


def load_vae_config(path=None, overrides=()) -> VaeConfig:
    """Schema defaults, then the YAML, then key=value overrides; errors name the key."""
    return merge_structured(VaeConfig, path, overrides)


class InMemory(torch.utils.data.Dataset):
    """Decode each clip once; later epochs read its frames from memory (a 2000-clip world is ~0.9 GB)."""

    def __init__(self, dataset):
        self.dataset, self.frames = dataset, {}

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        if i not in self.frames:
            self.frames[i] = self.dataset[i]["frames"]
        return {"frames": self.frames[i]}


def new_vae(model_cfg: VaeModelConfig):
    """The VAE this recipe trains: a saved one to continue from, or a fresh one of the configured shape."""
    from diffusers import AutoencoderKLCogVideoX

    if model_cfg.pretrained:
        return AutoencoderKLCogVideoX.from_pretrained(model_cfg.pretrained)
    torch.manual_seed(model_cfg.init_seed)
    levels = len(model_cfg.block_out_channels)
    return AutoencoderKLCogVideoX(block_out_channels=tuple(model_cfg.block_out_channels),
                                  down_block_types=("CogVideoXDownBlock3D",) * levels,
                                  up_block_types=("CogVideoXUpBlock3D",) * levels,
                                  layers_per_block=model_cfg.layers_per_block,
                                  norm_num_groups=model_cfg.norm_num_groups,
                                  latent_channels=model_cfg.latent_channels, sample_height=64, sample_width=64)


def learning_rate(train_cfg: VaeTrainConfig, step: int, minutes: float) -> float:
    """Linear warm-up, then a cosine decay to 0 over the run; with `max_minutes` the run's progress is the
    larger of its step and time fractions, so a slower machine still ends on a decayed learning rate."""
    import math

    if step < train_cfg.warmup_steps:
        return train_cfg.lr * (step + 1) / train_cfg.warmup_steps
    progress = step / train_cfg.max_steps
    if train_cfg.max_minutes:
        progress = max(progress, minutes / train_cfg.max_minutes)
    return train_cfg.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def foreground(video: torch.Tensor) -> torch.Tensor:
    """(..., 3, F, H, W) in [-1, 1] -> bool (..., F, H, W): pixels away from their clip's background colour
    (the clip's median colour)."""
    background = video.flatten(-3).median(dim=-1).values[..., None, None, None]  # (..., 3, 1, 1, 1)
    return (video - background).abs().sum(dim=-4) > 0.1


def pixel_weights(video: torch.Tensor, foreground_weight: float) -> torch.Tensor:
    """(B, 3, F, H, W) -> (B, 1, F, H, W): 1 + foreground_weight on the foreground, 1 elsewhere, scaled to
    mean 1 so the loss keeps its size."""
    weight = 1.0 + foreground_weight * foreground(video).unsqueeze(1).float()
    return weight / weight.mean()


def vae_loss(vae, video: torch.Tensor, train_cfg: VaeTrainConfig, generator=None) -> tuple[torch.Tensor, dict]:
    """video (B, 3, F, H, W) in [-1, 1] -> loss, parts. The latent is sampled (reparameterised)."""
    posterior = vae.encode(video).latent_dist
    z = posterior.sample(generator)  # (B, 16, F', H/8, W/8)
    recon = vae.decode(z).sample  # (B, 3, F, H, W)
    weight = pixel_weights(video, train_cfg.foreground_weight) if train_cfg.foreground_weight else 1.0
    l1 = ((recon - video).abs() * weight).mean()
    mse = (((recon - video) ** 2) * weight).mean()
    kl = 0.5 * (posterior.mean**2 + posterior.var - 1.0 - posterior.logvar).mean()  # per latent element
    edge = ((recon.diff(dim=-1) - video.diff(dim=-1)).abs().mean()
            + (recon.diff(dim=-2) - video.diff(dim=-2)).abs().mean())
    loss = (train_cfg.l1_weight * l1 + train_cfg.mse_weight * mse + train_cfg.edge_weight * edge
            + train_cfg.kl_weight * kl)
    return loss, {"l1": l1.item(), "mse": mse.item(), "edge": edge.item(), "kl": kl.item()}


@torch.no_grad()
def reconstruct(vae, frames: torch.Tensor) -> torch.Tensor:
    """frames (F, 3, H, W) in [-1, 1] -> the VAE's reconstruction from the latent mean, same shape."""
    x = frames.permute(1, 0, 2, 3).unsqueeze(0).to(vae.dtype)  # (1, 3, F, H, W)
    z = vae.encode(x).latent_dist.mean
    return vae.decode(z).sample[0].permute(1, 0, 2, 3).clamp(-1, 1).float()


@torch.no_grad()
def latent_std(vae, loader, batches: int = 8) -> float:
    """Standard deviation of the (unscaled) latent means around each channel's mean, over some batches of
    the data: the spread of what a clip shows, without the constant offsets a channel carries everywhere
    (the plain background), which would otherwise take up most of it."""
    values = []
    for i, batch in enumerate(loader):
        if i >= batches:
            break
        z = vae.encode(batch["frames"].permute(0, 2, 1, 3, 4)).latent_dist.mean  # (B, C, F, H, W)
        values.append(z.transpose(0, 1).flatten(1))
    z = torch.cat(values, dim=1)  # (C, N)
    return float((z - z.mean(dim=1, keepdim=True)).std())


@torch.no_grad()
def evaluate(vae, n: int, frames: int = 17, size: int = 64, seed: int = 12345) -> dict:
    """Render n world clips (every shape x colour x direction, the held-out colour included), reconstruct
    them and score the reconstructions against their captions; PSNR in dB over all of them."""
    import itertools

    import numpy as np

    combos = list(itertools.product(world.SHAPES, world.ALL_COLOURS, world.DIRECTIONS))
    items, held, se = [], [], []
    for i in range(n):
        shape, colour, direction = combos[i % len(combos)]
        clip = world.render(shape, colour, direction, frames=frames, size=size, seed=seed + i)
        x = torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        rec = ((reconstruct(vae, x) + 1) * 127.5).round().clamp(0, 255).permute(0, 2, 3, 1).byte().numpy()
        se.append(((rec.astype(np.float64) - clip) ** 2).mean())
        (held if colour == world.HELD_OUT_COLOUR else items).append((rec, world.caption(shape, colour, direction)))
    return {"palette": score_many(items), "held_out": score_many(held) if held else None,
            "psnr_db": float(10 * np.log10(255.0**2 / np.mean(se)))}


def random_crop(video: torch.Tensor, size, generator) -> torch.Tensor:
    """(B, 3, F, H, W) -> (B, 3, F, size, size), one window per clip on an 8-pixel grid (on the latent grid
    at 4x and 8x compression), drawn among the windows that hold the clip's foreground centre (every window
    when the clip is plain)."""
    if size is None:
        return video
    h, w = video.shape[-2:]
    out = []
    for clip in video:
        ys, xs = torch.nonzero(foreground(clip).any(dim=0), as_tuple=True)  # over all frames
        windows = []
        for extent, centres in ((h, ys), (w, xs)):
            starts = torch.arange(0, extent - size + 1, 8)
            if len(centres):
                c = centres.float().mean()
                held = starts[(starts <= c) & (c < starts + size)]
                starts = held if len(held) else starts
            windows.append(int(starts[torch.randint(0, len(starts), (1,), generator=generator)]))
        top, left = windows
        out.append(clip[..., top:top + size, left:left + size])
    return torch.stack(out)


def rotate_hue(video: torch.Tensor, generator) -> torch.Tensor:
    """(B, 3, F, H, W) in [-1, 1]: each clip's colours turned about the grey axis by a random angle.

    Greys (the world's background) stay; red, yellow, green and blue become any hue, purple included, so
    the VAE is a colour codec like one trained on natural images, while the transformer still never sees
    purple (its clips are encoded as they are).
    """
    out = []
    k = torch.full((3,), 3**-0.5)
    cross = torch.tensor([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    for clip in video:
        theta = 2 * torch.pi * float(torch.rand((), generator=generator))
        rot = (torch.cos(torch.tensor(theta)) * torch.eye(3) + torch.sin(torch.tensor(theta)) * cross
               + (1 - torch.cos(torch.tensor(theta))) * torch.outer(k, k))  # Rodrigues: rotation about (1,1,1)
        rgb = (clip + 1) / 2  # (3, F, H, W) in [0, 1]
        out.append((torch.einsum("ij,jfhw->ifhw", rot, rgb).clamp(0, 1) * 2 - 1))
    return torch.stack(out)


def _save(vae, folder: Path) -> None:
    with atomic.folder(folder) as tmp:
        vae.save_pretrained(tmp)


def _stack_frames(items: list[dict]) -> dict:
    return {"frames": torch.stack([it["frames"] for it in items])}


def train_vae(cfg: VaeConfig, log=print) -> Path:
    """Train as configured; returns <output_dir>/vae (a save_pretrained folder)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for path in atomic.sweep(out):
        log(f"removed {path}, left by a killed write")
    save_config(cfg, out / "config.yaml")
    train_cfg = cfg.train
    torch.manual_seed(train_cfg.seed)
    dataset = InMemory(VideoDataset(cfg.data.root, cfg.data.frames, cfg.data.height, cfg.data.width))
    loader = torch.utils.data.DataLoader(dataset, batch_size=train_cfg.batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(train_cfg.seed),
                                         collate_fn=_stack_frames)
    if len(loader) == 0:
        raise ValueError(f"data.root: {len(dataset)} clips, fewer than one batch of {train_cfg.batch_size}")
    vae = new_vae(cfg.model).train()
    log(f"VAE: {sum(p.numel() for p in vae.parameters()):,} parameters, {len(dataset)} clips")
    optimizer = torch.optim.AdamW(vae.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    noise = torch.Generator().manual_seed(train_cfg.seed + 1)

    step, start, metrics = 0, time.perf_counter(), open(out / "metrics.jsonl", "w")
    while step < train_cfg.max_steps:
        for batch in loader:
            minutes = (time.perf_counter() - start) / 60
            lr = learning_rate(train_cfg, step, minutes)
            for group in optimizer.param_groups:
                group["lr"] = lr
            video = batch["frames"].permute(0, 2, 1, 3, 4)  # (B, F, 3, H, W) -> (B, 3, F, H, W)
            video = random_crop(video, cfg.data.crop, noise)
            if cfg.data.hue_rotate:
                video = rotate_hue(video, noise)
            loss, parts = vae_loss(vae, video, train_cfg, noise)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(vae.parameters(), train_cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            minutes = (time.perf_counter() - start) / 60
            if step % train_cfg.log_every == 0 or step == train_cfg.max_steps:
                row = {"step": step, "loss": loss.item(), **parts, "grad_norm": float(grad_norm),
                       "lr": lr, "minutes": round(minutes, 2)}
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                log(json.dumps(row))
            out_of_time = train_cfg.max_minutes is not None and minutes >= train_cfg.max_minutes
            if train_cfg.save_every and step % train_cfg.save_every == 0:
                _save(vae, out / "checkpoint")
            if step >= train_cfg.max_steps or out_of_time:
                break
        if out_of_time:
            log(f"stopping at step {step}: train.max_minutes={train_cfg.max_minutes} reached")
            break
    metrics.close()

    vae.eval()
    std = latent_std(vae, loader)
    vae.register_to_config(scaling_factor=round(cfg.model.scaled_latent_std / std, 6))
    _save(vae, out / "vae")
    result = {"steps": step, "train_minutes": round((time.perf_counter() - start) / 60, 2), "latent_std": std,
              "scaling_factor": vae.config.scaling_factor}
    if cfg.eval_clips:
        result.update(evaluate(vae, cfg.eval_clips))
    atomic.write_json(out / "eval.json", result, indent=2)
    log(json.dumps(result))
    return out / "vae"


def add_arguments(parser) -> None:
    add_recipe_arguments(parser, "configs/world/tiny_world_vae.yaml")


def run(args) -> int:
    try:
        cfg = load_vae_config(args.config, args.overrides)
        print(f"done: {train_vae(cfg)}")
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
