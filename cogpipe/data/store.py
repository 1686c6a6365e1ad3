"""The latent store: encoded training examples in Parquet shards, split by bucket, with one index as commit point.

Layout (STORE is a local folder or any fsspec URL: a path, file://..., s3://..., gs://...):

    STORE/index.json                          the commit point: what is listed here is the store
    STORE/shards/<F>x<H>x<W>/<shard-id>.parquet    rows of one bucket (pixel frames x height x width)
    STORE/prompts/<id>.parquet                the extra prompts training needs besides the rows ("" and the
                                              validation prompts), text -> embeddings

index.json: {"format": 1, "identity": {...the encoders, see store_identity...}, "buckets": [[F, H, W], ...],
"shards": [{"path", "bucket", "rows", "bytes", "sha256", "keys_digest", "latent_shape", "prompt_shape"}, ...],
"prompts": [{"path", "rows", "bytes", "sha256"}, ...], "rows": total}. Paths are relative to STORE.

A row (one training example, self-contained): key (str: the clip's content digest and what its encoding depends
on), caption (str), uri (str, where the clip came from, may be ""), latents (binary: the scaled latent
distribution's mean and std stacked, [2, C, F', H', W']), prompt_embeds (binary: T5 embeddings [L, D]) and, for an
image-to-video recipe, image_latents (binary: the first frame's noisy encodings [K, C, 1, H', W']). Within a shard
every tensor column has one shape and dtype, written in the Parquet schema's metadata ("cogpipe.tensors") and the
index, so a row decodes without anything else.

Why Parquet (pyarrow): columnar, so `existing_keys` reads the key column alone and never the latents; a shard is
opened as it is by pyarrow, `datasets` (load_dataset("parquet", ...)), DuckDB or Spark, with no cogpipe code;
row groups bound what a random read decodes (ROW_GROUP_BYTES); its footer carries row counts and column
statistics; it is what the Ray Data and FastVideo data pipelines write already.

Why prompt embeddings per row, not a deduplicated prompt table: a row is one example read with one row-group read;
the training reader's memory does not grow with the number of distinct prompts (no prompt table per rank and
DataLoader worker); a shard is checked, cached and evicted on its own. The encoder still runs T5 once per distinct
prompt; only the storage repeats for a caption shared by several clips.

Writing is crash-safe and resumable (one writer per store at a time):
- a shard is written whole, then published: on a local file system under a temporary name then renamed; on an object
  store (where rename is a copy, not atomic) to its final name, since an object appears whole or not at all;
- the shard exists for readers only once index.json lists it; index.json is replaced whole (rename locally, one PUT on
  an object store), so a reader sees the old index or the new one;
- a killed writer leaves at most unlisted shard files (and temporaries): the next StoreWriter sweeps them, and
  `existing_keys()` (the keys of listed shards) tells the encoder what is still to do: every key exactly once.

    w = StoreWriter("s3://bucket/store", store_identity(cfg, device), storage_options={...})
    todo = [clip for clip in manifest if clip.key not in w.existing_keys()]
    w.add((17, 64, 64), [{"key": ..., "caption": ..., "mean": ..., "std": ..., "prompt_embeds": ...}, ...])
    w.add_prompts({"": empty_embeds})
    w.close()                      # publishes what is buffered
    store = open_store(url)        # reads index.json only
    verify(url)                    # every checksum; names a bad shard

`cogpipe data verify STORE` runs `verify` (add_arguments/run below).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import numpy as np
import torch

STORE_FORMAT = 1
INDEX = "index.json"
MAX_ROWS = 1024  # rows per shard, at most
MAX_BYTES = 256 * 1024**2  # bytes of tensors per shard, at most (a shard is cached and verified whole)
ROW_GROUP_BYTES = 8 * 1024**2  # a random read decodes one row group: about this many bytes of rows
TENSORS = ("latents", "prompt_embeds", "image_latents")
_TMP = ".tmp-"


class StoreError(RuntimeError):
    """A store problem; the message names the store, the shard and the rule."""


# ---- file system -----------------------------------------------------------------------------------------------

def filesystem(url: str, storage_options: Optional[dict] = None):
    """(fsspec file system, root path within it) of a store URL: a plain path, file://, s3://, ... For s3 the
    endpoint and credentials come from `storage_options` (e.g. {"client_kwargs": {"endpoint_url": ...}}) or the
    standard AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL) that botocore reads."""
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(str(url), **(storage_options or {}))
    return fs, root.rstrip("/")


def is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _put_atomic(fs, path: str, data: bytes) -> None:
    """Write `data` to `path` so a reader sees it whole or not at all."""
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}{_TMP}{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)  # one PUT: the object appears complete or not at all


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- identity ---------------------------------------------------------------------------------------------------

def store_identity(cfg, device) -> dict:
    """Who encoded a store's rows, as training compares it with its recipe: the VAE, the tokenizer and T5 (their
    configs and weight files, or preset and seed), the encoders' dtype on `device`, the text length, image-to-video
    and its variant count, and the latent conventions."""
    from cogpipe import models
    from cogpipe.data.cache import encoder_identity
    from cogpipe.devices import DTYPE_NAMES, encoder_dtype

    transformer_config, vae_config = models.component_configs(cfg.model)
    i2v = bool(models.model_facts(transformer_config, vae_config)["i2v"])
    return {"vae": encoder_identity(cfg.model, "vae"), "text_encoder": encoder_identity(cfg.model, "text_encoder"),
            "tokenizer": encoder_identity(cfg.model, "tokenizer"), "dtype": DTYPE_NAMES[encoder_dtype(device)],
            "max_text_len": int(transformer_config["max_text_seq_length"]), "i2v": i2v,
            "image_noise_variants": int(cfg.data.image_noise_variants) if i2v else None,
            "latents": "[mean, std] x vae.scaling_factor, each [C, F', H', W']"}


IDENTITY_IGNORED = ("dtype",)  # the stored tensors keep their dtype; encoding on a GPU in bf16 is still the model


def identity_mismatch(stored, wanted: dict) -> list[str]:
    """The identity fields in which a store differs from a recipe (empty: it may train on it)."""
    if not isinstance(stored, dict):
        return [] if stored == wanted else [f"identity {stored!r} != {wanted!r}"]
    return [f"{k}: store {stored.get(k)!r}, recipe {wanted.get(k)!r}" for k in sorted(set(stored) | set(wanted))
            if k not in IDENTITY_IGNORED and stored.get(k) != wanted.get(k)]


# ---- the index --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    path: str  # relative to the store
    bucket: tuple  # (frames, height, width) in pixels
    rows: int
    bytes: int
    sha256: str
    keys_digest: str  # sha256 of the shard's keys, in row order, one a line
    tensors: dict = field(default_factory=dict, compare=False)  # {column: {"shape", "dtype"}}

    def as_json(self) -> dict:
        return {"path": self.path, "bucket": list(self.bucket), "rows": self.rows, "bytes": self.bytes,
                "sha256": self.sha256, "keys_digest": self.keys_digest, "tensors": self.tensors}

    @classmethod
    def from_json(cls, d: dict) -> "Shard":
        return cls(path=d["path"], bucket=tuple(d["bucket"]), rows=int(d["rows"]), bytes=int(d["bytes"]),
                   sha256=d["sha256"], keys_digest=d.get("keys_digest", ""), tensors=d.get("tensors", {}))


@dataclass
class Store:
    """A store as its index describes it (nothing else is read to make one)."""
    url: str
    identity: Any
    shards: list[Shard]
    prompts: list[Shard]
    storage_options: dict = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def buckets(self) -> list[tuple]:
        return sorted({s.bucket for s in self.shards})

    @property
    def digest(self) -> str:
        """Names this version of the store: its identity and listed shards (a resumed run checks it)."""
        return sha256_bytes(json.dumps([self.identity, [s.sha256 for s in self.shards]], sort_keys=True).encode())

    def as_json(self) -> dict:
        return {"format": STORE_FORMAT, "identity": self.identity, "buckets": [list(b) for b in self.buckets],
                "shards": [s.as_json() for s in self.shards], "prompts": [p.as_json() for p in self.prompts],
                "rows": self.rows}

    def fs(self):
        return filesystem(self.url, self.storage_options)


def open_store(url, storage_options: Optional[dict] = None) -> Store:
    """The store at `url` from its index.json alone; a missing or unreadable index is a StoreError naming it."""
    fs, root = filesystem(url, storage_options)
    path = f"{root}/{INDEX}"
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        raise StoreError(f"store {url}: no {INDEX} (not a store, or nothing published yet)") from None
    try:
        d = json.loads(raw)
        if d.get("format") != STORE_FORMAT:
            raise StoreError(f"store {url}: {INDEX} has format {d.get('format')!r}, this cogpipe reads "
                             f"{STORE_FORMAT}")
        return Store(url=str(url), identity=d["identity"], shards=[Shard.from_json(s) for s in d["shards"]],
                     prompts=[Shard.from_json(s) for s in d.get("prompts", [])],
                     storage_options=dict(storage_options or {}))
    except (ValueError, KeyError, TypeError) as e:
        raise StoreError(f"store {url}: {INDEX} is not a valid store index ({type(e).__name__}: {e})") from None


# ---- shards: encoding and decoding rows -------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _tensor(value) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a numpy array or torch tensor, got {type(value).__name__}")
    return t.detach().cpu().contiguous()


def _to_bytes(t: torch.Tensor) -> bytes:
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _row_parts(row: dict) -> dict[str, torch.Tensor]:
    """A writer's row's tensors as given: mean, std, prompt_embeds[, image_latents] (no copies of numpy arrays)."""
    try:
        out = {k: _tensor(row[k]) for k in ("mean", "std", "prompt_embeds")}
    except KeyError as e:
        raise StoreError(f"row {row.get('key')!r}: no {e.args[0]!r} (a row needs key, caption, mean, std, "
                         f"prompt_embeds)") from None
    if row.get("image_latents") is not None:
        out["image_latents"] = _tensor(row["image_latents"])
    return out


def row_tensors(row: dict) -> dict[str, torch.Tensor]:
    """A writer's row -> the stored tensors: latents = [mean, std] stacked, prompt_embeds[, image_latents]."""
    parts = _row_parts(row)
    return {"latents": torch.stack([parts.pop("mean"), parts.pop("std")]), **parts}


def prompt_tensors(row: dict) -> dict[str, torch.Tensor]:
    """An extra prompt's row ({"key": text, "caption": text, "prompt_embeds"}) -> its stored tensor."""
    return {"prompt_embeds": _tensor(row["prompt_embeds"])}


def encode_shard(rows: list[dict], tensors_of=row_tensors) -> tuple[bytes, dict]:
    """Rows of one bucket -> (Parquet bytes, {column: {"shape", "dtype"}}). Every row's tensors must have the
    shapes and dtypes of the first row's (a StoreError names the row that differs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, list] = {"key": [], "caption": [], "uri": []}
    spec: dict[str, dict] = {}
    for row in rows:
        tensors = tensors_of(row)
        for name, t in tensors.items():
            want = spec.setdefault(name, {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")})
            got = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            if got != want:
                raise StoreError(f"row {row['key']!r}: {name} is {got}, the shard's other rows {want} (one "
                                 f"shape and dtype a column within a bucket)")
            columns.setdefault(name, []).append(_to_bytes(t))
        if set(tensors) != set(spec):
            raise StoreError(f"row {row['key']!r}: has {sorted(tensors)}, the shard's other rows {sorted(spec)}")
        columns["key"].append(str(row["key"]))
        columns["caption"].append(str(row["caption"]))
        columns["uri"].append(str(row.get("uri") or ""))
    schema = pa.schema([("key", pa.string()), ("caption", pa.string()), ("uri", pa.string())]
                       + [(name, pa.binary()) for name in TENSORS if name in spec],
                       metadata={"cogpipe.tensors": json.dumps(spec), "cogpipe.format": str(STORE_FORMAT)})
    table = pa.table({name: columns[name] for name in schema.names}, schema=schema)
    row_bytes = max(1, sum(int(np.prod(s["shape"])) * torch.tensor([], dtype=_DTYPES[s["dtype"]]).element_size()
                           for s in spec.values()))
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=max(1, ROW_GROUP_BYTES // row_bytes), compression="none",
                   use_dictionary=["caption", "uri"], write_statistics=["key"])  # tensors: raw bytes, as they are
    return sink.getvalue(), spec


def decode_row(table_row: dict, spec: dict) -> dict[str, torch.Tensor]:
    """One stored row ({column: value}) -> the training example {"mean", "std", "prompt_embeds"[, "image_latents"]}
    as the folder cache gives it (cogpipe.data.cache.CachedDataset)."""
    out = {}
    for name, s in spec.items():
        t = torch.frombuffer(bytearray(table_row[name]), dtype=_DTYPES[s["dtype"]]).reshape(s["shape"])
        if name == "latents":
            out["mean"], out["std"] = t[0], t[1]
        else:
            out[name] = t
    return out


def keys_digest(keys: Iterable[str]) -> str:
    return sha256_bytes("".join(f"{k}\n" for k in keys).encode())


# ---- keys ---------------------------------------------------------------------------------------------------------

def key_bytes(keys) -> np.ndarray:
    """Keys (str: an iterable, or a pyarrow string array) -> their UTF-8 bytes as one numpy array of fixed width
    (keys of one length, as sha256 keys are, straight from Arrow's buffer)."""
    import pyarrow as pa

    if isinstance(keys, pa.ChunkedArray):
        parts = [key_bytes(c) for c in keys.chunks]
        return np.concatenate(parts) if len(parts) > 1 else parts[0] if parts else np.empty(0, dtype="S1")
    if isinstance(keys, pa.Array):
        b = keys.cast(pa.binary())
        offsets = np.frombuffer(b.buffers()[1], dtype=np.int32)[b.offset:b.offset + len(b) + 1] if len(b) else []
        width = int(offsets[1] - offsets[0]) if len(b) else 0
        if width and not b.null_count and (np.diff(offsets) == width).all():
            return np.frombuffer(b.buffers()[2], dtype=f"S{width}", count=len(b), offset=int(offsets[0])).copy()
        keys = b.to_pylist()
    else:
        keys = [str(k).encode() for k in keys]
    return np.array(keys, dtype=np.bytes_) if keys else np.empty(0, dtype="S1")


class KeySet(AbstractSet):
    """A set of store keys kept compactly: one sorted numpy array of their UTF-8 bytes at a fixed width (64 bytes a
    sha256 key, where a Python set of str takes about 150), and the keys added since the last merge in a small set
    (merged every MERGE keys). A set (`key in keys`, `len`, iteration, comparison with a set) that grows by
    `add(key)` and `update(iterable)`; `find` looks up an array of keys (key_bytes) at once."""

    MERGE = 4096

    def __init__(self, keys: Iterable[str] = (), *, array: Optional[np.ndarray] = None):
        self._array = np.empty(0, dtype="S1") if array is None else array  # sorted
        self._new: set[str] = set()
        self.update(keys)

    def __len__(self) -> int:
        return len(self._array) + len(self._new)

    def __iter__(self):
        yield from (b.decode() for b in self._array)
        yield from self._new

    def __contains__(self, key) -> bool:
        if key in self._new:
            return True
        b, a = str(key).encode(), self._array
        if not len(a) or len(b) > a.itemsize:
            return False
        i = int(np.searchsorted(a, b))
        return i < len(a) and a[i] == b

    def add(self, key: str) -> None:
        if key not in self:
            self._new.add(str(key))
            if len(self._new) >= self.MERGE:
                self.merge()

    def update(self, keys: Iterable[str]) -> None:
        for k in keys:
            self.add(k)

    def merge(self) -> None:
        """The keys added since into the sorted array."""
        if self._new:
            new = key_bytes(sorted(self._new))
            self._array = np.insert(self._array.astype(np.result_type(self._array, new), copy=False),
                                    np.searchsorted(self._array, new), new)
            self._new = set()

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Where each of `keys` (key_bytes) is in the sorted array (merged first), -1 for a key not in the set."""
        self.merge()
        a = self._array
        if not len(a) or not len(keys):
            return np.full(len(keys), -1)
        i = np.minimum(np.searchsorted(a, keys), len(a) - 1)
        return np.where(a[i] == keys, i, -1)


# ---- writing ----------------------------------------------------------------------------------------------------

def write_shard(fs, root: str, bucket, rows: list[dict], kind: str = "shards") -> Shard:
    """Write one shard file under `root` (from `filesystem(url)`), whole or not at all, and return what the index
    will list. It is not part of the store until published (StoreWriter.publish); callable from any process or
    Ray task, the publishing left to one writer."""
    data, spec = encode_shard(rows, row_tensors if kind == "shards" else prompt_tensors)
    sub = "x".join(str(int(x)) for x in bucket) + "/" if kind == "shards" else ""
    rel = f"{kind}/{sub}{uuid.uuid4().hex}.parquet"
    _put_atomic(fs, f"{root}/{rel}", data)
    return Shard(path=rel, bucket=tuple(bucket) if bucket else (), rows=len(rows), bytes=len(data),
                 sha256=sha256_bytes(data), keys_digest=keys_digest(str(r["key"]) for r in rows), tensors=spec)


# ---- writing (one writer per store) ---------------------------------------------------------------------------

class StoreWriter:
    """Adds rows to a store (creating it), in shards of at most `max_rows` rows and `max_bytes` bytes of tensors.

    One writer per store at a time. Opening sweeps what a killed writer left (temporaries and shard files the index
    does not list). `add` buffers per bucket and publishes a shard each time a bucket's buffer is full; `flush`
    publishes every buffer; `close` flushes. A key already in the store, or already added, is skipped.
    `identity` (store_identity) must equal the store's where it exists (a StoreError names the fields)."""

    def __init__(self, url, identity, *, storage_options: Optional[dict] = None, max_rows: int = MAX_ROWS,
                 max_bytes: int = MAX_BYTES, log=lambda *_: None):
        self.url, self.log = str(url), log
        self.max_rows, self.max_bytes = max_rows, max_bytes
        self._fs, self._root = filesystem(url, storage_options)
        try:
            self.store = open_store(url, storage_options)
        except StoreError:
            if self._fs.exists(f"{self._root}/{INDEX}"):
                raise
            self.store = Store(url=self.url, identity=identity, shards=[], prompts=[],
                               storage_options=dict(storage_options or {}))
        differs = identity_mismatch(self.store.identity, identity)
        if differs:
            raise StoreError(f"store {url}: encoded by other encoders than this writer's: {'; '.join(differs)} "
                             f"(write to a new store)")
        self._keys: Optional[KeySet] = None
        self._buffers: dict[tuple, list] = {}
        self._buffer_bytes: dict[tuple, int] = {}
        self._prompts: dict[str, Any] = {}
        self.sweep()

    def sweep(self) -> list[str]:
        """Remove shard files and temporaries the index does not list (left by a killed writer)."""
        listed = {f"{self._root}/{s.path}" for s in self.store.shards + self.store.prompts}
        removed = []
        for sub in ("shards", "prompts"):
            base = f"{self._root}/{sub}"
            if not self._fs.exists(base):
                continue
            for path in self._fs.find(base):
                if path.rstrip("/") not in listed:
                    self._fs.rm_file(path)
                    removed.append(path)
                    self.log(f"store {self.url}: removed {path}, left by a killed writer")
        if is_local(self._fs):
            for name in os.listdir(self._root) if os.path.isdir(self._root) else ():
                if name.startswith(INDEX + _TMP):
                    os.remove(os.path.join(self._root, name))
                    removed.append(name)
        return removed

    def existing_keys(self) -> KeySet:
        """The keys of every published row (read from the key column only, a shard at a time), plus those added
        since: a KeySet (one sorted array of bytes: 64 bytes a sha256 key, 13 MB for 200k)."""
        if self._keys is None:
            import pyarrow.parquet as pq

            array, at = None, 0
            for s in self.store.shards:
                with self._fs.open(f"{self._root}/{s.path}", "rb") as f:
                    keys = key_bytes(pq.read_table(f, columns=["key"]).column("key"))
                if array is None or keys.itemsize > array.itemsize:
                    array = (np.empty(self.store.rows, dtype=keys.dtype) if array is None
                             else array.astype(np.result_type(array, keys)))
                if at + len(keys) > len(array):  # a shard holding more rows than the index says
                    array = np.concatenate([array, np.empty(at + len(keys) - len(array), dtype=array.dtype)])
                array[at:at + len(keys)] = keys
                at += len(keys)
            array = array[:at].copy() if array is not None and at < len(array) else array
            if array is not None:
                array.sort()
            self._keys = KeySet(array=array)
        return self._keys

    def add(self, bucket, rows: Iterable[dict]) -> int:
        """Buffer `rows` of one bucket (pixel (frames, height, width)); publish full shards. Returns how many rows
        were new (a key already in the store or added before is skipped)."""
        bucket = tuple(int(x) for x in bucket)
        if len(bucket) != 3:
            raise StoreError(f"store {self.url}: bucket {bucket} is not (frames, height, width)")
        keys, added = self.existing_keys(), 0
        for row in rows:
            if row["key"] in keys:
                continue
            size = sum(t.numel() * t.element_size() for t in _row_parts(row).values())  # as stored
            if self._buffers.get(bucket) and self._buffer_bytes[bucket] + size > self.max_bytes:
                self._publish(bucket)
            self._buffers.setdefault(bucket, []).append(row)
            self._buffer_bytes[bucket] = self._buffer_bytes.get(bucket, 0) + size
            keys.add(row["key"])
            added += 1
            if len(self._buffers[bucket]) >= self.max_rows:
                self._publish(bucket)
        return added

    def add_prompts(self, prompts: dict) -> None:
        """Extra prompt embeddings {text: [L, D]} training needs besides the rows' ("" and validation prompts);
        published by flush. A text already in the store is kept as it is."""
        self._prompts.update(prompts)

    def write_shard(self, bucket, rows: list[dict]) -> Shard:
        """Write one shard of this store, not yet published (see the module function write_shard)."""
        return write_shard(self._fs, self._root, bucket, rows)

    def publish(self, shards: list[Shard] = (), prompts: list[Shard] = (), *, checked: bool = False) -> None:
        """List shards in the index: the commit point (the index is replaced whole). Shards written elsewhere
        (`write_shard` in Ray tasks) have their keys read first: a key the store holds already is a StoreError
        naming the shard, and nothing is published (every key once)."""
        if not checked:
            import pyarrow.parquet as pq

            keys = self.existing_keys()
            for s in shards:
                with self._fs.open(f"{self._root}/{s.path}", "rb") as f:
                    new = pq.read_table(f, columns=["key"]).column("key").to_pylist()
                seen: set[str] = set()
                twice = {k for k in new if k in keys or k in seen or seen.add(k)}
                if twice:
                    raise StoreError(f"store {self.url}: shard {s.path} holds key(s) the store already has, e.g. "
                                     f"{sorted(twice)[0]!r}: not published")
                keys.update(new)
        self.store.shards += list(shards)
        self.store.prompts += list(prompts)
        _put_atomic(self._fs, f"{self._root}/{INDEX}", json.dumps(self.store.as_json(), indent=1).encode())

    def _publish(self, bucket) -> None:
        rows = self._buffers.pop(bucket)
        self._buffer_bytes.pop(bucket, None)
        self.publish([self.write_shard(bucket, rows)], checked=True)  # add() skipped the keys already stored

    def flush(self) -> None:
        for bucket in list(self._buffers):
            if self._buffers[bucket]:
                self._publish(bucket)
        if self._prompts:
            have = set(read_prompts(self.store))
            new = [{"key": text, "caption": text, "prompt_embeds": embeds}
                   for text, embeds in self._prompts.items() if text not in have]
            self._prompts = {}
            if new:
                by_shape: dict[tuple, list] = {}
                for row in new:
                    by_shape.setdefault(tuple(_tensor(row["prompt_embeds"]).shape), []).append(row)
                self.publish(prompts=[write_shard(self._fs, self._root, None, rows, kind="prompts")
                                      for rows in by_shape.values()], checked=True)

    def close(self) -> None:
        self.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()


# ---- reading and checking ---------------------------------------------------------------------------------------

def sha256_stream(f, chunk: int = 1 << 22) -> tuple[str, int]:
    """(sha256, size) of what an open binary file holds, read in chunks."""
    h, n = hashlib.sha256(), 0
    while block := f.read(chunk):
        h.update(block)
        n += len(block)
    return h.hexdigest(), n


def check_digest(store: Store, shard: Shard, actual: str, size: int, where: str = "") -> None:
    """A StoreError naming the shard and both checksums where (actual, size) is not what the index lists."""
    if actual != shard.sha256 or size != shard.bytes:
        raise StoreError(f"store {store.url}: shard {shard.path}{where} is damaged: sha256 {actual} ({size} bytes), "
                         f"the index lists {shard.sha256} ({shard.bytes} bytes); nothing is read from it")


def check_bytes(store: Store, shard: Shard, data, where: str = "") -> None:
    """check_digest of bytes in memory (any buffer)."""
    check_digest(store, shard, hashlib.sha256(data).hexdigest(), memoryview(data).nbytes, where)


def read_prompts(store: Store) -> dict[str, torch.Tensor]:
    """The store's extra prompts {text: [L, D]} (each prompt file checked against its checksum)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, root = store.fs()
    out = {}
    for p in store.prompts:
        data = fs.cat_file(f"{root}/{p.path}")
        check_bytes(store, p, data)
        table = pq.read_table(pa.BufferReader(data))
        spec = {"prompt_embeds": p.tensors["prompt_embeds"]}
        for row in table.to_pylist():
            out[row["caption"]] = decode_row(row, spec)["prompt_embeds"]
    return out


def verify(url, storage_options: Optional[dict] = None, log=lambda *_: None) -> list[str]:
    """Check every listed shard's bytes against its checksum, and its rows and keys against the index. Returns the
    problems, one a shard, each naming the shard (empty: the store is sound)."""
    import pyarrow.parquet as pq

    store = open_store(url, storage_options)
    fs, root = store.fs()
    problems = []
    for s in store.shards + store.prompts:
        try:
            with fs.open(f"{root}/{s.path}", "rb") as f:
                check_digest(store, s, *sha256_stream(f))
            with fs.open(f"{root}/{s.path}", "rb") as f:
                keys = pq.read_table(f, columns=["key"]).column("key").to_pylist()
            if len(keys) != s.rows or (s.keys_digest and keys_digest(keys) != s.keys_digest):
                raise StoreError(f"store {url}: shard {s.path} holds {len(keys)} rows whose keys do not match the "
                                 f"index ({s.rows} rows)")
        except FileNotFoundError:
            problems.append(f"store {url}: shard {s.path} is listed in the index but missing")
            continue
        except StoreError as e:
            problems.append(str(e))
            continue
        log(f"ok {s.path} ({s.rows} rows)")
    return problems


def add_arguments(parser) -> None:
    parser.add_argument("store", help="the store: a folder or an fsspec URL (s3://...)")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=JSON",
                        help="an fsspec storage option, e.g. client_kwargs='{\"endpoint_url\": \"http://...\"}'")


def storage_options_from(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def run(args) -> int:
    """`cogpipe data verify STORE`: exit 0 when every checksum holds, 1 naming each bad shard."""
    store = open_store(args.store, storage_options_from(args.storage_option))
    problems = verify(args.store, storage_options_from(args.storage_option))
    for p in problems:
        print(p)
    print(f"store {args.store}: {len(store.shards)} shards, {store.rows} rows, {len(problems)} problem(s)")
    return 1 if problems else 0
