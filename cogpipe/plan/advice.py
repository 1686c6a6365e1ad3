"""Fit advice: the switches that make a recipe fit a GPU, cheapest first, and the fewest GPUs per sharding
strategy."""

from __future__ import annotations

import dataclasses

from cogpipe import family

from .memory import estimate, memory_switches, needed_gb
from .model import resolve_transformer_config


def switch_on(cfg, word: str):
    """(label, config) with the schema's switch for `word` ('8bit', 'fp8') turned on, or None if the schema
    has none (or the config refuses it): switches that do not exist are reported, not advised."""
    for section in ("train", "model"):
        part = getattr(cfg, section)
        for f in dataclasses.fields(part):
            name = f.name.lower()
            if word in name and isinstance(getattr(part, f.name), bool):
                change = {f.name: True}
            elif word == "8bit" and name == "optimizer" and isinstance(getattr(part, f.name), str):
                change = {f.name: "adamw8bit"}
            else:
                continue
            try:
                label = f"{section}.{f.name}={str(next(iter(change.values()))).lower()}"
                return label, with_changes(cfg, section, **change)
            except ValueError:  # ConfigError: this value is not one the schema accepts
                return None
    return None


def with_changes(cfg, section: str, **changes):
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})


def fit_advice(cfg, gpu_memory: float, transformer_config: dict | None = None, device: str = "cuda") -> dict:
    """What makes `cfg` fit in `gpu_memory` GB: switches in order of cost, applied one after another until
    it fits, and the fewest GPUs each sharding strategy needs for the recipe (with checkpointing).

    Order of cost: gradient checkpointing (one extra forward, same result), 8-bit AdamW and fp8 frozen
    weights (small numeric cost; advised only where the config has a key for them), LoRA instead of a full
    fine-tune (trains less), a lower LoRA rank, fewer frames, a lower resolution (each changes what is
    learned). Rank, frames and resolution are lowered only as far as needed, and only if that makes it fit.
    """
    if transformer_config is None:
        transformer_config, _ = resolve_transformer_config(cfg.model)
    opts = dict(transformer_config=transformer_config, device=device)

    def needs(c):
        return needed_gb(estimate(c, **opts)["gb"]["peak"])

    start = needs(cfg)
    steps, unavailable, cur = [], [], cfg

    def add(switch, cost, new_cfg):
        nonlocal cur
        cur = new_cfg
        n = needs(cur)
        steps.append(dict(switch=switch, cost=cost, needs_gb=n, fits=n <= gpu_memory))
        return n <= gpu_memory

    def first_fit(candidates):  # the least change among candidates (ordered) that fits, else None
        for c, label in candidates:
            if needs(c) <= gpu_memory:
                return c, label
        return None

    fits = start <= gpu_memory
    if not fits and not cur.train.gradient_checkpointing:
        fits = add("train.gradient_checkpointing=true", "one extra forward per step (~+30% step time), same "
                   "result", with_changes(cur, "train", gradient_checkpointing=True))
    if not fits and memory_switches(cur)[0] != 2:
        switch = switch_on(cur, "8bit")
        if switch:
            fits = add(switch[0], "8-bit AdamW state, nearly the same result", switch[1])
        else:
            unavailable.append(dict(switch="8-bit AdamW", saves_gb=estimate(cur, **opts)["gb"]["adam"] * 0.75,
                                    why="no config key for it yet"))
    if not fits and cur.train.mode == "lora" and memory_switches(cur)[1] is None:
        switch = switch_on(cur, "fp8")
        if switch:
            fits = add(switch[0], "fp8 storage of the frozen weights, small numeric cost", switch[1])
        else:
            unavailable.append(dict(switch="fp8 frozen weights", saves_gb=estimate(cur, **opts)["gb"]["weights"] / 2,
                                    why="no config key for it yet"))
    if not fits and cur.train.mode == "full":
        half = cur.train.mixed_precision if cur.train.mixed_precision != "no" else "bf16"
        fits = add(f"train.mode=lora model.weight_dtype={half}", "trains a rank-r adapter instead of every weight",
                   with_changes(with_changes(cur, "train", mode="lora"), "model", weight_dtype=half))
    if not fits and cur.train.mode == "lora":
        ranks = [r for r in (64, 32, 16, 8) if r < cur.lora.rank]
        hit = first_fit([(with_changes(cur, "lora", rank=r, alpha=cur.lora.alpha * r / cur.lora.rank), f"lora.rank={r}")
                         for r in ranks])
        if hit:
            fits = add(hit[1], "less adapter capacity (alpha scaled with it)", hit[0])
    bucketed = bool(getattr(cur.data, "buckets", None))  # then the largest bucket, not data.frames, sets it
    learned = family.fixed_shape(transformer_config)  # 5B-I2V: a position table for 49 x 480 x 720 only
    limits = family.side_limits(transformer_config)  # 1.5-I2V: the shorter side at least 768
    if not fits and (bucketed or learned):
        unavailable.append(dict(switch="fewer frames / lower resolution", saves_gb=None,
                                why="the largest data.buckets entry sets the peak: lower its frames or size"
                                if bucketed else f"the learned position table is for {learned[0]} frames at "
                                                 f"{learned[1]}x{learned[2]} only"))
    if not fits and not (bucketed or learned):
        multiple, _ = family.frame_rule(family.version(transformer_config))
        frames = list(range(cur.data.frames - multiple, 0, -multiple))
        hit = first_fit([(with_changes(cur, "data", frames=f), f"data.frames={f}") for f in frames])
        if hit:
            fits = add(hit[1], "shorter clips", hit[0])
        elif frames:
            fits = add(f"data.frames={frames[-1]}", "shorter clips", with_changes(cur, "data", frames=frames[-1]))
    if not fits and not (bucketed or learned):
        sizes = []
        for s in (0.875, 0.75, 0.625, 0.5, 0.375, 0.25):
            h, w = max(16, round(cfg.data.height * s / 16) * 16), max(16, round(cfg.data.width * s / 16) * 16)
            if limits:  # CogVideoX1.5-I2V: the shorter side stays (>= 768), only the longer one may shrink
                short = min(cfg.data.height, cfg.data.width)
                h, w = (short, max(short, w)) if cfg.data.height <= cfg.data.width else (max(short, h), short)
            if (h, w) != (cur.data.height, cur.data.width) and all((h, w) != (c.data.height, c.data.width)
                                                                    for c, _ in sizes):
                sizes.append((with_changes(cur, "data", height=h, width=w), f"data.height={h} data.width={w}"))
        hit = first_fit(sizes)
        if hit:
            fits = add(hit[1], "lower resolution", hit[0])

    sharded = {}
    base = cfg if cfg.train.gradient_checkpointing else with_changes(cfg, "train", gradient_checkpointing=True)
    if needed_gb(estimate(base, transformer_config=transformer_config, device=device)["gb"]["peak"]) > gpu_memory:
        # sharding is worth naming only where checkpointing alone is not enough
        for strategy in ("zero2", "zero3", "fsdp"):
            for n in (2, 4, 8, 16, 32, 64):
                e = estimate(base, strategy=strategy, num_gpus=n, transformer_config=transformer_config, device=device)
                if needed_gb(e["gb"]["peak"]) <= gpu_memory:
                    sharded[strategy] = dict(num_gpus=n, needs_gb=needed_gb(e["gb"]["peak"]))
                    break
    return dict(gpu_memory_gb=gpu_memory, needs_gb=start, fits=start <= gpu_memory, steps=steps,
                fits_after_steps=bool(steps) and steps[-1]["fits"], unavailable=unavailable, sharded=sharded)
