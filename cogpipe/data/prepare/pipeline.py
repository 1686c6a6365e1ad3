"""The stages of `cogpipe prepare` on Ray (docs/prepare.md), each resumable by its keyed outputs under OUT:

    OUT/clips/<clip>.mp4                 split: the clips (a source's clips, then its record: the commit point)
    OUT/work/split/<source>.json         split: a source's cuts, clips and dropped shots, with the params used
    OUT/work/scores/<clip>.json          filter: a clip's scores (thresholds are applied later, never stored here)
    OUT/work/captions/<clip>.json        caption: a clip's caption, its T5 token count, the model, the run
    OUT/manifest.parquet, manifest.json  write: the data manifest (`cogpipe data encode --manifest OUT` reads it)
    OUT/videos.txt, prompts.txt, metadata.jsonl, clips.jsonl, report.json    write: layouts and the report

A killed run started again does only what has no output yet: a source with a record (made with the same params) is
not split again, a clip with scores is not scored again, a clip with a caption is not captioned again (unless
--recaption). Captions are persisted by the driver, each as it arrives (the fault tests kill it there:
COGPIPE_FAILPOINT=caption-written:<n>, cogpipe/atomic.py, SIGKILLs it once the run's n-th caption is written).
Split and scoring run as Ray tasks, captioning as a Ray Data actor pool (one model per actor, one GPU each where
the cluster has GPUs). On a cluster (--address) OUT must be a folder every worker reaches (shared).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from cogpipe import atomic
from cogpipe.data.prepare import filters, split

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")
SCORE_CHUNK = 8


class PrepareError(ValueError):
    """Bad input to prepare: the message names the file or flag."""


def _dirs(out) -> dict[str, Path]:
    out = Path(out)
    return {k: out / p for k, p in dict(clips="clips", split="work/split", scores="work/scores",
                                        captions="work/captions").items()}


def list_sources(sources) -> list[str]:
    """Video files of the given files and folders (folders searched recursively), sorted."""
    found = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            found += [str(f) for f in sorted(p.rglob("*")) if f.suffix.lower() in VIDEO_EXTENSIONS and f.is_file()]
        elif p.is_file():
            found.append(str(p))
        else:
            raise PrepareError(f"{s}: no such file or folder")
    if not found:
        raise PrepareError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) in {', '.join(map(str, sources))}")
    return found


def _split_params(path: str, target: split.Target, threshold: float) -> dict:
    st = os.stat(path)
    return dict(target.params(), threshold=threshold, margin=1, size=st.st_size, mtime=st.st_mtime)


def _split_task(path: str, target, clips_dir: str, threshold: float) -> dict:
    try:
        return split.split_video(path, target, clips_dir, threshold=threshold)
    except Exception as e:  # a source that does not decode is named, not fatal
        return dict(source=path, source_id=split.source_id(path), clips=[], cuts=[],
                    dropped=[dict(shot=None, reason=f"cannot read the video ({type(e).__name__}: {str(e)[:200]})")])


def run_split(sources, target: split.Target, out, *, threshold: float = 27.0, log=print) -> list[dict]:
    """Split every source not split yet (same params); returns every source's record."""
    import ray

    from cogpipe.data import raycluster

    d = _dirs(out)
    for p in d.values():
        p.mkdir(parents=True, exist_ok=True)
    paths = list_sources(sources)
    records, todo = {}, []
    for path in paths:
        params = _split_params(path, target, threshold)
        rec = split.load_record(d["split"], path, params)
        if rec is None:
            todo.append((path, params))
        else:
            records[path] = rec
    log(f"split: {len(paths)} source video(s), {len(todo)} to split, {len(records)} split already")
    if todo:
        raycluster.connect()
        task = ray.remote(num_cpus=1, max_retries=2)(_split_task)
        pending = {task.remote(path, target, str(d["clips"]), threshold): (path, params) for path, params in todo}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            path, params = pending.pop(done[0])
            rec = ray.get(done[0])
            rec["params"] = params
            atomic.write_json(split.record_path(d["split"], path), rec)  # the source's commit point
            records[path] = rec
            log(f"  {path}: {len(rec['cuts'])} cut(s), {len(rec['clips'])} clip(s), {len(rec['dropped'])} dropped")
    return [records[p] for p in paths]


def clip_rows(records) -> list[dict]:
    return [c for r in records for c in r["clips"]]


def _score_task(paths: list[str]) -> list[dict]:
    out = []
    for p in paths:
        try:
            out.append(filters.score_clip(p))
        except Exception as e:
            out.append(dict(error=f"cannot score ({type(e).__name__}: {str(e)[:200]})"))
    return out


def run_scores(out, clips: list[dict], log=print) -> dict[str, dict]:
    """Scores of every clip, scoring (Ray tasks) only those without a score file."""
    import ray

    from cogpipe.data import raycluster

    d = _dirs(out)
    d["scores"].mkdir(parents=True, exist_ok=True)
    scored, todo = {}, []
    for c in clips:
        f = d["scores"] / f"{c['clip']}.json"
        if f.exists():
            scored[c["clip"]] = json.loads(f.read_text())
        else:
            todo.append(c["clip"])
    log(f"filter: {len(clips)} clip(s), {len(todo)} to score, {len(scored)} scored already")
    if todo:
        raycluster.connect()
        task = ray.remote(num_cpus=1, max_retries=2)(_score_task)
        chunks = [todo[i:i + SCORE_CHUNK] for i in range(0, len(todo), SCORE_CHUNK)]
        pending = {task.remote([str(d["clips"] / n) for n in chunk]): chunk for chunk in chunks}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            chunk = pending.pop(done[0])
            for name, s in zip(chunk, ray.get(done[0])):
                atomic.write_json(d["scores"] / f"{name}.json", s)
                scored[name] = s
    return scored


def decide(scored: dict[str, dict], thresholds: filters.Thresholds) -> dict[str, str | None]:
    """{clip: drop reason or None}; a clip that could not be scored is dropped naming why."""
    good = {k: v for k, v in scored.items() if "error" not in v}
    out = filters.apply(good, thresholds)
    out.update({k: v["error"] for k, v in scored.items() if "error" in v})
    return out


class CaptionActor:
    """A Ray Data actor: one captioning model, loaded once; a batch of clip paths in, their captions out (already
    fitted to the recipe's T5 length), each row with the actor's pid and its model calls so far (`calls`)."""

    def __init__(self, model_id, model_cfg, limit, trigger, frames, quantize, max_new_tokens, dtype):
        from cogpipe.data.prepare.caption import Captioner
        from cogpipe.models import build_tokenizer

        self.captioner = Captioner(model_id, quantize=quantize, max_new_tokens=max_new_tokens, dtype=dtype)
        self.t5 = build_tokenizer(model_cfg)
        self.limit, self.trigger, self.frames, self.model_id = limit, trigger, frames, model_id

    def __call__(self, batch: dict) -> dict:
        from cogpipe.data.prepare.caption import clip_frames, fit_caption

        sampled = [clip_frames(p, self.frames) for p in batch["path"]]
        texts = self.captioner.caption([f for f, _ in sampled], [r for _, r in sampled])
        captions, tokens, cut, raw = [], [], [], []
        for text in texts:
            full = f"{self.trigger}, {text}" if self.trigger else text
            fitted, n, was_cut = fit_caption(self.t5, full, self.limit)
            captions.append(fitted)
            tokens.append(n)
            cut.append(was_cut)
            raw.append(text)
        return dict(clip=list(batch["clip"]), caption=captions, tokens=tokens, cut=cut, raw=raw,
                    pid=[os.getpid()] * len(texts), calls=[self.captioner.calls] * len(texts))


def run_captions(out, clips: list[str], cfg, *, model_id: str, recaption: bool = False, trigger: str | None = None,
                 batch_size: int = 4, workers: int | None = None, frames: int | None = None,
                 quantize: str | None = None, max_new_tokens: int | None = None, dtype: str | None = None,
                 log=print) -> dict:
    """Caption the clips without a caption (all with recaption), persisting each caption as it arrives. Returns
    {"captions": {clip: record}, "captioned": [clips captioned in this run], "model_calls": the captioning model's
    generate() calls in this run (counted by the actors), "run": id}."""
    import warnings

    import ray

    from cogpipe.data import raycluster
    from cogpipe.data.prepare import caption as cap
    from cogpipe.models import component_configs

    d = _dirs(out)
    d["captions"].mkdir(parents=True, exist_ok=True)
    have = {} if recaption else read_captions(out, clips)
    todo = [c for c in clips if c not in have]
    run = uuid.uuid4().hex[:12]
    log(f"caption: {len(clips)} clip(s), {len(todo)} to caption, {len(have)} captioned already "
        f"({'--recaption' if recaption else 'kept'})")
    captioned, calls = [], {}
    if todo:
        raycluster.connect()
        gpus = raycluster.gpus()
        workers = workers or max(1, gpus)
        transformer_config, _ = component_configs(cfg.model)
        limit = int(transformer_config["max_text_seq_length"])
        ds = ray.data.from_items([dict(clip=c, path=str(d["clips"] / c)) for c in todo],
                                 override_num_blocks=max(1, min(len(todo), -(-len(todo) // batch_size))))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = ds.map_batches(
                CaptionActor, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=workers),
                num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1, max_restarts=2, max_task_retries=2,
                fn_constructor_args=(model_id, cfg.model, limit, trigger, frames or cap.FRAMES, quantize,
                                     max_new_tokens or cap.MAX_NEW_TOKENS, dtype))
        for row in ds.iter_rows():
            rec = dict(caption=row["caption"], tokens=int(row["tokens"]), cut=bool(row["cut"]), raw=row["raw"],
                       model=model_id, trigger=trigger, limit=limit, run=run, pid=int(row["pid"]))
            atomic.write_json(d["captions"] / f"{row['clip']}.json", rec)  # persisted as it finishes
            have[row["clip"]] = rec
            captioned.append(row["clip"])
            calls[rec["pid"]] = max(calls.get(rec["pid"], 0), int(row["calls"]))
            atomic.failpoint(f"caption-written:{len(captioned)}")
        log(f"  {len(captioned)} clip(s) captioned in {sum(calls.values())} model call(s)")
    empty = [c for c in clips if not have[c]["caption"]]
    if empty:
        log(f"  {len(empty)} clip(s) got an empty caption and are left out: {', '.join(empty[:5])}")
    return dict(captions=have, captioned=captioned, model_calls=sum(calls.values()), run=run)


def source_captions(sources) -> dict[str, str]:
    """{video path: caption} of the source folders that are datasets (prompts.txt + videos.txt, metadata, .txt)."""
    from cogpipe.data.folders import DataError, scan

    out = {}
    for s in sources:
        if Path(s).is_dir():
            try:
                samples, _ = scan(s)
            except DataError:
                continue
            out.update({str(Path(x.video)): x.caption for x in samples})
    return out


def load_records(out) -> list[dict]:
    d = _dirs(out)["split"]
    return [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))] if d.is_dir() else []


def _category(reason: str) -> str:
    return reason.split(":")[0].split(" (")[0]


def run_write(out, target: split.Target, records: list[dict], drops: dict[str, str | None],
              captions: dict[str, dict], limit: int, log=print) -> dict:
    """The manifest (cogpipe/data/index.py's schema: `cogpipe data encode --manifest OUT` reads it as it is), the
    folder layouts (prompts.txt + videos.txt, metadata.jsonl; `data.root: OUT` trains on them), clips.jsonl (every
    clip: scores, drop reason, caption) and the report (report.json, printed)."""
    from cogpipe.data.cache import file_digest
    from cogpipe.data.index import write_manifest
    from cogpipe.data.stages import clip_key

    out = Path(out).resolve()
    d = _dirs(out)
    rows, kept, everything = [], [], []
    for c in clip_rows(records):
        path = d["clips"] / c["clip"]
        if not path.exists():
            continue
        digest = file_digest(path)  # remembered by (path, size, mtime): a caption edit on the page hashes nothing again
        bucket = [c["frames"], c["height"], c["width"]]
        cap = captions.get(c["clip"]) or {}
        problem = drops.get(c["clip"])
        if problem is None and not cap.get("caption"):
            problem = "no caption"
        st = path.stat()
        rows.append(dict(uri=str(path), locator=json.dumps(["file", str(path)]), size=st.st_size, mtime=st.st_mtime,
                         caption=cap.get("caption"), digest=digest, frames=c["frames"], fps=c["fps"],
                         height=c["height"], width=c["width"], bucket=bucket, key=clip_key(digest, bucket),
                         problem=problem))
        scores_file = d["scores"] / f"{c['clip']}.json"
        scores = json.loads(scores_file.read_text()) if scores_file.exists() else None
        everything.append(dict(clip=f"clips/{c['clip']}", source=c["source"], start=c["start"], end=c["end"],
                               caption=cap.get("caption"), tokens=cap.get("tokens"), scores=scores,
                               dropped=problem))
        if problem is None:
            kept.append((c, cap))
    shot_drops = [dict(source=r["source"], shot=x["shot"], reason=x["reason"]) for r in records for x in r["dropped"]]
    dropped: dict[str, int] = {}
    for r in rows:
        for part in (r["problem"] or "").split("; "):
            if part:
                dropped[_category(part)] = dropped.get(_category(part), 0) + 1
    shots: dict[str, int] = {}
    for x in shot_drops:
        shots[_category(x["reason"])] = shots.get(_category(x["reason"]), 0) + 1
    tokens = [cap["tokens"] for _, cap in kept]
    step = max(1, -(-limit // 8))
    histogram = {f"{lo}-{min(lo + step - 1, limit)}": sum(lo <= t < lo + step for t in tokens)
                 for lo in range(0, limit + 1, step)}
    minutes = sum(c["frames"] / c["fps"] for c, _ in kept) / 60
    summary = dict(sources=[r["source"] for r in records], clips=len(rows), usable=len(kept),
                   problems=len(rows) - len(kept), probed=0, buckets=[list(s) for s in target.shapes])
    write_manifest(out, rows, summary)
    atomic.write_text(out / "videos.txt", "".join(f"clips/{c['clip']}\n" for c, _ in kept))
    atomic.write_text(out / "prompts.txt", "".join(f"{cap['caption']}\n" for _, cap in kept))
    atomic.write_text(out / "metadata.jsonl", "".join(
        json.dumps(dict(file_name=f"clips/{c['clip']}", caption=cap["caption"])) + "\n" for c, cap in kept))
    atomic.write_text(out / "clips.jsonl", "".join(json.dumps(e) + "\n" for e in everything))
    report = dict(kept=len(kept), dropped=dropped, shots_dropped=shots, caption_tokens=histogram, token_limit=limit,
                  minutes=round(minutes, 2), fps=target.fps, shapes=[list(s) for s in target.shapes],
                  warning=(f"only {len(kept)} clips: 500-1000 clips are the usual minimum for a LoRA"
                           if len(kept) < 500 else None))
    atomic.write_json(out / "report.json", report, indent=1)
    log(f"write {out}: {len(kept)} clip(s) kept ({report['minutes']} min at {target.fps:g} fps), "
        f"{len(rows) - len(kept)} dropped")
    for k, v in sorted(dropped.items(), key=lambda kv: -kv[1]):
        log(f"  dropped {v}: {k}")
    for k, v in sorted(shots.items(), key=lambda kv: -kv[1]):
        log(f"  shots left out {v}: {k}")
    if tokens:
        log("  caption T5 tokens: " + ", ".join(f"{k}: {v}" for k, v in histogram.items() if v))
    if report["warning"]:
        log(f"  warning: {report['warning']}")
    return report


def read_captions(out, clips: list[str]) -> dict[str, dict]:
    d = _dirs(out)["captions"]
    return {c: json.loads((d / f"{c}.json").read_text()) for c in clips if (d / f"{c}.json").exists()}


def save_captions(out, captions: dict[str, dict]) -> None:
    d = _dirs(out)["captions"]
    d.mkdir(parents=True, exist_ok=True)
    for clip, rec in captions.items():
        atomic.write_json(d / f"{clip}.json", rec)
