"""What the Train and Runs tabs start: a recipe from configs/ (or a run's own resolved config.yaml, to resume) with
key=value overrides, checked against the schema (cogpipe.config.load_config) before anything launches, and paths in
them kept inside the allowed folders; the run always writes under the page's outputs folder."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from cogpipe import rundir
from cogpipe.config import Config, ConfigError, load_config
from cogpipe.ui.launcher import Job, active_job, train_command
from cogpipe.ui.runs import LOG
from cogpipe.ui.safety import PathGuard, path_fields


def list_recipes(configs_dir) -> list[str]:
    """The recipes in configs/ (and its subfolders, configs/accelerate/ left out), as paths relative to it."""
    root = Path(configs_dir)
    found = (p.relative_to(root) for p in root.rglob("*.yaml"))
    return sorted(str(p) for p in found if p.parts[0] != "accelerate")


def parse_overrides(text: str) -> list[str]:
    """`key=value` items separated by spaces or new lines (shell quoting for values with spaces)."""
    items = shlex.split(text or "", comments=True)
    bad = [item for item in items if "=" not in item or item.startswith("=")]
    if bad:
        raise ConfigError(f"{bad[0]}: an override must be key=value (e.g. train.max_steps=20)")
    return items


def check_override_paths(overrides: list[str], guard: PathGuard, outputs, schema=Config) -> None:
    """Every path-typed field of the schema (safety.path_fields: the fields marked {"path": True} in cogpipe/config.py,
    lists of paths included) that the overrides set must lie inside the allowed folders, output_dir inside the outputs
    folder; a hub id passes where the field takes one. A ConfigError names the key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        given = OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"overrides: {e}") from None
    outputs_guard = PathGuard([outputs])
    for key, meta in path_fields(schema).items():
        value = OmegaConf.select(given, key, default=None, throw_on_missing=False)
        if value is None:
            continue
        values = list(value) if OmegaConf.is_list(value) else [value]
        for item in values:
            item = str(item)
            if item in ("", "null", "None") or item in meta.get("keywords", ()):
                continue
            try:
                if key == "output_dir":
                    outputs_guard.check(item, key)
                elif meta.get("hub_id"):
                    guard.model(item, key)
                else:
                    guard.check(item, key)
            except ValueError as e:
                raise ConfigError(str(e)) from None


def training_job(recipe, overrides_text: str, name: str, outputs, guard: PathGuard, train_py, configs_dir,
                 launcher: str = "default", num_processes: int = 1, resume: bool = False, jobs=()) -> Job:
    """The job `accelerate launch train.py --config RECIPE output_dir=OUTPUTS/NAME overrides...`, once the recipe
    and overrides pass the schema's checks (ConfigError names the key otherwise) and the output folder may take it
    as train.py would judge it (cogpipe.rundir: a used folder without train.resume_from or train.overwrite, or one a
    live run holds, is refused with train.py's message) and no job of `jobs` (the page's queue) is queued or running
    there."""
    recipe = guard.check(recipe, "recipe")
    name = (name or "").strip()
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"run name {name!r}: give a folder name (no '/', not starting with '.')")
    overrides = parse_overrides(overrides_text)
    check_override_paths(overrides, guard, outputs)
    if not any(item.startswith("output_dir=") for item in overrides):
        overrides.insert(0, f"output_dir={Path(outputs).resolve() / name}")
    if resume:
        overrides.append("train.resume_from=latest")
    cfg = load_config(recipe, overrides)  # the schema, the value checks and the model's rules, as train.py does
    command, env = train_command(train_py, recipe, overrides, launcher, num_processes, configs_dir)
    run_dir = Path(cfg.output_dir).resolve()
    check_queue(jobs, run_dir)
    problem = rundir.refusal(run_dir, cfg.train.resume_from, cfg.train.overwrite, cfg.data.cache_dir)
    if problem is not None:
        raise rundir.OutputDirInUse(problem)
    return Job(run_dir.name, command, run_dir / LOG, run_dir=run_dir, env=env, max_steps=cfg.train.max_steps)


def check_queue(jobs, run_dir) -> None:
    """ConfigError when one of the page's `jobs` is queued or running in `run_dir`."""
    if (job := active_job(jobs, run_dir=run_dir)) is not None:
        raise ConfigError(f"output_dir {Path(run_dir).resolve()}: a job of this page is already queued or running "
                          f"there ({job.name}, {job.state}); wait for it, stop it, or choose another run name")


def resume_job(run_dir, overrides_text: str, outputs, guard: PathGuard, train_py, configs_dir,
               launcher: str = "default", num_processes: int = 1, jobs=()) -> Job:
    """Continue a run from its latest checkpoint, from its own resolved config.yaml."""
    run_dir = PathGuard([outputs]).check(run_dir, "run")
    recipe = run_dir / "config.yaml"
    if not recipe.is_file():
        raise ConfigError(f"{run_dir}: no config.yaml (the run never got past its start); start it anew")
    overrides = f"output_dir={run_dir} " + (overrides_text or "")
    return training_job(recipe, overrides, run_dir.name, outputs, guard, train_py, configs_dir, launcher,
                        num_processes, resume=True, jobs=jobs)


def export_job(run_dir, outputs) -> Job:
    """`cogpipe export RUN`: the Diffusers pipeline and LoRA from the run's latest checkpoint."""
    run_dir = PathGuard([outputs]).check(run_dir, "run")
    return Job(f"export {run_dir.name}", [sys.executable, "-m", "cogpipe.cli", "export", str(run_dir)],
               run_dir / "ui_export.log")
