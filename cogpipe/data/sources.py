"""Where clips come from: every source lists (uri, caption, where the bytes are) for each clip it holds.

    for clip in open_source("data/tiny"):             # a folder in one of today's three layouts
        data = read_bytes(clip.locator)
    open_source("s3://bucket/data/")                   # the same layouts behind a URL
    open_source("s3://bucket/shards/")                 # WebDataset tar shards: KEY.mp4 + KEY.txt | KEY.json
    open_source("hf_set/", video_column="video")       # a `datasets` save_to_disk folder
    open_source("gs://bucket/clips.parquet")           # Parquet files (what the hub stores datasets as)
    open_source("hf://datasets/owner/name")            # a hub dataset, in whichever of these layouts it holds
    open_source("owner/name")                          # the same, where no local path of that name exists

A source is local or behind any fsspec URL (s3://, gs://, hf://, ...). A folder behind a URL (a hub repo included) is
listed once and recognised by what it holds, in this order: a folder layout's list files at its top (prompts.txt
or prompt.txt + videos.txt, metadata.jsonl/csv), then .tar shards or .parquet files anywhere below it, then videos
with same-name .txt captions at its top; only the list files and captions are read while listing, the clips later,
one at a time, where they are probed and encoded. A clip's `locator` is a small JSON-able list
that says how to read its bytes again later, from any process of a Ray cluster, without listing the source again:
    ["file", url]                            a whole file
    ["range", url, offset, size]             a member of a tar shard (read as a byte range: no tar listing)
    ["parquet", url, row_group, row, column] a binary cell of a Parquet file
    ["arrow", folder, row, column]           a binary cell of a `datasets` save_to_disk folder
A clip whose entry is already broken (no caption, a missing video, ...) comes with `problem` set to the rule it
breaks, in the words of the dataset check (cogpipe.data.folders.scan), and is indexed as such, never encoded.
A folder's clip with a first-frame image (images.txt, an image column: image-to-video) carries the image's uri and
locator (`image`, `image_locator`) besides its own.
"""

from __future__ import annotations

import json
import posixpath
import re
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
    image: Optional[str] = None  # image-to-video: the clip's own first-frame image (uri), where the source lists one
    image_locator: Optional[list] = field(default=None, compare=False)
    image_size: Optional[int] = None
    image_mtime: Optional[float] = None


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
    from cogpipe.data.store import is_local

    return path if is_local(fs) else fs.unstrip_protocol(path)


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


def _local_stat(path: Path) -> tuple[Optional[int], Optional[float]]:
    try:
        st = path.stat()
    except OSError:  # a listed first-frame image that is not there: named when the index reads it
        return None, None
    return st.st_size, st.st_mtime


def _folder_clips(samples, problems, stat) -> Iterator[Clip]:
    """A scanned folder's clips: its usable samples (with their first-frame images), then every problem the dataset
    check names (each as a clip that carries it: indexed, never encoded). `stat(path)` -> (size, mtime)."""
    for s in samples:
        image = dict(image=str(s.image), image_locator=["file", str(s.image)]) if s.image is not None else {}
        if s.image is not None:
            image["image_size"], image["image_mtime"] = stat(s.image)
        yield Clip(str(s.video), s.caption, ["file", str(s.video)], *stat(s.video), **image)
    for p in problems:
        yield Clip(p.file, None, ["file", p.file], problem=p.rule)


def folder_source(root) -> Iterator[Clip]:
    """A local folder in one of the three layouts of cogpipe.data.folders (read by its `scan`)."""
    samples, problems = scan(root)
    return _folder_clips(samples, problems, _local_stat)


class _Tree:
    """A folder behind an fsspec URL, listed once (`find`): its files with their infos, and its folders."""

    def __init__(self, fs, root: str):
        self.fs, self.root = fs, root.rstrip("/") or "/"
        self.files = {info["name"]: info for info in fs.find(self.root, detail=True).values()
                      if info.get("type", "file") != "directory"}
        self.dirs = {self.root}
        for name in self.files:
            parent = posixpath.dirname(name)
            while parent not in self.dirs and len(parent) > len(self.root):
                self.dirs.add(parent)
                parent = posixpath.dirname(parent)

    def url(self, path: str) -> str:
        return _url(self.fs, path)

    def top(self) -> list[str]:
        """The names of the files and folders at the top of the tree."""
        return sorted({posixpath.relpath(p, self.root).split("/")[0] for p in self.files})

    def stat(self, path: "RemotePath") -> tuple[Optional[int], Optional[float]]:
        info = self.files.get(path.path)
        return _stat(info) if info is not None else (None, None)


class RemotePath:
    """A path of a listed _Tree with the few pathlib.Path methods cogpipe.data.folders.scan_tree uses, so a folder
    layout behind a URL is read by the dataset check's own code. str() is the path's URL."""

    def __init__(self, tree: _Tree, path: str):
        self.tree, self.path = tree, path

    def __truediv__(self, name: str) -> "RemotePath":
        return RemotePath(self.tree, posixpath.join(self.path, name))

    def __str__(self) -> str:
        return self.tree.url(self.path)

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    def __lt__(self, other: "RemotePath") -> bool:
        return self.path < other.path

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    def with_suffix(self, suffix: str) -> "RemotePath":
        return RemotePath(self.tree, posixpath.splitext(self.path)[0] + suffix)

    def resolve(self) -> "RemotePath":
        return RemotePath(self.tree, posixpath.normpath(self.path))

    def is_relative_to(self, other: "RemotePath") -> bool:
        return self.path == other.path or self.path.startswith(other.path.rstrip("/") + "/")

    def is_file(self) -> bool:
        return self.path in self.tree.files

    def exists(self) -> bool:
        return self.path in self.tree.files or self.path in self.tree.dirs

    def read_bytes(self) -> bytes:
        return self.tree.fs.cat_file(self.path)

    def iterdir(self) -> Iterator["RemotePath"]:
        for name in self.tree.files:
            if posixpath.dirname(name) == self.path:
                yield RemotePath(self.tree, name)


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

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w.%-]+)?$")  # OWNER/NAME[@REVISION]
LAYOUT_FILES = ("prompts.txt", "prompt.txt", "videos.txt", "metadata.jsonl", "metadata.csv")
LOOKED_FOR = ("prompts.txt (or prompt.txt) + videos.txt, metadata.jsonl or metadata.csv at the top, .tar shards or "
              ".parquet files anywhere below, or videos with same-name .txt captions at the top")


def source_url(source: str) -> str:
    """The path or URL a SOURCE names: itself, except a Hugging Face hub dataset id OWNER/NAME[@REVISION] that names
    no local path, which is hf://datasets/OWNER/NAME[@REVISION] (a local path of that name always wins)."""
    if "://" in source or Path(source).expanduser().exists() or not HUB_ID.match(source):
        return source
    return f"hf://datasets/{source}"


def _expand(fs, path: str, exts) -> list[str]:
    if fs.isdir(path):
        found = [p for p in fs.find(path) if p.lower().endswith(exts)]
    else:
        found = fs.glob(path) if any(c in path for c in "*?[") else [path]
    return sorted(found)


def _files_source(files: list[str], url, video_column, caption_column) -> Iterator[Clip]:
    """.tar shards, then .parquet files (each a path `fs` lists, made a URL by `url`)."""
    for f in files:
        if f.lower().endswith(".tar"):
            yield from tar_source(url(f))
    for f in files:
        if f.lower().endswith(".parquet"):
            yield from parquet_source(url(f), video_column, caption_column)


def _no_layout(source: str, url: str, found: list[str]) -> SourceError:
    where = source if source == url else f"{source} ({url})"
    held = ", ".join(found[:12]) + (f", ... ({len(found)} in all)" if len(found) > 12 else "") if found else "nothing"
    hint = ""
    if any(f.endswith(".py") for f in found):
        hint = ("; a dataset script (.py) is not run: `datasets` no longer runs them either; the hub's Parquet "
                "conversion of the repo may be read instead: hf://datasets/OWNER/NAME@refs%2Fconvert%2Fparquet")
    elif url.startswith("hf://") and not url.startswith(("hf://datasets/", "hf://buckets/")):
        hint = "; a hub dataset is hf://datasets/OWNER/NAME (hf://OWNER/NAME is a model repo)"
    return SourceError(f"{where}: no clips found: looked for {LOOKED_FOR}; it holds {held}{hint}")


def _remote_folder(source: str, url: str, fs, path: str, video_column, caption_column) -> Iterator[Clip]:
    """A folder behind a URL (a hub repo included), listed once, in whichever layout it holds (the module's
    docstring says the order)."""
    from cogpipe.data.folders import scan_tree

    tree = _Tree(fs, path)
    top = set(tree.top())
    root = RemotePath(tree, tree.root)
    if "state.json" in top:  # a `datasets` save_to_disk folder
        return dataset_source(url, video_column, caption_column)
    if not any(name in top for name in LAYOUT_FILES):
        files = sorted(f for f in tree.files if f.lower().endswith((".tar", ".parquet")))
        if files:
            return _files_source(files, tree.url, video_column, caption_column)
        if not any(posixpath.splitext(name)[1].lower() in VIDEO_EXTS for name in top):
            raise _no_layout(source, url, sorted(top))
    try:
        samples, problems = scan_tree(root)
    except DataError:  # "no dataset found"
        raise _no_layout(source, url, sorted(top)) from None
    return _folder_clips(samples, problems, tree.stat)


def open_source(source: str, video_column: Optional[str] = None, caption_column: Optional[str] = None
                ) -> Iterator[Clip]:
    """Every clip of one SOURCE: a folder (today's layouts), tar shards, Parquet files, a `datasets` folder, or a
    hub dataset (hf://datasets/OWNER/NAME, or OWNER/NAME where no local path has that name), local or behind an
    fsspec URL. Which kind is decided from what is there: a local folder holding state.json is a `datasets` folder;
    a folder with a layout's list files at its top (prompts.txt + videos.txt, metadata.jsonl/csv) is that layout;
    files (or a folder, or a glob) of .tar are WebDataset shards, of .parquet Parquet; a folder with none of these
    is one of videos with .txt captions. A folder that is none of these raises SourceError, naming what was looked
    for and what is there."""
    url = source_url(source)
    remote = _is_remote(url)
    if not remote and not Path(url).exists() and not any(c in url for c in "*?["):
        raise SourceError(f"{source}: not found (a dataset folder, .tar shards, .parquet files, a `datasets` "
                          f"folder, a URL: s3://, gs://, hf://datasets/OWNER/NAME, ..., or a hub id OWNER/NAME)")
    fs, path = _fs(url)
    try:
        is_dir = fs.isdir(path)
        if remote and is_dir:
            return _remote_folder(source, url, fs, path, video_column, caption_column)
        if remote and not any(c in path for c in "*?[") and not fs.exists(path):
            what = f"no local path of that name, nor the hub dataset {url}" if url != source else "nothing there"
            raise SourceError(f"{source}: not found: {what} (or not reachable from here)")
    except (OSError, ValueError, RuntimeError) as e:  # the hub and object stores raise many kinds
        if isinstance(e, SourceError):
            raise
        raise SourceError(f"{source}: cannot list {url} ({type(e).__name__}: {str(e)[:300]})") from None
    if is_dir and fs.exists(posixpath.join(path, "state.json")):
        return dataset_source(url, video_column, caption_column)
    if is_dir and any((Path(url) / name).exists() for name in LAYOUT_FILES):
        return folder_source(url)  # its list files name the clips, whatever else the folder holds
    files = _expand(fs, path, (".tar", ".parquet"))
    if any(f.lower().endswith((".tar", ".parquet")) for f in files):
        return _files_source(files, (lambda f: _url(fs, f)) if remote else (lambda f: f), video_column,
                             caption_column)
    if is_dir:
        try:
            return folder_source(url)  # scans now (not a generator): its DataError is raised here
        except DataError:  # "no dataset found"
            raise _no_layout(source, url, sorted(p.name for p in Path(url).iterdir())) from None
    raise SourceError(f"{source}: no clips found here: no .tar or .parquet files, and not a dataset folder "
                      f"(looked for {LOOKED_FOR})")
