"""Check a recipe's config and dataset without training.

    cogpipe check --config configs/tiny_lora.yaml [key=value ...]

Training runs the same checks first: by default it refuses to start when any clip is bad, printing
one report that lists every problem (file and rule); with `data.skip_bad: true` it warns, skips the
bad clips and counts them. Clips already in the latent cache were decoded before and are not
opened again.
"""

from __future__ import annotations

from cogpipe.cache import Cache
from cogpipe.data import DataError, Problem, Sample, load_image, open_clip, report, scan


def check_dataset(cfg) -> tuple[list[Sample], list[Problem]]:
    """The usable samples and the problems of the rest."""
    samples, problems = scan(cfg.data.root)
    cache = Cache.for_config(cfg)
    good = []
    for s in samples:
        if not cache.video_path(s).exists():
            try:
                open_clip(s.video, cfg.data.frames, cfg.data.height, cfg.data.width)
                if s.image is not None:
                    load_image(s.image, cfg.data.height, cfg.data.width)
            except DataError as e:
                problems.append(e.problem or Problem(str(s.video), str(e)))
                continue
        good.append(s)
    return good, problems


def usable_samples(cfg, log=print) -> list[Sample]:
    """What training trains on: refuses (DataError with the full report) unless `data.skip_bad`."""
    good, problems = check_dataset(cfg)
    if problems and not cfg.data.skip_bad:
        raise DataError(report(problems, cfg.data.root) + "\nfix them, or set data.skip_bad=true to skip these clips")
    if problems:
        log(f"warning: skipping {len(problems)} bad input(s), training on {len(good)} clip(s):\n"
            + "\n".join(f"  - {p}" for p in problems))
    if not good:
        raise DataError(f"dataset {cfg.data.root}: no usable clip")
    return good


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="a YAML recipe")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")


def run(args) -> int:
    from cogpipe.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        good, problems = check_dataset(cfg)
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
