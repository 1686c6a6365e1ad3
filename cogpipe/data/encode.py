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
from cogpipe.data.index import Progress, assign_buckets, read_manifest
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
        if row.get("image_locator"):
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
    """The prompts training reads besides the rows': the validation prompts and "" (caption dropout, guidance)."""
    prompts = list(cfg.validation.prompts) if cfg.validation.every else []
    return prompts + ([""] if cfg.train.caption_dropout > 0 or prompts else [])


def plan(cfg, manifest: list[dict], have: set[str]) -> tuple[list[dict], list[dict], int]:
    """(the rows to encode, sorted by bucket, caption and key; the rows with a problem; how many keys the store
    holds already). Each clip gets the recipe's bucket and key (whatever bucket the index chose); for an
    image-to-video recipe, a clip's listed first-frame image is part of its key and is read to encode."""
    from cogpipe.data.folders import recipe_buckets
    from cogpipe.data.stages import recipe_i2v

    i2v = recipe_i2v(cfg)
    rows = [dict(r) for r in manifest]
    assign_buckets(rows, recipe_buckets(cfg.data), i2v)
    problems = [r for r in rows if r.get("problem")]
    todo, seen, present = [], set(), 0
    for r in rows:
        if r.get("problem") or r["key"] in seen:
            continue
        seen.add(r["key"])
        if r["key"] in have:
            present += 1
            continue
        image = i2v and bool(r.get("image_locator"))
        todo.append(dict(key=r["key"], uri=r["uri"], locator=r["locator"], caption=r["caption"],
                         bucket=list(r["bucket"]), image=r["image"] if image else "",
                         image_locator=r["image_locator"] if image else ""))
    todo.sort(key=lambda r: (r["bucket"], r["caption"], r["key"]))
    return todo, problems, present


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
    rows = read_manifest(manifest) if not isinstance(manifest, list) else manifest
    if not rows:
        raise DataError(f"{manifest}: no manifest here (run `cogpipe data index SOURCE --out {manifest}` first)")
    todo, problems, present = plan(cfg, rows, writer.existing_keys())
    for r in problems[:10]:
        log(f"  skipped {r['uri']}: {r['problem']}")
    if len(problems) > 10:
        log(f"  ... and {len(problems) - 10} more skipped (the manifest's problem column names each)")
    workers = workers or gpus or int(ray.cluster_resources().get("CPU", 1))
    log(f"encode: {len(todo)} clips to encode, {present} in the store already, {len(problems)} skipped for their "
        f"problem; {workers} encoding worker(s) on {'GPU' if gpus else 'CPU'}")
    t0 = time.monotonic()
    added, failed, pids, arrived, spans, texts = 0, [], set(), [], [], {}
    published = len(writer.store.shards)
    if todo:
        size = cfg.data.encode_batch
        blocks = max(workers, min(-(-len(todo) // size), 10_000))  # a block is about one VAE batch
        ds = ray.data.from_items(todo, override_num_blocks=min(blocks, len(todo)))
        if gpus:  # decoding as CPU tasks beside the GPU actors; on a CPU cluster each actor decodes its own
            ds = ds.map(decode_row, num_cpus=1)  # batches (an actor holds its core: tasks beside it would wait)
        with warnings.catch_warnings():  # Ray 2.60 warns of passing actor options by keyword; it has no other way
            warnings.simplefilter("ignore", DeprecationWarning)
            ds = ds.map_batches(Encoder, batch_size=size, compute=ray.data.ActorPoolStrategy(size=workers),
                                num_cpus=1, num_gpus=1 if gpus else 0,
                                fn_constructor_kwargs=dict(cfg=cfg, fault=os.environ.get(FAULT_ENV)),
                                max_restarts=3, max_task_retries=3)  # a dead actor: restarted, its batch run again
        progress = Progress(len(todo), "encode")
        for row in ds.iter_rows():
            progress.update(1)
            arrived.append(time.monotonic() - t0)
            spans.append(tuple(row["span"]))
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
    return dict(added=added, present=present, skipped=len(problems), failed=len(failed), seconds=seconds,
                workers=workers, pids=sorted(pids), rows=writer.store.rows, arrived=arrived,
                busy_seconds=(max(e for _, e in spans) - min(b for b, _ in spans)) if spans else 0.0,
                text_encodes=sum(texts.values()))


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
