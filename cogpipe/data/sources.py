"""Where clips come from: every source lists (uri, caption, where the bytes are) for each clip it holds.

    for clip in open_source("data/tiny"):             # a folder in one of today's three layouts
        data = read_bytes(clip.locator)
    open_source("s3://bucket/shards/")                 # WebDataset tar shards: KEY.mp4 + KEY.txt | KEY.json
    open_source("hf_set/", video_column="video")       # a `datasets` save_to_disk folder
    open_source("gs://bucket/clips.parquet")           # Parquet files (what the hub stores datasets as)
    open_source("hf://datasets/owner/name")            # a hub dataset: its Parquet files, read a row group at a time

A source is local or behind any fsspec URL (s3://, gs://, hf://, ...). A clip's `locator` is a small JSON-able list
that says how to read its bytes again later, from any process of a Ray cluster, without listing the source again:
    ["file", url]                            a whole file
    ["range", url, offset, size]             a member of a tar shard (read as a byte range: no tar listing)
    ["parquet", url, row_group, row, column] a binary cell of a Parquet file
    ["arrow", folder, row, column]           a binary cell of a `datasets` save_to_disk folder
A clip whose entry is already broken (no caption, a missing video, ...) comes with `problem` set to the rule it
breaks, in the words of the dataset check (cogpipe.data.folders.scan), and is indexed as such, never encoded.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from cogpipe.data.folders import CAPTION_COLUMNS, VIDEO_COLUMNS, VIDEO_EXTS, DataError, scan

CAPTION_EXTS = (".txt", ".json", ".caption")


@dataclass(frozen=True)
class Clip:
    """One clip a source lists. `size` and `mtime` (when the store says them) let a re-index skip clips it probed."""
    uri: str  # where the clip is, for people: a path or URL, "tar-url#member", "parquet-url#row"
    caption: Optional[str]
    locator: list = field(compare=False)
    size: Optional[int] = None
    mtime: Optional[float] = None
    problem: Optional[str] = None


class SourceError(DataError):
    """A source that cannot be listed at all (missing, of no known kind, a column not there)."""


def _fs(url: str):
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def _is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def _url(fs, path: str) -> str:
    """A path `fs` listed, as a URL any process can open again."""
    return fs.unstrip_protocol(path) if _is_remote_fs(fs) else path


def _is_remote_fs(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol not in ("file", "local")


def _stat(info: dict) -> tuple[Optional[int], Optional[float]]:
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("updated")
    if mtime is not None and not isinstance(mtime, (int, float)):
        mtime = mtime.timestamp() if hasattr(mtime, "timestamp") else None
    return info.get("size"), mtime


def read_bytes(locator) -> bytes:
    """The bytes of a clip, from its locator (see the module's docstring)."""
    kind = locator[0]
    if kind == "file":
        fs, path = _fs(locator[1])
        return fs.cat_file(path)
    if kind == "range":
        _, url, offset, size = locator
        fs, path = _fs(url)
        return fs.cat_file(path, start=offset, end=offset + size)
    if kind == "parquet":
        import pyarrow.parquet as pq

        _, url, group, row, column = locator
        fs, path = _fs(url)
        with fs.open(path, "rb") as f:
            table = pq.ParquetFile(f).read_row_group(group, columns=[column.split(".")[0]])
        return _cell_bytes(table.column(column.split(".")[0])[row].as_py(), url, column)
    if kind == "arrow":
        _, folder, row, column = locator
        return _cell_bytes(_load_from_disk(folder).with_format("arrow")[row:row + 1].column(column)[0].as_py(),
                           folder, column)
    raise ValueError(f"unknown clip locator {locator!r}")


def _cell_bytes(value, where: str, column: str) -> bytes:
    if isinstance(value, dict):  # the `datasets` Video/Image storage: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):
        return read_bytes(["file", value])
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise DataError(f"{where}: column {column!r} holds neither video bytes nor a path ({type(value).__name__})")


# --- folders in today's layouts ----------------------------------------------------------------------------------


def folder_source(root) -> Iterator[Clip]:
    """A local folder in one of the three layouts of cogpipe.data.folders: its usable clips, then every problem the
    dataset check names (each as a clip that carries it: indexed, never encoded)."""
    samples, problems = scan(root)
    for s in samples:
        if s.image is not None:
            raise SourceError(f"{root}: first-frame images (images.txt, an image column) are not carried into the "
                              f"latent store yet; train on this folder with data.root instead")
        st = s.video.stat()
        yield Clip(str(s.video), s.caption, ["file", str(s.video)], st.st_size, st.st_mtime)
    for p in problems:
        yield Clip(p.file, None, ["file", p.file], problem=p.rule)


# --- WebDataset tar shards ---------------------------------------------------------------------------------------


def _wds_split(name: str) -> tuple[str, str]:
    """A tar member's (key, extension) as WebDataset groups them: the key runs to the first dot of the file name."""
    folder, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return posixpath.join(folder, stem), (dot + ext).lower()


def _caption_from(ext: str, data: bytes, names=CAPTION_COLUMNS) -> Optional[str]:
    text = data.decode("utf-8")
    if ext.endswith(".json"):
        row = json.loads(text)
        for name in names:
            if isinstance(row, dict) and row.get(name) is not None:
                return str(row[name]).strip()
        return None
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def tar_source(url: str, caption_columns=CAPTION_COLUMNS) -> Iterator[Clip]:
    """One WebDataset shard: per key, a video (.mp4, .webm, ...) and a caption (.txt, or .json with a caption
    field). The shard is read once, front to back (a stream, also from an object store); each clip's locator is its
    byte range in the shard."""
    fs, path = _fs(url)
    info = fs.info(path)
    size, mtime = _stat(info)
    groups: dict[str, dict] = {}
    order = []
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = _wds_split(member.name)
            if key not in groups:
                groups[key] = {}
                order.append(key)
            if any(ext.endswith(e) for e in VIDEO_EXTS):
                groups[key]["video"] = (member.name, member.offset_data, member.size)
            elif ext.endswith(CAPTION_EXTS):
                data = tar.extractfile(member).read()
                try:
                    groups[key]["caption"] = _caption_from(ext, data, caption_columns)
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    groups[key]["caption_problem"] = f"caption {member.name} unreadable ({type(e).__name__})"
    for key in order:
        g = groups[key]
        uri = f"{url}#{key}"
        if "video" not in g:
            if "caption" in g or "caption_problem" in g:
                yield Clip(uri, g.get("caption"), ["range", url, 0, 0], problem="no video file for this key")
            continue
        name, offset, nbytes = g["video"]
        uri = f"{url}#{name}"
        locator = ["range", url, offset, nbytes]
        problem = g.get("caption_problem")
        if problem is None and "caption" not in g:
            problem = f"no caption for key {key!r} (expected {key}.txt or {key}.json)"
        elif problem is None and not g["caption"]:
            problem = f"empty caption for key {key!r}"
        yield Clip(uri, g.get("caption"), locator, size, mtime, problem)


# --- Parquet files and `datasets` folders ------------------------------------------------------------------------


def _column(names, wanted: Optional[str], defaults, what: str, where: str) -> str:
    if wanted:
        if wanted.split(".")[0] not in names:
            raise SourceError(f"{where}: no column {wanted!r} (data {what} column); columns: {sorted(names)}")
        return wanted
    for name in defaults:
        if name in names:
            return name
    raise SourceError(f"{where}: no {what} column; expected one of {list(defaults)} (or name one with "
                      f"--{what}-column), found {sorted(names)}")


def _row_clip(uri: str, locator: list, video, caption, base: Optional[str]) -> Clip:
    """A clip from a table row whose video cell is bytes, a {"bytes", "path"} struct, or a path/URL."""
    if isinstance(video, dict):
        video = video.get("bytes") or video.get("path")
    if isinstance(video, str):  # a path (relative to the table's folder) or a URL: the clip is that file
        target = video if ("://" in video or video.startswith("/") or base is None) else posixpath.join(base, video)
        locator, uri = ["file", target], target
    elif video is None:
        return Clip(uri, caption, locator, problem="no video in this row")
    caption = caption.strip() if isinstance(caption, str) else caption
    problem = None if caption else ("no caption in this row" if caption is None else "empty caption")
    return Clip(uri, caption, locator, problem=problem)


def parquet_source(url: str, video_column=None, caption_column=None) -> Iterator[Clip]:
    """A Parquet file, read a row group at a time (also from an object store or the hub, never all at once)."""
    import pyarrow.parquet as pq

    fs, path = _fs(url)
    base = posixpath.dirname(url)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        vcol = _column(names, video_column, VIDEO_COLUMNS, "video", url)
        ccol = _column(names, caption_column, CAPTION_COLUMNS, "caption", url)
        for group in range(pf.num_row_groups):
            table = pf.read_row_group(group, columns=[vcol, ccol])
            videos, captions = table.column(vcol).to_pylist(), table.column(ccol).to_pylist()
            for row, (video, caption) in enumerate(zip(videos, captions)):
                yield _row_clip(f"{url}#{group}:{row}", ["parquet", url, group, row, vcol], video, caption, base)


_DISK = {}


def _load_from_disk(folder: str):
    """A `datasets` save_to_disk folder (memory-mapped Arrow; one per process)."""
    if folder not in _DISK:
        import datasets

        ds = datasets.load_from_disk(folder)
        if isinstance(ds, datasets.DatasetDict):
            raise SourceError(f"{folder}: a DatasetDict ({list(ds)}); name a split's folder, e.g. {folder}/train")
        _DISK[folder] = ds
    return _DISK[folder]


def dataset_source(folder: str, video_column=None, caption_column=None, batch: int = 256) -> Iterator[Clip]:
    """A `datasets` save_to_disk folder: rows read as Arrow (no decoding of a Video feature)."""
    ds = _load_from_disk(folder)
    vcol = _column(ds.column_names, video_column, VIDEO_COLUMNS, "video", folder)
    ccol = _column(ds.column_names, caption_column, CAPTION_COLUMNS, "caption", folder)
    arrow = ds.with_format("arrow")
    for start in range(0, len(ds), batch):
        table = arrow[start:start + batch]
        for i, (video, caption) in enumerate(zip(table.column(vcol).to_pylist(), table.column(ccol).to_pylist())):
            row = start + i
            yield _row_clip(f"{folder}#{row}", ["arrow", folder, row, vcol], video, caption, folder)


# --- which kind a SOURCE is --------------------------------------------------------------------------------------


def _expand(fs, path: str, exts) -> list[str]:
    if fs.isdir(path):
        found = [p for p in fs.find(path) if p.lower().endswith(exts)]
    else:
        found = fs.glob(path) if any(c in path for c in "*?[") else [path]
    return sorted(found)


def open_source(source: str, video_column: Optional[str] = None, caption_column: Optional[str] = None
                ) -> Iterator[Clip]:
    """Every clip of one SOURCE: a folder (today's layouts), tar shards, Parquet files, a `datasets` folder, or a
    hub dataset (hf://datasets/owner/name), local or behind an fsspec URL. Which kind is decided from what is
    there: a folder holding dataset_info.json/state.json is a `datasets` folder; files (or a folder, or a glob) of
    .tar are WebDataset shards, of .parquet Parquet; any other local folder is one of today's layouts."""
    fs, path = _fs(source)
    if not _is_remote(source) and not Path(source).exists() and not any(c in source for c in "*?["):
        raise SourceError(f"{source}: not found (a dataset folder, .tar shards, .parquet files, a `datasets` "
                          f"folder, or a URL: s3://, gs://, hf://datasets/...)")
    if fs.isdir(path) and fs.exists(posixpath.join(path, "state.json")):
        return dataset_source(source, video_column, caption_column)
    files = _expand(fs, path, (".tar", ".parquet"))
    tars = [f for f in files if f.lower().endswith(".tar")]
    parquets = [f for f in files if f.lower().endswith(".parquet")]
    if tars or parquets:
        def clips():
            for f in tars:
                yield from tar_source(_url(fs, f) if _is_remote(source) else f)
            for f in parquets:
                yield from parquet_source(_url(fs, f) if _is_remote(source) else f, video_column, caption_column)
        return clips()
    if not _is_remote(source) and Path(source).is_dir():
        return folder_source(source)
    raise SourceError(f"{source}: no clips found here: no .tar or .parquet files, and not a local dataset folder "
                      f"(prompts.txt + videos.txt, metadata.jsonl/csv, or videos with .txt captions)")
