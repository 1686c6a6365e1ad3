"""Check a recipe's config and dataset without training.

    cogpipe check --config configs/tiny_lora.yaml [key=value ...]

Training runs the same checks first: by default it refuses to start when any clip is bad, printing
one report that lists every problem (file and rule); with `data.skip_bad: true` it warns, skips the
bad clips and counts them. Clips already in the latent cache were decoded before and are not
opened again.
"""

from __future__ import annotations

from dataclasses import replace

from cogpipe.config import ConfigError, add_recipe_arguments, load_config
from cogpipe.data.cache import Cache
from cogpipe.data.folders import (
    DataError,
    Problem,
    Sample,
    choose_bucket,
    load_image,
    recipe_buckets,
    report,
    scan,
    shape_problem,
)
from cogpipe.devices import inference_device


def check_dataset(cfg, log=lambda *_: None, device=None) -> tuple[list[Sample], list[Problem]]:
    """The usable samples, each with the shape of its bucket, and the problems of the rest.

    With one shape, a clip too short or too small is a problem. With several buckets, a clip that
    fits none is skipped and counted instead (reported in the log)."""
    samples, problems = scan(cfg.data.root)
    cache = Cache.for_config(cfg, device if device is not None else inference_device())
    shapes = recipe_buckets(cfg.data)
    good, unfit = [], {}
    for s in samples:
        try:
            available = cache.probe(s)
        except DataError as e:
            problems.append(e.problem or Problem(str(s.video), str(e)))
            continue
        shape = choose_bucket(available, shapes)
        if shape is None:
            rule = shape_problem(available, min(shapes, key=lambda b: b[0] * b[1] * b[2]))
            if len(shapes) == 1:
                problems.append(Problem(str(s.video), rule))
            else:
                kind = "too short" if "frames" in rule else "too small"
                unfit[kind] = unfit.get(kind, 0) + 1
            continue
        s = replace(s, shape=shape)
        if s.image is not None and not cache.video_path(s).exists():
            try:
                load_image(s.image, shape[1], shape[2])
            except DataError as e:
                problems.append(e.problem)
                continue
        good.append(s)
    if unfit:
        log(f"buckets: skipped {sum(unfit.values())} clip(s) that fit no bucket of data.buckets ("
            + ", ".join(f"{n} {k}" for k, n in sorted(unfit.items())) + ")")
    if len(shapes) > 1 and good:
        counts = {}
        for s in good:
            counts[s.shape] = counts.get(s.shape, 0) + 1
        log("buckets: " + ", ".join(f"{f}x{h}x{w}: {n}" for (f, h, w), n in sorted(counts.items())))
    return good, problems


def usable_samples(cfg, log=print, device=None) -> list[Sample]:
    """What training trains on: refuses (DataError with the full report) unless `data.skip_bad`."""
    good, problems = check_dataset(cfg, log, device)
    if problems and not cfg.data.skip_bad:
        raise DataError(report(problems, cfg.data.root) + "\nfix them, or set data.skip_bad=true to skip these clips")
    if problems:
        log(f"warning: skipping {len(problems)} bad input(s), training on {len(good)} clip(s):\n"
            + "\n".join(f"  - {p}" for p in problems))
    if not good:
        raise DataError(f"dataset {cfg.data.root}: no usable clip")
    return good


def add_arguments(parser) -> None:
    add_recipe_arguments(parser)


def run(args) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.data.store:
            return _run_store(args, cfg)
        good, problems = check_dataset(cfg, print)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}")
        return 2
    print(f"config {args.config}: OK")
    if problems:
        print(report(problems, cfg.data.root))
    print(f"{len(good)} usable clip(s), {len(problems)} problem(s)")
    if not good:
        print(f"dataset {cfg.data.root}: no usable clip")
        return 1
    if problems and not cfg.data.skip_bad:
        print("training would refuse to start (set data.skip_bad=true to skip the bad clips)")
        return 1
    return 0


def _run_store(args, cfg) -> int:
    """A recipe with data.store: its index read, its encoders and buckets checked against the recipe (the shards'
    checksums are `cogpipe data verify`'s)."""
    from cogpipe.data.reader import check_store
    from cogpipe.data.store import StoreError

    try:
        store = check_store(cfg, inference_device())
    except StoreError as e:
        print(f"error: {e}")
        return 2
    print(f"config {args.config}: OK")
    print(f"data.store {store.url}: {store.rows} rows in {len(store.shards)} shards, buckets "
          + ", ".join("x".join(map(str, b)) for b in store.buckets))
    return 0 if store.rows else 1
