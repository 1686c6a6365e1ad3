"""`cogpipe data index SOURCE... --out DIR`: every clip of the sources probed once, in parallel as Ray tasks, into a
manifest (DIR/manifest.parquet, one row a clip; DIR/manifest.json says what was indexed and the counts).

    cogpipe data index data/tiny --out M
    cogpipe data index s3://bucket/shards/ hf_set/ --out s3://bucket/manifest --config configs/tiny_lora.yaml

A row: uri (where the clip is), locator (how any process reads its bytes again, JSON), size and mtime (of the file
that holds it, where the source says them), caption, digest (sha256 of the clip's bytes), frames, fps, height, width,
bucket and key (with --config: the recipe's bucket for the clip and its key in a store, cogpipe.data.stages.clip_key;
without: null, chosen by `cogpipe data encode`), image, image_locator, image_size, image_mtime and image_digest (a
first-frame image the source lists for the clip, image-to-video: where it is, how to read it, its file's size and
mtime, sha256 of its bytes; null where none), problem (the rule the clip breaks, in the dataset check's words:
cannot decode, too short, too small, no caption, an unreadable first-frame image, ...; null for a usable clip).

Run again over a grown source, only new or changed clips are probed: a clip whose uri, size and mtime are those of a
row of the previous manifest keeps that row (its problem too: a broken clip is named once, not retried on every
run; only a clip whose bytes could not be read, an I/O error, is tried again); a clip with a first-frame image keeps
its row only if the image's uri, size and mtime are unchanged too.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from typing import Optional

from cogpipe.data.folders import DataError
from cogpipe.data.sources import Clip, open_source, read_bytes

MANIFEST = "manifest.parquet"
SUMMARY = "manifest.json"
CHUNK = 8  # clips a probing task takes
GROUP_ROWS = 8192  # rows of a manifest's Parquet row group: encode plans and reads a row group at a time
READ_ERROR = "cannot read the clip's bytes"  # the one problem a re-index tries again

COLUMNS = ("uri", "locator", "size", "mtime", "caption", "digest", "frames", "fps", "height", "width", "bucket",
           "key", "image", "image_locator", "image_size", "image_mtime", "image_digest", "problem")
PROBED = ("digest", "frames", "fps", "height", "width", "image_digest", "problem")  # what a probe finds


def _schema():
    import pyarrow as pa

    return pa.schema([("uri", pa.string()), ("locator", pa.string()), ("size", pa.int64()), ("mtime", pa.float64()),
                      ("caption", pa.string()), ("digest", pa.string()), ("frames", pa.int32()),
                      ("fps", pa.float32()), ("height", pa.int32()), ("width", pa.int32()),
                      ("bucket", pa.list_(pa.int32())), ("key", pa.string()), ("image", pa.string()),
                      ("image_locator", pa.string()), ("image_size", pa.int64()), ("image_mtime", pa.float64()),
                      ("image_digest", pa.string()), ("problem", pa.string())])


def probe_clips(items: list) -> list[dict]:
    """[(uri, locator[, image locator or None])] -> for each {"digest", "frames", "fps", "height", "width",
    "image_digest", "problem"}: the clip's bytes (and its first-frame image's, where it has one) read once, hashed
    and probed. A clip that does not decode, or whose image does not, gets the rule as its problem; nothing
    raises."""
    from cogpipe.data.folders import probe_image
    from cogpipe.data.stages import probe_video
    from cogpipe.data.store import sha256_bytes

    out = []
    for uri, locator, *image in items:
        try:
            data = read_bytes(locator)
        except Exception as e:  # fsspec, the object stores and pyarrow raise many kinds
            out.append(dict(problem=f"{READ_ERROR} ({type(e).__name__}: {str(e)[:200]})"))
            continue
        row = dict(digest=sha256_bytes(data))
        try:
            row.update(probe_video(data, uri))
        except DataError as e:
            row["problem"] = e.problem.rule if e.problem else str(e)
        if image and image[0] is not None:
            try:
                picture = read_bytes(image[0])
                row["image_digest"] = sha256_bytes(picture)
                probe_image(picture, uri)
            except DataError as e:
                row["problem"] = row.get("problem") or e.problem.rule
            except Exception as e:  # as for the clip: its file missing, an object store's error
                row["problem"] = row.get("problem") or f"cannot read first-frame image ({type(e).__name__}: " \
                                                       f"{str(e)[:200]})"
        out.append(row)
    return out


class Progress:
    """A progress bar with clips/s and ETA (tqdm on stderr), or a line every few seconds where stderr is no
    terminal (logs)."""

    def __init__(self, total: int, what: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=what, unit="clip", file=sys.stderr, mininterval=1.0, smoothing=0.1,
                        dynamic_ncols=True, disable=None if sys.stderr.isatty() else True)
        self.total, self.what, self.done, self.start, self.last = total, what, 0, time.monotonic(), 0.0

    def update(self, n: int) -> None:
        self.done += n
        self.bar.update(n)
        now = time.monotonic()
        if self.bar.disable and (now - self.last > 10 or self.done == self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            print(f"{self.what}: {self.done}/{self.total} clips, {rate:.1f} clips/s, ETA {eta:.0f} s",
                  file=sys.stderr, flush=True)

    def close(self) -> float:
        self.bar.close()
        return time.monotonic() - self.start


def _probe_all(items: list, chunk: int, progress: Progress) -> list[dict]:
    """Probe [(uri, locator)] as Ray tasks of `chunk` clips, a bounded number in flight; results in order. A task
    whose worker dies (a decoder crash) is retried by Ray; a chunk that still fails is probed clip by clip, and the
    clip that kills its worker is named."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=2)(probe_clips)
    results: list = [None] * len(items)
    chunks = [(i, items[i:i + chunk]) for i in range(0, len(items), chunk)]
    limit = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending: dict = {}

    def collect(ref) -> None:
        start, part = pending.pop(ref)
        try:
            rows = ray.get(ref)
        except (ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError) as e:
            if len(part) > 1:
                rows = []
                for one in part:
                    try:
                        rows += ray.get(task.options(max_retries=0).remote([one]))
                    except (ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError) as e1:
                        rows.append(dict(problem=f"probing this clip failed its worker ({type(e1).__name__})"))
            else:
                rows = [dict(problem=f"probing this clip failed its worker ({type(e).__name__})")]
        results[start:start + len(part)] = rows
        progress.update(len(part))

    for start, part in chunks:
        while len(pending) >= limit:
            done, _ = ray.wait(list(pending), num_returns=1)
            collect(done[0])
        pending[task.remote(part)] = (start, part)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        collect(done[0])
    return results


@contextmanager
def open_manifest(out):
    """The manifest in folder (or URL) `out` as a pyarrow ParquetFile, read a row group at a time (write_manifest
    writes row groups of GROUP_ROWS rows); None where there is none."""
    import pyarrow.parquet as pq

    from cogpipe.data.store import filesystem

    fs, root = filesystem(out)
    path = f"{root}/{MANIFEST}"
    if not fs.exists(path):
        yield None
        return
    with fs.open(path, "rb") as f:  # a row group at a time: pre-buffering would keep every row group read so far
        yield pq.ParquetFile(f, pre_buffer=False)


def read_manifest(out) -> list[dict]:
    """The rows of the manifest in folder (or URL) `out`, read a row group at a time; [] where there is none."""
    with open_manifest(out) as pf:
        if pf is None:
            return []
        return [r for g in range(pf.num_row_groups) for r in pf.read_row_group(g, use_threads=False).to_pylist()]


def write_manifest(out, rows: list[dict], summary: dict) -> None:
    """Write the manifest whole (a temporary name, then renamed; one PUT on an object store)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from cogpipe.data.store import _put_atomic, filesystem

    fs, root = filesystem(out)
    table = pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows], schema=_schema())
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=GROUP_ROWS)
    _put_atomic(fs, f"{root}/{MANIFEST}", sink.getvalue())
    _put_atomic(fs, f"{root}/{SUMMARY}", json.dumps(summary, indent=1).encode())


def assign_buckets(rows: list[dict], shapes, i2v: bool = False) -> None:
    """Each probed row's bucket among `shapes` and its key (for an image-to-video recipe, with its first-frame
    image's digest where it has one), or the rule it breaks as its problem (in place)."""
    from cogpipe.data.stages import bucket_for, clip_key

    for r in rows:
        r["bucket"], r["key"] = None, None
        if r.get("problem") or r.get("frames") is None:
            continue
        bucket, rule = bucket_for(r["frames"], r["height"], r["width"], shapes)
        if bucket is None:
            r["problem"] = rule
        else:
            r["bucket"], r["key"] = list(bucket), clip_key(r["digest"], bucket,
                                                           r.get("image_digest") if i2v else None)


def _reusable(prev: Optional[dict], clip: Clip) -> bool:
    same_image = prev is not None and prev.get("image") == clip.image and (
        clip.image is None or (clip.image_size is not None and clip.image_mtime is not None
                               and prev.get("image_size") == clip.image_size
                               and prev.get("image_mtime") == clip.image_mtime))
    return (same_image and clip.size is not None and clip.mtime is not None
            and prev.get("size") == clip.size and prev.get("mtime") == clip.mtime
            and not (prev.get("problem") or "").startswith(READ_ERROR))


def build_index(sources: list[str], out, cfg=None, video_column: Optional[str] = None,
                caption_column: Optional[str] = None, chunk: int = CHUNK, log=print) -> dict:
    """Index `sources` into the manifest at `out` (see the module's docstring); returns the summary written."""
    from cogpipe.data.folders import recipe_buckets

    t0 = time.monotonic()
    clips = [c for source in sources for c in open_source(source, video_column, caption_column)]
    previous = {r["uri"]: r for r in read_manifest(out)}
    rows, todo = [], []
    for clip in clips:
        base = dict(uri=clip.uri, locator=json.dumps(clip.locator), size=clip.size, mtime=clip.mtime,
                    caption=clip.caption, image=clip.image, image_size=clip.image_size, image_mtime=clip.image_mtime,
                    image_locator=json.dumps(clip.image_locator) if clip.image_locator is not None else None)
        prev = previous.get(clip.uri)
        if clip.problem:  # found while listing (no caption, missing file): nothing to probe
            rows.append({**base, "problem": clip.problem})
        elif _reusable(prev, clip):
            rows.append({**base, **{k: prev.get(k) for k in PROBED}})
        else:
            rows.append(base)
            todo.append(len(rows) - 1)
    log(f"index: {len(clips)} clips in {len(sources)} source(s); {len(todo)} to probe, "
        f"{len(clips) - len(todo)} known or named already")
    if todo:
        from cogpipe.data import raycluster

        raycluster.connect()
        progress = Progress(len(todo), "probe")
        probed = _probe_all([(rows[i]["uri"], json.loads(rows[i]["locator"]),
                              json.loads(rows[i]["image_locator"]) if rows[i]["image_locator"] else None)
                             for i in todo], chunk, progress)
        progress.close()
        for i, result in zip(todo, probed):
            rows[i].update(result)
    shapes = recipe_buckets(cfg.data) if cfg is not None else None
    if shapes is not None:
        from cogpipe.data.stages import recipe_i2v

        assign_buckets(rows, shapes, recipe_i2v(cfg))
    problems = [r for r in rows if r.get("problem")]
    summary = dict(sources=list(sources), clips=len(rows), usable=len(rows) - len(problems),
                   problems=len(problems), probed=len(todo), buckets=[list(s) for s in shapes] if shapes else None,
                   seconds=round(time.monotonic() - t0, 2))
    write_manifest(out, rows, summary)
    for r in problems[:20]:
        log(f"  - {r['uri']}: {r['problem']}")
    if len(problems) > 20:
        log(f"  ... and {len(problems) - 20} more (the manifest's problem column names each)")
    log(f"index {out}: {summary['usable']} usable clip(s), {summary['problems']} problem(s), "
        f"{summary['probed']} probed in {summary['seconds']} s")
    return summary


def add_arguments(parser) -> None:
    parser.add_argument("sources", nargs="+", metavar="SOURCE",
                        help="a dataset folder, .tar shards, .parquet files, a `datasets` folder, a URL of one, "
                             "or a Hugging Face hub dataset (hf://datasets/OWNER/NAME, or OWNER/NAME)")
    parser.add_argument("--out", required=True, help="the manifest's folder (or fsspec URL)")
    parser.add_argument("--config", help="a recipe: also choose each clip's bucket and key")
    parser.add_argument("--video-column", help="the video column of a table source (default: video, file_name, ...)")
    parser.add_argument("--caption-column", help="the caption column of a table source (default: caption, prompt, "
                                                 "text)")
    parser.add_argument("--address", help="a Ray cluster's address (`ray start --head` prints it); default: a "
                                          "local Ray on this machine")


def run(args) -> int:
    from cogpipe.config import ConfigError, load_config
    from cogpipe.data import raycluster
    from cogpipe.data.sources import SourceError

    try:
        cfg = load_config(args.config, []) if args.config else None
        if args.address:
            raycluster.connect(args.address)
        summary = build_index(args.sources, args.out, cfg, args.video_column, args.caption_column)
    except (ConfigError, SourceError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if summary["usable"] else 1
