"""`cogpipe data encode --config RECIPE --manifest M --out STORE [--address ADDR]`: a manifest's clips encoded on Ray
Data into a latent store (cogpipe.data.store).

    plan (this process)                             the manifest's key columns, a row group at a time: skip problems,
                                                     keys on several rows and keys already in the store; a bit a row
      -> read the rows to encode                    Ray tasks, one a row group (on this machine where the manifest is
                                                     a local folder): no row's text passes through this process
      -> sort by (bucket, caption, key)             Ray Data's sort; cut into blocks and kept in Ray's object store
      -> read + decode + resize                     Ray tasks (CPU; on a cluster without GPUs, in the actors below,
                                                     which hold every core); for an image-to-video recipe, also the
                                                     clip's listed first-frame image, where it has one
      -> VAE encode, T5 encode                      an actor pool: each actor loads the encoders once (one GPU each
                                                     where the cluster has GPUs), encodes data.encode_batch clips of a
                                                     bucket a forward, and each distinct caption once
      -> StoreWriter in this process                shards published one at a time (index.json is the commit point)

On a CPU each encoding actor runs on one thread (cogpipe.data.stages.ENCODE_THREADS) and more cores mean more actors
(--workers, default: the cluster's GPUs, else its CPUs). The stages are the ones train.py's folder cache runs, so a
clip's latents are the same bits whichever path, worker count or machine encodes them.

Killed at any point, a rerun encodes only what no published shard holds: every key ends up in the store once. An
actor that dies is restarted by Ray and its batch run again (max_restarts, max_task_retries); rows of a batch are
added once, by key.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np

from cogpipe import atomic
from cogpipe.data.folders import DataError
from cogpipe.data.index import GROUP_ROWS, Progress
from cogpipe.data.sources import read_bytes

FAULT_ENV = "COGPIPE_FAULT_ENCODER"  # "N:FILE": an encoding actor kills itself on its Nth batch, once (FILE records it)
TEXT_MEMO = 256  # distinct captions an actor keeps the embeddings of (rows come sorted by caption within a bucket)


def _array(data: bytes, shape, dtype="float32") -> np.ndarray:
    return np.frombuffer(data, dtype=dtype).reshape([int(x) for x in shape]).copy()


def decode_row(row: dict) -> dict:
    """Ray task: read a clip's bytes and decode, sample, resize, crop it at its bucket (float32 [F,3,H,W] as bytes);
    where the row lists a first-frame image (image-to-video), read it and resize, crop it the same way (float32
    [3,H,W] as bytes, `image_pixels`; b"" where none). A clip that no longer decodes comes back with its problem."""
    from cogpipe.data.folders import load_image
    from cogpipe.data.stages import decode_clip

    frames, height, width = (int(x) for x in row["bucket"])
    out = {**row, "pixels": b"", "image_pixels": b"", "problem": ""}
    reading = "the clip's bytes"
    try:
        clip = decode_clip(read_bytes(json.loads(row["locator"])), frames, height, width, row["uri"])
        if isinstance(row.get("image_locator"), str) and row["image_locator"]:  # (a missing one may come as NaN)
            reading = "first-frame image"
            image = read_bytes(json.loads(row["image_locator"]))
            out["image_pixels"] = load_image(row["image"], height, width, image).numpy().tobytes()
        out["pixels"] = clip.numpy().tobytes()
    except DataError as e:
        out["problem"] = e.problem.rule if e.problem else str(e)
    except Exception as e:  # an object store or file gone since indexing
        out["problem"] = f"cannot read {reading} ({type(e).__name__}: {str(e)[:200]})"
    return out


class Encoder:
    """A Ray Data actor: the recipe's VAE and T5 loaded once; batches of decoded rows -> latents and embeddings."""

    def __init__(self, cfg, fault: Optional[str] = None):
        import torch

        from cogpipe import models
        from cogpipe.devices import encoder_dtype, inference_device

        self.cfg, self.fault, self.calls = cfg, fault, 0
        self.device = inference_device()
        dtype = encoder_dtype(self.device)
        if self.device.type == "cpu":
            from cogpipe.data.stages import ENCODE_THREADS

            torch.set_num_threads(ENCODE_THREADS)
        transformer_config, vcfg = models.component_configs(cfg.model)
        self.max_len = transformer_config["max_text_seq_length"]
        self.i2v = bool(models.model_facts(transformer_config, vcfg)["i2v"])
        self.vae = models.build_vae(cfg.model, dtype, self.device).to(self.device).eval()
        if cfg.model.vae_slicing:
            self.vae.enable_slicing()
        if cfg.model.vae_tiling:
            self.vae.enable_tiling()
        self.tokenizer = models.build_tokenizer(cfg.model)
        self.text_encoder = models.build_text_encoder(cfg.model, dtype, self.device).to(self.device).eval()
        self.memo: dict[str, np.ndarray] = {}
        self.text_encoded = 0

    def _maybe_fail(self) -> None:
        """The fault tests' actor kill (FAULT_ENV), once: the FILE it names records that it happened."""
        if not self.fault:
            return
        n, _, marker = self.fault.partition(":")
        if self.calls == int(n) and not Path(marker).exists():
            Path(marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    def _embeds(self, caption: str) -> np.ndarray:
        from cogpipe.data.stages import text_encode

        if caption not in self.memo:
            if len(self.memo) >= TEXT_MEMO:
                self.memo.pop(next(iter(self.memo)))
            self.memo[caption] = text_encode(self.tokenizer, self.text_encoder, caption, self.max_len).cpu().numpy()
            self.text_encoded += 1
        return self.memo[caption]

    def __call__(self, batch: dict) -> dict:
        import torch

        from cogpipe.data.stages import encoder_threads, first_frame_latents, vae_encode

        self.calls += 1
        self._maybe_fail()
        started = time.time()
        if "pixels" not in batch:  # no decoding tasks before this stage (a CPU cluster): decode here
            rows = [decode_row({k: batch[k][i] for k in batch}) for i in range(len(batch["key"]))]
            batch = {k: [r[k] for r in rows] for k in rows[0]}
        n = len(batch["key"])
        out = {k: [] for k in ("key", "uri", "caption", "bucket", "problem", "mean", "std", "latent_shape",
                               "prompt_embeds", "prompt_shape", "image_latents", "image_shape", "pid", "span",
                                 "texts")}
        groups: dict[tuple, list[int]] = {}
        for i in range(n):
            if not batch["problem"][i]:
                groups.setdefault(tuple(int(x) for x in batch["bucket"][i]), []).append(i)
        encoded: dict[int, dict] = {}
        with torch.no_grad(), encoder_threads(self.device):
            for (frames, height, width), members in groups.items():
                clips = [torch.from_numpy(_array(batch["pixels"][i], (frames, 3, height, width)).copy())
                         for i in members]
                for i, clip, tensors in zip(members, clips, vae_encode(self.vae, clips, self.cfg.data.encode_batch)):
                    if self.i2v:  # the clip's listed first-frame image where it has one, else its own first frame
                        listed = batch["image_pixels"][i]
                        image = torch.from_numpy(_array(listed, (3, height, width))) if len(listed) else clip[0]
                        tensors["image_latents"] = first_frame_latents(self.vae, image,
                                                                       self.cfg.data.image_noise_variants,
                                                                       batch["key"][i])
                    encoded[i] = {k: v.cpu().numpy() for k, v in tensors.items()}
                    encoded[i]["prompt_embeds"] = self._embeds(str(batch["caption"][i]))
        for i in range(n):
            for k in ("key", "uri", "caption", "problem"):
                out[k].append(str(batch[k][i]))
            out["bucket"].append([int(x) for x in batch["bucket"][i]])
            out["pid"].append(os.getpid())
            out["span"].append([started, time.time()])  # when this batch was decoded and encoded (wall clock)
            out["texts"].append(self.text_encoded)  # captions this actor has run T5 on so far
            e = encoded.get(i)
            out["mean"].append(e["mean"].tobytes() if e else b"")
            out["std"].append(e["std"].tobytes() if e else b"")
            out["latent_shape"].append(list(e["mean"].shape) if e else [])
            out["prompt_embeds"].append(e["prompt_embeds"].tobytes() if e else b"")
            out["prompt_shape"].append(list(e["prompt_embeds"].shape) if e else [])
            image = e.get("image_latents") if e else None
            out["image_latents"].append(image.tobytes() if image is not None else b"")
            out["image_shape"].append(list(image.shape) if image is not None else [])
        return out


class TextOnly:
    """A Ray Data actor for the extra prompts ("" and the validation prompts) training reads from the store."""

    def __init__(self, cfg):
        import torch

        from cogpipe import models
        from cogpipe.devices import encoder_dtype, inference_device

        self.device = inference_device()
        if self.device.type == "cpu":
            from cogpipe.data.stages import ENCODE_THREADS

            torch.set_num_threads(ENCODE_THREADS)
        transformer_config, _ = models.component_configs(cfg.model)
        self.max_len = transformer_config["max_text_seq_length"]
        self.tokenizer = models.build_tokenizer(cfg.model)
        self.text_encoder = models.build_text_encoder(cfg.model, encoder_dtype(self.device), self.device)
        self.text_encoder = self.text_encoder.to(self.device).eval()

    def __call__(self, row: dict) -> dict:
        import torch

        from cogpipe.data.stages import encoder_threads, text_encode

        with torch.no_grad(), encoder_threads(self.device):
            embeds = text_encode(self.tokenizer, self.text_encoder, row["caption"], self.max_len).cpu().numpy()
        return {"caption": row["caption"], "embeds": embeds.tobytes(), "shape": list(embeds.shape)}


def store_row(row: dict) -> dict:
    """An encoded row from the pipeline -> a StoreWriter row."""
    out = {"key": row["key"], "uri": row["uri"], "caption": row["caption"],
           "mean": _array(row["mean"], row["latent_shape"]), "std": _array(row["std"], row["latent_shape"]),
           "prompt_embeds": _array(row["prompt_embeds"], row["prompt_shape"])}
    if len(row["image_shape"]):
        out["image_latents"] = _array(row["image_latents"], row["image_shape"])
    return out


def extra_prompts(cfg) -> list[str]:
    """The prompts training reads besides the rows' (stages.extra_prompts), for the recipe's validation prompts."""
    from cogpipe.data.stages import extra_prompts as training_extras

    return training_extras(cfg, cfg.validation.prompts if cfg.validation.every else [])


KEYED = ("uri", "digest", "frames", "height", "width", "problem", "image_digest")  # what a row's key and bucket
# are chosen from (plan and the reading tasks choose them alike)
PROBED = ("size", "mtime", "digest", "frames", "fps", "height", "width", "bucket", "key", "problem", "image_size",
          "image_mtime", "image_digest")  # the index's probe columns: the rows to encode carry the manifest's other
# columns (uri, locator, caption, and for an image-to-video recipe image and image_locator)
IMAGE = ("image", "image_locator")  # a listed first-frame image: read to encode by an image-to-video recipe only
SORT = ("frames_b", "height_b", "width_b", "caption", "key")  # the encoding order: bucket, caption, key
SHOWN = 10  # rows skipped for their problem that the log names
BIG_ROWS = 1024  # rows in a block past which Ray keeps it in its object store whatever the rows hold (a row has its
# 64-character key and bucket, more than 100 bytes: Ray keeps a result under 100 KiB in the driver's own memory)
MAX_BLOCKS = 2048  # blocks at most: the driver keeps about 4.5 KB of Ray's bookkeeping for each until the encode ends


def block_rows(todo: int, batch: int, workers: int) -> int:
    """Rows in each block of the sorted rows to encode (a block is what an encoding actor takes at a time): at least
    one VAE batch; BIG_ROWS where there are enough rows for 4 blocks a worker, so that the rows' text stays in Ray's
    object store rather than in the driver (a set too small for that has under 4 x BIG_ROWS rows a worker in the
    driver); and no more than MAX_BLOCKS blocks."""
    return max(batch, min(BIG_ROWS, -(-todo // (4 * workers))), -(-todo // MAX_BLOCKS))


class RowGroups:
    """A manifest given as a list of rows, read as the Parquet manifest is (num_row_groups, read_row_group)."""

    def __init__(self, rows: list[dict]):
        import pyarrow as pa

        self.table = pa.Table.from_pylist(rows) if rows else None
        self.num_row_groups = -(-len(rows) // GROUP_ROWS)
        self.schema_arrow = self.table.schema if rows else None

    def read_row_group(self, group: int, columns=None):
        part = self.table.slice(group * GROUP_ROWS, GROUP_ROWS)
        return part.select(columns) if columns is not None else part


@contextmanager
def open_groups(manifest):
    """The manifest (its folder or URL, or a list of rows) as row groups; None where there is none."""
    from cogpipe.data.index import open_manifest

    if isinstance(manifest, list):
        yield RowGroups(manifest) if manifest else None
    else:
        with open_manifest(manifest) as pf:
            yield pf


def keyed(table, shapes, i2v: bool) -> list[dict]:
    """A manifest table's rows as dicts of the KEYED columns, each with the recipe's bucket and key, or its problem
    (index.assign_buckets, whatever bucket the index chose)."""
    from cogpipe.data.index import assign_buckets

    rows = table.select([c for c in KEYED if c in table.schema.names]).to_pylist()
    assign_buckets(rows, shapes, i2v)
    return rows


def read_group(item: dict):
    """A row group's rows to encode (a pyarrow table: key, bucket and its three sizes, and the manifest's columns
    but the probe's), the rows whose bit is set in the plan's `keep`. A Ray task: it reads the manifest itself, so no
    row's text passes through the driver; plan's sorted_rows calls it in process."""
    import pyarrow as pa

    with open_groups(item["manifest"]) as pf:
        names = pf.schema_arrow.names
        dropped = PROBED if item["i2v"] else PROBED + IMAGE
        table = pf.read_row_group(item["group"], columns=[c for c in names if c not in dropped or c in KEYED])
    changed = DataError(f"{item['manifest']}: the manifest changed while it was encoded (row group {item['group']} "
                        f"is not the one planned); run `cogpipe data encode` again")
    if table.num_rows != item["rows"]:
        raise changed
    bits = np.unpackbits(np.frombuffer(item["keep"], np.uint8), count=item["rows"])
    table = table.take(pa.array(np.flatnonzero(bits), pa.int64()))
    rows = keyed(table, item["shapes"], item["i2v"])
    if any(r["key"] is None for r in rows):  # a row the plan kept that now has a problem
        raise changed
    table = table.select([c for c in table.column_names if c not in dropped])
    table = table.add_column(0, "key", pa.array([r["key"] for r in rows], pa.string()))
    buckets = [r["bucket"] for r in rows]
    table = table.append_column("bucket", pa.array(buckets, pa.list_(pa.int64())))
    for i, name in enumerate(SORT[:3]):
        table = table.append_column(name, pa.array([b[i] for b in buckets], pa.int64()))
    return table


class Plan:
    """What `plan` found in a manifest: `items`, one for each row group that holds rows to encode (its index, its
    row count and a bit for each of its rows: read_group's input); `todo`: rows to encode; `present`: usable keys the
    store holds already; `problems`: rows skipped for their problem, `shown` the first SHOWN of them as (uri,
    problem); `rows`: rows in the manifest."""

    def __init__(self, items: list[dict], todo: int, present: int, problems: int, shown: list, rows: int):
        self.items, self.todo, self.present, self.problems, self.shown, self.rows = (items, todo, present, problems,
                                                                                      shown, rows)

    def __len__(self) -> int:
        return self.todo

    def sorted_rows(self) -> list[dict]:
        """The rows to encode, read and sorted in this process (the order encode's Ray sort gives them)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if not self.items:
            return []
        table = pa.concat_tables([read_group(item) for item in self.items])
        table = table.take(pc.sort_indices(table, [(c, "ascending") for c in SORT]))
        return table.drop_columns(list(SORT[:3])).to_pylist()


def _digests(keys) -> np.ndarray:
    """Keys -> 16-byte digests of them (blake2b), which plan sorts to find a key on several rows: a quarter of a
    sha256 key's 64 characters."""
    import hashlib

    return np.array([hashlib.blake2b(k.encode(), digest_size=16).digest() for k in keys], dtype="S16")


def plan(cfg, manifest, have) -> Plan:
    """Which rows of the manifest (its folder or URL, or a list of rows) to encode: not those with a problem, each
    key once (its first row), none the store holds (`have`: a KeySet, StoreWriter.existing_keys(), or any set of
    keys). Each clip gets the recipe's bucket and key (whatever bucket the index chose). The manifest is read a row
    group at a time and only the KEYED columns: the driver keeps a bit for each manifest row, and a 16-byte digest
    of each key to encode until keys on several rows are found (about 24 bytes a row), besides `have` (the KeySet:
    about 64 bytes a key the store holds). The rows' text (locators, captions) is read by the encoding tasks themselves
    (read_group), and sorted by Ray. For an image-to-video recipe, a clip's listed first-frame image is part of its
    key and is read to encode."""
    from cogpipe.data.folders import recipe_buckets
    from cogpipe.data.stages import recipe_i2v
    from cogpipe.data.store import KeySet, key_bytes

    shapes, i2v = [list(s) for s in recipe_buckets(cfg.data)], recipe_i2v(cfg)
    have = have if isinstance(have, KeySet) else KeySet(have)
    have.merge()
    hit = np.zeros(len(have), dtype=bool)  # the stored keys the manifest names (each counted once)
    keep, keys, where_new, offsets, problems, shown, rows = [], [], [], [], 0, [], 0
    with open_groups(manifest) as pf:
        for group in range(pf.num_row_groups if pf is not None else 0):
            table = pf.read_row_group(group, columns=[c for c in KEYED if c in pf.schema_arrow.names])
            probe = keyed(table, shapes, i2v)
            offsets.append(rows)
            usable = []
            for i, r in enumerate(probe):
                if r.get("problem"):
                    problems += 1
                    if len(shown) < SHOWN:
                        shown.append((r["uri"], r["problem"]))
                else:
                    usable.append(i)
            usable_keys = key_bytes(probe[i]["key"] for i in usable)
            found = have.find(usable_keys)
            hit[found[found >= 0]] = True
            bits = np.zeros(len(probe), dtype=bool)
            new = np.asarray(usable, dtype=np.int64)[found < 0]
            bits[new] = True
            keep.append(bits)
            keys.append(_digests(probe[i]["key"] for i in new))
            where_new.append(new + rows)
            rows += len(probe)
    keep = np.concatenate(keep) if keep else np.zeros(0, dtype=bool)
    if keys:  # a key on several rows: its first row is encoded
        keys, where_new = np.concatenate(keys), np.concatenate(where_new)
        by_key = np.argsort(keys, kind="stable")
        keys = keys[by_key]
        keep[where_new[by_key[1:][keys[1:] == keys[:-1]]]] = False
        del keys, where_new, by_key
    ends = offsets[1:] + [rows]
    location = manifest if isinstance(manifest, list) else str(manifest)
    items = [dict(manifest=location, group=g, rows=end - start, keep=np.packbits(keep[start:end]).tobytes(),
                  shapes=shapes, i2v=i2v) for g, (start, end) in enumerate(zip(offsets, ends)) if keep[start:end].any()]
    return Plan(items=items, todo=int(keep.sum()), present=int(hit.sum()), problems=problems, shown=shown,
                rows=rows)


def _read_items(batch):
    """Ray Data: a block of plan items (one row group each) -> that row group's rows to encode."""
    import pyarrow as pa

    return pa.concat_tables([read_group(item) for item in batch.to_pylist()])


def read_plan(planned: Plan):
    """The plan's rows to encode as a Ray dataset, unsorted: a task for each row group reads it from the manifest
    (on the driver's machine where the manifest is a local folder, anywhere where it is a URL)."""
    import ray

    from cogpipe.data.store import filesystem, is_local

    where = {}  # the driver's node: Ray labels every node with its id
    if is_local(filesystem(planned.items[0]["manifest"])[0]):
        where["label_selector"] = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}
    return ray.data.from_items(planned.items, override_num_blocks=len(planned.items)).map_batches(
        _read_items, batch_size=1, batch_format="pyarrow", **where)


def encode(cfg, manifest, out, *, workers: Optional[int] = None, storage_options: Optional[dict] = None,
           shard_rows: Optional[int] = None, log=print) -> dict:
    """Encode the usable clips of the manifest (its folder or URL) missing from the store at `out`; returns what was
    done (counts, seconds, the pids of the encoding actors)."""
    if isinstance(manifest, list):
        raise TypeError("encode reads a manifest folder or URL (cogpipe.data.index.write_manifest writes one)")
    import ray

    from cogpipe.data import raycluster, store
    raycluster.connect()
    gpus = raycluster.gpus()
    device = "cuda" if gpus else "cpu"
    identity = store.store_identity(cfg, device)
    kwargs = dict(max_rows=shard_rows) if shard_rows else {}
    writer = store.StoreWriter(out, identity, storage_options=storage_options, log=log, **kwargs)
    planned = plan(cfg, manifest, writer.existing_keys())
    if not planned.rows:
        raise DataError(f"{manifest}: no manifest here (run `cogpipe data index SOURCE --out {manifest}` first)")
    for uri, problem in planned.shown:
        log(f"  skipped {uri}: {problem}")
    if planned.problems > SHOWN:
        log(f"  ... and {planned.problems - SHOWN} more skipped (the manifest's problem column names each)")
    workers = workers or gpus or int(ray.cluster_resources().get("CPU", 1))
    todo, present, skipped = len(planned), planned.present, planned.problems
    log(f"encode: {todo} clips to encode, {present} in the store already, {skipped} skipped for their "
        f"problem; {workers} encoding worker(s) on {'GPU' if gpus else 'CPU'}")
    t0 = time.monotonic()
    added, failed, pids, arrived, busy, texts = 0, [], set(), [], [float("inf"), 0.0], {}
    published = len(writer.store.shards)
    if todo:
        size = cfg.data.encode_batch
        # rows come back in the plan's order whatever the worker count or speed, so the store's rows (and a training
        # order drawn over them) are the same on every encode of a manifest (a dataset keeps the context it is made in)
        context = ray.data.DataContext.get_current()
        ordered, context.execution_options.preserve_order = context.execution_options.preserve_order, True
        # read, sorted and cut into blocks by Ray before the encoding actors start (on a CPU cluster they hold every
        # core: reading and sorting tasks would wait for one forever); the sorted rows wait in Ray's object store
        ds = read_plan(planned).sort(list(SORT)).repartition(target_num_rows_per_block=block_rows(todo, size, workers))
        ds = ds.materialize()
        planned = None
        if gpus:  # decoding as CPU tasks beside the GPU actors; on a CPU cluster each actor decodes its own
            ds = ds.map(decode_row, num_cpus=1)  # batches (an actor holds its core: tasks beside it would wait)
        with warnings.catch_warnings():  # Ray 2.60 warns of passing actor options by keyword; it has no other way
            warnings.simplefilter("ignore", DeprecationWarning)
            ds = ds.map_batches(Encoder, batch_size=size, compute=ray.data.ActorPoolStrategy(size=workers),
                                num_cpus=1, num_gpus=1 if gpus else 0,
                                fn_constructor_kwargs=dict(cfg=cfg, fault=os.environ.get(FAULT_ENV)),
                                max_restarts=3, max_task_retries=3)  # a dead actor: restarted, its batch run again
        context.execution_options.preserve_order = ordered
        progress = Progress(todo, "encode")
        for row in ds.iter_rows():
            progress.update(1)
            arrived.append(time.monotonic() - t0)
            busy[:] = min(busy[0], row["span"][0]), max(busy[1], row["span"][1])
            texts[int(row["pid"])] = max(texts.get(int(row["pid"]), 0), int(row["texts"]))
            pids.add(int(row["pid"]))
            if row["problem"]:
                failed.append((row["uri"], row["problem"]))
                continue
            added += writer.add(row["bucket"], [store_row(row)])
            while published < len(writer.store.shards):
                published += 1
                atomic.failpoint(f"encode-published:{published}")
        progress.close()
    extras = [p for p in extra_prompts(cfg) if p not in set(store.read_prompts(writer.store))]
    if extras:
        encoded = ray.data.from_items([{"caption": p} for p in extras]).map(
            TextOnly, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1, num_gpus=1 if gpus else 0,
            fn_constructor_kwargs=dict(cfg=cfg)).take_all()
        writer.add_prompts({t["caption"]: _array(t["embeds"], t["shape"]) for t in encoded})
    writer.close()
    seconds = time.monotonic() - t0
    for uri, problem in failed:
        log(f"  failed {uri}: {problem}")
    log(f"encode {out}: {added} clips added in {seconds:.1f} s ({added / max(seconds, 1e-9):.2f} clips/s), "
        f"{len(writer.store.shards)} shards, {writer.store.rows} rows")
    return dict(added=added, present=present, skipped=skipped, failed=len(failed), seconds=seconds,
                workers=workers, pids=sorted(pids), rows=writer.store.rows, arrived=arrived,
                busy_seconds=max(0.0, busy[1] - busy[0]), text_encodes=sum(texts.values()))


def add_arguments(parser) -> None:
    from cogpipe.config import add_recipe_arguments

    add_recipe_arguments(parser)
    parser.add_argument("--manifest", required=True, help="the manifest folder `cogpipe data index` wrote")
    parser.add_argument("--out", required=True, help="the latent store: a folder or an fsspec URL (s3://...)")
    parser.add_argument("--address", help="a Ray cluster's address (`ray start --head` prints it); default: a "
                                          "local Ray on this machine's cores")
    parser.add_argument("--workers", type=int, help="encoding actors (default: the cluster's GPUs, else its CPUs)")
    parser.add_argument("--shard-rows", type=int, help="rows a shard holds at most (default: the store's)")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=JSON",
                        help="an fsspec storage option for the store, e.g. client_kwargs='{\"endpoint_url\": ...}'")


def run(args) -> int:
    from cogpipe.config import ConfigError, load_config
    from cogpipe.data import raycluster
    from cogpipe.data.store import StoreError, storage_options_from

    try:
        cfg = load_config(args.config, args.overrides)
        if args.address:
            raycluster.connect(args.address)
        result = encode(cfg, args.manifest, args.out, workers=args.workers, shard_rows=args.shard_rows,
                        storage_options=storage_options_from(args.storage_option))
    except (ConfigError, DataError, StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if result["failed"] else 0
