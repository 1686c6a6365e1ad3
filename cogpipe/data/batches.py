"""Which cached examples make each step's batch, and the per-example randomness of a step.

Randomness that shapes a step (latent sample, noise, timestep, caption dropout, first-frame variant) is drawn
per example from a generator seeded by (train.seed, micro-step, global batch slot), and the data order of each
epoch from (train.seed, epoch): a run is reproducible, resumes exactly from a checkpoint, and gives the same
global batch on 1 process with batch 2 as on 2 processes with batch 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from cogpipe.diffusion import padding_frames, sample_timestep


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


class EpochPlan:
    """The data order as micro-step -> example indices, each epoch's order computed once."""

    def __init__(self, shapes: list, batch_size: int, seed: int, rank: int, world: int):
        self.shapes, self.batch_size, self.seed, self.rank, self.world = shapes, batch_size, seed, rank, world
        self._epoch, self._batches = 0, self._order(0)
        self.per_epoch = len(self._batches)  # the same every epoch: buckets keep their sizes

    def _order(self, epoch: int) -> list[list[int]]:
        return epoch_batches(self.shapes, self.batch_size, self.seed, epoch, self.rank, self.world)

    def cursor(self, micro_step: int) -> dict:
        """Where the data order stands before `micro_step` (epoch, position): recorded in a checkpoint."""
        epoch, position = divmod(micro_step, self.per_epoch)
        return {"epoch": epoch, "position": position}

    def check_cursor(self, saved, micro_step: int) -> None:
        """A folder's order is its clips' (seed, epoch) order: nothing to check beyond micro_step."""

    def indices(self, micro_step: int) -> list[int]:
        epoch, position = divmod(micro_step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._order(epoch)
        return self._batches[position]


class PlanSampler(torch.utils.data.Sampler):
    """A DataLoader batch sampler: each micro-step's example indices from `start` (a resumed run's position) to
    `stop`, in the plan's order."""

    def __init__(self, plan: EpochPlan, start: int, stop: int):
        self.plan, self.start, self.stop = plan, start, stop

    def __iter__(self):
        for micro_step in range(self.start, self.stop):
            yield self.plan.indices(micro_step)

    def __len__(self) -> int:
        return self.stop - self.start


def example_generator(seed: int, micro_step: int, slot: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(((seed * 1_000_003 + micro_step) * 65_537 + slot) % 2**62)


@dataclass(frozen=True)
class Draws:
    """How a step's randomness is drawn (see `draw_batch`)."""
    seed: int
    num_timesteps: int
    caption_dropout: float = 0.0
    empty_embeds: Optional[torch.Tensor] = None  # (L, D): the empty prompt, for caption dropout
    timestep_sampling: str = "uniform"  # see diffusion.sample_timestep
    logit_mean: float = 0.0
    logit_std: float = 1.0
    patch_t: Optional[int] = None  # CogVideoX1.5's temporal patch: noise is drawn for the padded frame count too


@dataclass
class TrainingBatch:
    x0: torch.Tensor  # (B, F, C, H, W): clean latents, sampled from the cached distribution
    noise: torch.Tensor  # (B, F, C, H, W)
    timesteps: torch.Tensor  # (B,)
    prompt_embeds: torch.Tensor  # (B, L, D)
    image_latents: Optional[torch.Tensor]  # (B, F, C, H, W): first frame's latents then zeros; None for T2V


def examples(items: list[dict]) -> list[dict]:
    """The DataLoader's collate_fn: the examples as they are; draw_batch batches them (stacking here and taking apart
    there would copy every tensor twice)."""
    return list(items)


def _batched(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)  # batch 1: a view, no copy


def _as_bfchw(tensors: list[torch.Tensor]) -> torch.Tensor:
    return _batched(tensors).permute(0, 2, 1, 3, 4)  # (B, C, F, H, W) -> (B, F, C, H, W)


def draw_batch(batch: list[dict], *, micro_step: int, rank: int, world: int, draws: Draws, device) -> TrainingBatch:
    """Per-example randomness for the cached examples of one micro-batch ({"mean", "std", "prompt_embeds"[,
    "image_latents"]} each), each example from its own seeded generator: the latent sample, noise, timestep, caption
    dropout and which cached first-frame encoding (image-to-video). Every choice is made on the device: nothing
    waits for the host."""
    x0, noise, t, embeds, images = [], [], [], [], []
    empty = draws.empty_embeds if draws.caption_dropout > 0 else None  # on the device already (training puts it)
    for j, example in enumerate(batch):
        g = example_generator(draws.seed, micro_step, j * world + rank, device)
        mean = example["mean"].to(device, non_blocking=True)  # (C, F, H, W)
        std = example["std"].to(device, non_blocking=True)
        x0.append(mean + std * torch.randn(mean.shape, generator=g, device=device))
        frames = mean.shape[1] + padding_frames(mean.shape[1], draws.patch_t)  # 1.5: fresh noise in the padding
        noise.append(torch.randn((mean.shape[0], frames, *mean.shape[2:]), generator=g, device=device))
        t.append(sample_timestep(draws.num_timesteps, g, draws.timestep_sampling, draws.logit_mean, draws.logit_std))
        prompt = example["prompt_embeds"].to(device, non_blocking=True)
        if empty is not None:
            drop = torch.rand((), generator=g, device=device) < draws.caption_dropout
            prompt = torch.where(drop, empty, prompt)
        embeds.append(prompt)
        if "image_latents" in example:
            variants = example["image_latents"].to(device, non_blocking=True)  # (K, C, 1, H, W)
            k = torch.randint(0, variants.shape[0], (1,), generator=g, device=device)
            image = torch.zeros_like(mean)  # (C, F, H, W): the first frame's latent, then zeros
            image[:, :1] = variants.index_select(0, k)[0]
            images.append(image)
    return TrainingBatch(x0=_as_bfchw(x0), noise=_as_bfchw(noise), timesteps=t[0] if len(t) == 1 else torch.cat(t),
                         prompt_embeds=_batched(embeds), image_latents=_as_bfchw(images) if images else None)
