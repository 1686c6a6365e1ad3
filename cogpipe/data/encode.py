"""`cogpipe data encode --config RECIPE --manifest M --out STORE [--address ADDR]`: a manifest's clips encoded on Ray
Data into a latent store (cogpipe.data.store).

    manifest rows -> skip problems and keys already in the store -> sorted by (bucket, caption, key)
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
from pathlib import Path
from typing import Optional

import numpy as np

from cogpipe import atomic
from cogpipe.data.folders import DataError
from cogpipe.data.index import Progress, assign_buckets
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


PLAN_ROWS = 8192  # manifest rows planned at a time (one Parquet batch)
PROBED = ("size", "mtime", "digest", "frames", "fps", "height", "width", "bucket", "key", "problem", "image_size",
          "image_mtime", "image_digest")  # the index's probe columns: plan reads them; the rows to encode carry the
# manifest's other columns (uri, locator, caption, and for an image-to-video recipe image and image_locator)
IMAGE = ("image", "image_locator")  # a listed first-frame image: read to encode by an image-to-video recipe only
SHOWN = 10  # rows skipped for their problem that the log names


def manifest_batches(manifest):
    """The manifest's rows, PLAN_ROWS at a time (pyarrow record batches; without the key and bucket columns, which
    plan chooses again): read from its folder or URL a Parquet batch at a time, or from a list of rows."""
    import pyarrow as pa

    from cogpipe.data.index import manifest_batches as read_batches

    if not isinstance(manifest, list):
        yield from read_batches(manifest, PLAN_ROWS, skip=("key", "bucket"))
    elif manifest:
        table = pa.Table.from_pylist(manifest)
        yield from table.select([c for c in table.column_names if c not in ("key", "bucket")]).to_batches(PLAN_ROWS)


class SortedRows:
    """A plan's rows to encode as dicts, in encoding order, made 1024 at a time as they are read: a sequence for
    `ray.data.from_items` (which takes len and items in order), without every row as Python objects at once."""

    CHUNK = 1024

    def __init__(self, table, order):
        self.table, self.order, self._start, self._rows = table, order, -1, []

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = i + len(self) if i < 0 else i
        if not 0 <= i < len(self):
            raise IndexError(i)
        start = i - i % self.CHUNK
        if start != self._start:
            self._rows, self._start = self.table.take(self.order[start:start + self.CHUNK]).to_pylist(), start
        return self._rows[i - start]


class Plan:
    """What `plan` found in a manifest. `todo` (a pyarrow table: key, uri, locator, caption, bucket and any other
    column of the manifest but the probe's) holds the rows to encode, `order` the order they are encoded in;
    `present`: usable keys the store holds already; `problems`: rows skipped for their problem, `shown` the first
    SHOWN of them as (uri, problem); `rows`: rows in the manifest."""

    def __init__(self, todo, order: np.ndarray, present: int, problems: int, shown: list, rows: int):
        self.todo, self.order, self.present, self.problems, self.shown, self.rows = (todo, order, present, problems,
                                                                                      shown, rows)

    def __len__(self) -> int:
        return len(self.order)

    def sorted_rows(self) -> SortedRows:
        return SortedRows(self.todo, self.order)


def plan(cfg, manifest, have) -> Plan:
    """The manifest's rows (its folder or URL, or a list of rows) to encode, sorted by bucket, caption and key: not
    those with a problem, each key once, none the store holds (`have`: a KeySet, StoreWriter.existing_keys(), or any
    set of keys). Each clip gets the recipe's bucket and key (whatever bucket the index chose). The manifest is read
    PLAN_ROWS rows at a time, and only the rows to encode are kept (as Arrow columns), so the driver's memory grows
    with what is to do, not with the manifest: about 64 bytes a row the store holds (the KeySet). For an
    image-to-video recipe, a clip's listed first-frame image is part of its key and is read to encode."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from cogpipe.data.folders import recipe_buckets
    from cogpipe.data.stages import recipe_i2v
    from cogpipe.data.store import KeySet, key_bytes

    shapes, i2v = recipe_buckets(cfg.data), recipe_i2v(cfg)
    dropped = PROBED if i2v else PROBED + IMAGE
    have = have if isinstance(have, KeySet) else KeySet(have)
    have.merge()
    hit = np.zeros(len(have), dtype=bool)  # the stored keys the manifest names (each counted once)
    parts, keys, problems, shown, rows = [], [], 0, [], 0
    for batch in manifest_batches(manifest):
        rows += batch.num_rows
        probe = batch.select([c for c in ("uri", "digest", "frames", "height", "width", "problem", "image_digest")
                              if c in batch.schema.names]).to_pylist()
        assign_buckets(probe, shapes, i2v)
        usable = []
        for i, r in enumerate(probe):
            if r.get("problem"):
                problems += 1
                if len(shown) < SHOWN:
                    shown.append((r["uri"], r["problem"]))
            else:
                usable.append(i)
        usable_keys = key_bytes(probe[i]["key"] for i in usable)
        where = have.find(usable_keys)
        hit[where[where >= 0]] = True
        new = [usable[j] for j in np.flatnonzero(where < 0)]
        if new:
            part = batch.select([c for c in batch.schema.names if c not in dropped])
            part = pa.Table.from_batches([part]).take(new)
            part = part.add_column(0, "key", pa.array([probe[i]["key"] for i in new], pa.string()))
            part = part.append_column("bucket", pa.array([probe[i]["bucket"] for i in new], pa.list_(pa.int64())))
            parts.append(part)
            keys.append(usable_keys[where < 0])
    todo = pa.concat_tables(parts) if parts else pa.table({"key": pa.array([], pa.string())})
    order = np.arange(0)
    if todo.num_rows:
        keys = np.concatenate(keys)
        by_key = np.argsort(keys, kind="stable")  # a key twice: its first row is encoded
        keys = keys[by_key]
        again = np.zeros(len(keys), dtype=bool)
        again[by_key[1:][keys[1:] == keys[:-1]]] = True
        del keys, by_key
        buckets = todo.column("bucket")
        by = pa.table({"f": pc.list_element(buckets, 0), "h": pc.list_element(buckets, 1),
                       "w": pc.list_element(buckets, 2), "caption": todo.column("caption"), "key": todo.column("key")})
        order = pc.sort_indices(by, [(c, "ascending") for c in by.column_names]).to_numpy()
        order = order[~again[order]]
    return Plan(todo=todo, order=order, present=int(hit.sum()), problems=problems, shown=shown, rows=rows)


def encode(cfg, manifest, out, *, workers: Optional[int] = None, storage_options: Optional[dict] = None,
           shard_rows: Optional[int] = None, log=print) -> dict:
    """Encode the manifest's usable clips missing from the store at `out`; returns what was done (counts, seconds,
    the pids of the encoding actors)."""
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
        blocks = max(workers, min(-(-todo // size), 10_000))  # a block is about one VAE batch
        # rows come back in the plan's order whatever the worker count or speed, so the store's rows (and a training
        # order drawn over them) are the same on every encode of a manifest (a dataset keeps the context it is made in)
        context = ray.data.DataContext.get_current()
        ordered, context.execution_options.preserve_order = context.execution_options.preserve_order, True
        ds = ray.data.from_items(planned.sorted_rows(), override_num_blocks=min(blocks, todo))
        planned = None  # the rows are Ray's now (the object store)
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
