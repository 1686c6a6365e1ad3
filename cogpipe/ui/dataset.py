"""The Data tab's logic (no gradio): `cogpipe prepare` on a folder as a job of the page's queue, the clips of a
prepared folder with their captions and scores (its clips.jsonl), and a caption edited by hand.

An edit goes where the caption stage keeps captions (OUT/work/captions/<clip>.json, marked `model: "edit"`), so a
later `cogpipe prepare` keeps it unless --recaption; then the write stage runs again over the folder (the manifest,
prompts.txt + videos.txt, metadata.jsonl, clips.jsonl and report.json, each replaced atomically by
cogpipe/atomic.py), with each clip's drop reason as clips.jsonl recorded it (the filter thresholds are not stored,
so the clips kept stay the same; a clip left out for having no caption comes in once it has one)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cogpipe.config import ConfigError
from cogpipe.ui.launcher import Job, active_job
from cogpipe.ui.safety import PathGuard

DATA = "data"  # prepared folders go to OUTPUTS/data/<name>
LOG = "ui_prepare.log"
NO_CAPTION = "no caption"
COLUMNS = ["clip", "caption", "tokens", "motion", "sharpness", "dark", "frozen", "dropped"]


def data_root(outputs) -> Path:
    return Path(outputs).resolve() / DATA


def _name(name: str) -> str:
    name = (name or "").strip()
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"dataset name {name!r}: give a folder name (no '/', not starting with '.')")
    return name


def prepared_folder(outputs, name: str) -> Path:
    """OUTPUTS/data/<name>, checked to lie there."""
    return PathGuard([data_root(outputs)]).check(data_root(outputs) / _name(name), "dataset")


def list_prepared(outputs) -> list[str]:
    """The prepared folders under OUTPUTS/data (those with a clips.jsonl), by name."""
    root = data_root(outputs)
    return sorted(p.parent.name for p in root.glob("*/clips.jsonl")) if root.is_dir() else []


def prepare_job(source, name: str, recipe, outputs, guard: PathGuard, caption_model: str = "source",
                extra: str = "", jobs=()) -> Job:
    """The job `python -m cogpipe.cli prepare SOURCE --for RECIPE --out OUTPUTS/data/NAME --caption-model M ...`:
    the source folder and the recipe must lie in the folders the page may read (the guard), a local captioning model
    too (a hub id passes); the output goes under OUTPUTS/data. Refused (ConfigError) while a job of `jobs` is queued
    or running on the same folder."""
    import shlex

    source = guard.check(source, "source folder")
    if not source.exists():
        raise ConfigError(f"source folder {source}: no such file or folder")
    recipe = guard.check(recipe, "recipe")
    out = prepared_folder(outputs, name)
    model = (caption_model or "source").strip()
    if model != "source":
        model = guard.model(model, "caption model")
    args = shlex.split(extra or "")
    if any(a.split("=")[0] in ("--out", "--for", "--caption-model", "--address") for a in args):
        raise ConfigError("extra flags: --out, --for, --caption-model and --address are set by the page")
    label = f"prepare {out.name}"
    if (job := active_job(jobs, name=label)) is not None:
        raise ConfigError(f"dataset {out}: a prepare job of this page is already {job.state} there")
    command = [sys.executable, "-m", "cogpipe.cli", "prepare", str(source), "--for", str(recipe), "--out", str(out),
               "--caption-model", model, *args]
    return Job(label, command, out / LOG)


def _clips_file(folder) -> Path:
    f = Path(folder) / "clips.jsonl"
    if not f.is_file():
        raise FileNotFoundError(f"{folder}: no clips.jsonl (prepare has not written this folder yet)")
    return f


def read_clips(folder) -> list[dict]:
    """The records of clips.jsonl (every clip: source, caption, tokens, scores, drop reason)."""
    return [json.loads(line) for line in _clips_file(folder).read_text().splitlines() if line.strip()]


def clip_rows(folder) -> list[list]:
    """One row a clip for the page's table (COLUMNS): clip file name, caption, T5 tokens, scores, drop reason."""
    rows = []
    for r in read_clips(folder):
        s = r.get("scores") or {}
        rows.append([Path(r["clip"]).name, r.get("caption") or "", r.get("tokens"), s.get("motion"),
                     s.get("sharpness"), s.get("dark"), s.get("frozen"), r.get("dropped") or ""])
    return rows


def edit_caption(folder, clip: str, text: str, recipe, jobs=()) -> dict:
    """Set clip `clip`'s caption to `text` (white space collapsed: prompts.txt is one caption a line) in every file
    of the prepared folder; returns the caption record written. ValueError naming the rule for an unknown clip, an
    empty caption, one longer than the recipe's T5 length (never cut silently), or a prepare job of `jobs` (the
    page's queue) queued or running on the folder (it would write the same files)."""
    from cogpipe import atomic
    from cogpipe.config import load_config
    from cogpipe.data.prepare import pipeline, split
    from cogpipe.data.prepare.caption import t5_count
    from cogpipe.models import build_tokenizer, component_configs

    folder = Path(folder).resolve()
    if (job := active_job(jobs, name=f"prepare {folder.name}")) is not None:
        raise ValueError(f"{folder}: a prepare job is {job.state} on this folder; edit once it has ended")
    clip = Path(clip).name
    everything = read_clips(folder)
    by_clip = {Path(r["clip"]).name: r for r in everything}
    if clip not in by_clip:
        raise ValueError(f"{folder}: no clip {clip!r} in clips.jsonl")
    text = " ".join((text or "").split())
    if not text:
        raise ValueError(f"{clip}: a caption cannot be empty")
    cfg = load_config(recipe, [], validate_model=False)
    transformer_config, _ = component_configs(cfg.model)
    limit = int(transformer_config["max_text_seq_length"])
    tokens = t5_count(build_tokenizer(cfg.model), text)
    if tokens > limit:
        raise ValueError(f"{clip}: the caption has {tokens} T5 tokens, more than the recipe's {limit} "
                         f"(max_text_seq_length); shorten it")
    records = pipeline.load_records(folder)
    names = [c["clip"] for c in pipeline.clip_rows(records)]
    captions = pipeline.read_captions(folder, names)
    previous = captions.get(clip) or {}
    rec = dict(caption=text, tokens=tokens, cut=False, model="edit", previous=previous.get("caption"),
               previous_model=previous.get("model"), limit=limit)
    atomic.write_json(folder / "work" / "captions" / f"{clip}.json", rec)  # where the caption stage looks
    captions[clip] = rec
    drops = {}
    for name in names:
        reason = (by_clip.get(name) or {}).get("dropped")
        parts = [p for p in (reason or "").split("; ") if p and p != NO_CAPTION]
        drops[name] = "; ".join(parts) or None
    pipeline.run_write(folder, split.target_for(cfg), records, drops, captions, limit, log=lambda *_: None)
    return rec
