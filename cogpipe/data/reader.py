"""Training from a latent store (`data.store: DIR_OR_URL`): the data order, the examples, a machine's shard cache.

Start-up reads the store's index.json only: no clip is probed and no file is listed per clip; the order of an epoch
is computed from the shards' row counts and buckets. Each example is then read when its micro-step comes.

The order (StorePlan) keeps today's rules (cogpipe.data.batches): a batch never mixes buckets; the global batch of
train.batch_size x data-parallel processes is cut from one bucket and data-parallel rank r takes every world-th
example of it, so it is the same for any number of processes; the ranks of a sequence-parallel group share one
data-parallel rank and so one sample. An epoch's order is a function of (train.seed, epoch) alone, and a micro-step's
examples of (seed, micro-step): the reader's cursor is (epoch, position) = divmod(micro-step, batches per epoch),
recorded in every checkpoint, and a resumed run starts at its cursor without reading the examples before it.

Shuffling streams: the shards are permuted by (seed, epoch) and taken SHUFFLE_SHARDS at a time (a window); the rows
of a window are permuted together and cut into global batches, bucket by bucket, a bucket's rows left over carried
into the next window. So at most a window of shards is being read at any time, while every row of the store can
follow any other. A store of one window (SHUFFLE_SHARDS shards or fewer) gives exactly batches.epoch_batches's order
over its rows: a store written from a folder's cache, in the folder's order, trains to the same weights.

Every shard is checked against the index's sha256 before anything is read from it (a StoreError names the shard and
both checksums). A store behind a URL (s3://, gs://, ...) is read through a bounded cache folder on each machine
(ShardCache: whole shards, by content, least recently used evicted past data.store_cache_bytes).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import torch

from cogpipe.data.store import Shard, Store, StoreError, check_bytes, check_digest, decode_row, is_local, sha256_stream

SHUFFLE_SHARDS = 8  # shards whose rows are shuffled together (and read at once)
ROW_GROUPS_KEPT = 4  # decoded row groups a process keeps (a window's rows are read in random order)


# ---- the order -------------------------------------------------------------------------------------------------

def store_epoch(shards: list[Shard], batch_size: int, seed: int, epoch: int, rank: int, world: int,
                window: int = SHUFFLE_SHARDS) -> torch.Tensor:
    """This rank's batches of one epoch as a tensor [batches, batch_size] of row numbers (rows numbered through the
    shards in index order)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    size = batch_size * world
    starts = torch.tensor([0] + [s.rows for s in shards]).cumsum(0).tolist()
    order = torch.randperm(len(shards), generator=g).tolist() if len(shards) > window else list(range(len(shards)))
    carry: dict[tuple, torch.Tensor] = {}
    out = []
    for w in range(0, len(order), window):
        members: dict[tuple, list] = {}
        for i in order[w:w + window]:
            members.setdefault(shards[i].bucket, []).append(torch.arange(starts[i], starts[i + 1]))
        chunks = []  # [global batches, size] a bucket
        for bucket in sorted(set(members) | set(carry)):
            rows = torch.cat([carry.get(bucket, torch.zeros(0, dtype=torch.long))] + members.get(bucket, []))
            rows = rows[torch.randperm(len(rows), generator=g)]
            full = len(rows) // size * size
            chunks.append(rows[:full].reshape(-1, size))
            carry[bucket] = rows[full:]
        chunks = torch.cat(chunks) if chunks else torch.zeros(0, size, dtype=torch.long)
        out.append(chunks[torch.randperm(len(chunks), generator=g)][:, rank::world])
    return torch.cat(out) if out else torch.zeros(0, batch_size, dtype=torch.long)


class StorePlan:
    """The data order as micro-step -> row numbers (as batches.EpochPlan for a folder), each epoch computed once."""

    def __init__(self, store: Store, batch_size: int, seed: int, rank: int, world: int,
                 window: int = SHUFFLE_SHARDS):
        self.store, self.batch_size, self.seed, self.rank, self.world = store, batch_size, seed, rank, world
        self.window = window
        self._epoch, self._batches = 0, self._order(0)
        self.per_epoch = len(self._batches)  # the same every epoch: buckets keep their sizes

    def _order(self, epoch: int) -> torch.Tensor:
        return store_epoch(self.store.shards, self.batch_size, self.seed, epoch, self.rank, self.world, self.window)

    def cursor(self, micro_step: int) -> dict:
        """Where the reader stands before `micro_step`: recorded in a checkpoint, checked on resume."""
        epoch, position = divmod(micro_step, self.per_epoch)
        return {"store": self.store.url, "store_digest": self.store.digest, "epoch": epoch, "position": position}

    def check_cursor(self, saved: Optional[dict], micro_step: int) -> None:
        """A resumed run reads on from its checkpoint's cursor; a store that changed since is refused (the order,
        and so the examples still to come, would not be those of the run that was stopped)."""
        if saved is None:
            return
        if saved.get("store_digest") != self.store.digest:
            raise StoreError(f"data.store {self.store.url}: the store changed since the checkpoint was written "
                             f"(its shards are not those the checkpoint's data order was made from): resume with "
                             f"the store as it was, or start a new run")
        here = self.cursor(micro_step)
        if (saved["epoch"], saved["position"]) != (here["epoch"], here["position"]):
            raise StoreError(f"data.store {self.store.url}: the checkpoint's reader cursor (epoch {saved['epoch']}, "
                             f"position {saved['position']}) is not micro-step {micro_step}'s")

    def indices(self, micro_step: int) -> list[int]:
        epoch, position = divmod(micro_step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._order(epoch)
        return self._batches[position].tolist()


# ---- a machine's cache of a remote store's shards ---------------------------------------------------------------

class ShardCache:
    """Whole shards of remote stores in a local folder, named by content (sha256), so any number of processes and
    stores share it safely. A shard is downloaded under a temporary name, checked, then renamed; past `max_bytes`
    the least recently used shards are removed (a process reading one keeps its open file)."""

    def __init__(self, root, max_bytes: int):
        self.root, self.max_bytes = Path(root).expanduser(), int(max_bytes)

    def path(self, store: Store, shard: Shard) -> Path:
        local = self.root / f"{shard.sha256}.parquet"
        if local.exists():
            os.utime(local)  # used now: last to be evicted
            return local
        self.root.mkdir(parents=True, exist_ok=True)
        fs, root = store.fs()
        tmp = self.root / f".{shard.sha256}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            fs.get_file(f"{root}/{shard.path}", str(tmp))
            with open(tmp, "rb") as f:
                check_digest(store, shard, *sha256_stream(f), f" (downloaded from {root}/{shard.path})")
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)
        self.evict(keep=local)
        return local

    def evict(self, keep: Path) -> list[Path]:
        """Remove the least recently used shards until the cache fits its limit (`keep` stays)."""
        files = []
        for p in self.root.glob("*.parquet"):
            try:  # another process of this machine may be evicting too
                st = p.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in files)
        removed = []
        for _, size, p in sorted(files):
            if total <= self.max_bytes:
                break
            if p != keep:
                total -= size
                p.unlink(missing_ok=True)
                removed.append(p)
        return removed


def default_cache_dir(url: str) -> Path:
    return Path("~/.cache/cogpipe/store").expanduser() / hashlib.sha256(url.encode()).hexdigest()[:16]


# ---- the examples ----------------------------------------------------------------------------------------------

class StoreDataset(torch.utils.data.Dataset):
    """Row number -> the training example {"mean", "std", "prompt_embeds"[, "image_latents"]} (as CachedDataset).

    Files open lazily in the process that reads (the training process or a DataLoader worker), each shard checked
    against its sha256 the first time the process opens it; the last ROW_GROUPS_KEPT decoded row groups are kept."""

    def __init__(self, store: Store, cache: Optional[ShardCache] = None):
        self.store, self.cache = store, cache
        self.starts = torch.tensor([0] + [s.rows for s in store.shards]).cumsum(0)
        self._pid, self._files, self._groups = None, {}, OrderedDict()

    def __len__(self):
        return int(self.starts[-1])

    def _local(self, shard: Shard) -> str:
        fs, root = self.store.fs()
        if is_local(fs):
            return f"{root}/{shard.path}"
        if self.cache is None:
            raise StoreError(f"data.store {self.store.url}: a remote store needs a local shard cache")
        return str(self.cache.path(self.store, shard))

    def _file(self, i: int):
        """Shard i's ParquetFile and the first row of each of its row groups, opened and checked once a process."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._pid != os.getpid():  # a forked DataLoader worker opens its own files
            self._pid, self._files, self._groups = os.getpid(), {}, OrderedDict()
        if i not in self._files:
            shard = self.store.shards[i]
            for attempt in range(2):  # a cached copy may be evicted by another process between fetch and open
                path = self._local(shard)
                try:
                    source = pa.memory_map(path)
                    break
                except FileNotFoundError:
                    if self.cache is None or attempt:
                        raise StoreError(f"data.store {self.store.url}: shard {shard.path} is listed in the index "
                                         f"but missing ({path})") from None
            check_bytes(self.store, shard, source.read_buffer())
            source.seek(0)
            pf = pq.ParquetFile(source)
            firsts = [0]
            for g in range(pf.metadata.num_row_groups):
                firsts.append(firsts[-1] + pf.metadata.row_group(g).num_rows)
            if len(self._files) >= 2 * SHUFFLE_SHARDS:  # a window's shards stay open; older ones close
                self._files.pop(next(iter(self._files)))
            self._files[i] = (pf, torch.tensor(firsts))
        return self._files[i]

    def __getitem__(self, row: int):
        i = int(torch.searchsorted(self.starts, torch.tensor(row), right=True)) - 1
        shard = self.store.shards[i]
        pf, firsts = self._file(i)
        r = row - int(self.starts[i])
        g = int(torch.searchsorted(firsts, torch.tensor(r), right=True)) - 1
        if (i, g) not in self._groups:
            if len(self._groups) >= ROW_GROUPS_KEPT:
                self._groups.popitem(last=False)
            self._groups[(i, g)] = pf.read_row_group(g)
        self._groups.move_to_end((i, g))
        table = self._groups[(i, g)]
        k = r - int(firsts[g])
        values = {name: table.column(name)[k].as_py() for name in shard.tensors}
        return decode_row(values, shard.tensors)



# ---- training's start-up ---------------------------------------------------------------------------------------

def check_store(cfg, device) -> Store:
    """The recipe's data.store from its index, refused (StoreError) unless its encoders are the recipe's model's
    and its buckets among the recipe's."""
    from cogpipe.data.folders import recipe_buckets
    from cogpipe.data.store import identity_mismatch, open_store, store_identity

    url = cfg.data.store
    store = open_store(url, cfg.data.store_options)
    differs = identity_mismatch(store.identity, store_identity(cfg, device))
    if differs:
        raise StoreError(f"data.store {url}: encoded by other encoders than this recipe's model: "
                         f"{'; '.join(differs)} (encode the clips again for this model)")
    wanted = set(recipe_buckets(cfg.data))
    unknown = [b for b in store.buckets if b not in wanted]
    if unknown:
        raise StoreError(f"data.store {url}: buckets {[list(b) for b in unknown]} are not the recipe's "
                         f"({sorted(list(b) for b in wanted)}: data.frames/height/width or data.buckets)")
    return store


def training_data(cfg, dp_rank: int, dp_world: int, device, extra_prompts, rank: int = 0, world: int = 1,
                  barrier=lambda: None, log=print):
    """(dataset, plan, extra prompt embeddings) of a recipe with data.store, from the store's index: its encoders
    must be the recipe's, its buckets among the recipe's; extra prompts ("" and validation prompts) come from the
    store's prompt table, those missing encoded here once (the folder cache's code, cogpipe.data.cache)."""
    from cogpipe.data.cache import build_cache, load_prompt_embeds
    from cogpipe.data.store import read_prompts

    url = cfg.data.store
    store = check_store(cfg, device)
    prompts = read_prompts(store)
    missing = [t for t in dict.fromkeys(extra_prompts) if t not in prompts]
    if missing:
        log(f"data.store {url}: encoding {len(missing)} prompt(s) the store does not hold: {missing[:3]}")
        build_cache(cfg, [], device, rank, world, barrier, log, missing)
        prompts.update(load_prompt_embeds(cfg, missing, device))
    fs, _ = store.fs()
    cache = None if is_local(fs) else ShardCache(cfg.data.store_cache_dir or default_cache_dir(url),
                                                 cfg.data.store_cache_bytes)
    plan = StorePlan(store, cfg.train.batch_size, cfg.train.seed, dp_rank, dp_world)
    log(f"data.store {url}: {store.rows} rows in {len(store.shards)} shards, buckets "
        f"{[list(b) for b in store.buckets]}, {plan.per_epoch} batches an epoch"
        + (f", shard cache {cache.root}" if cache else ""))
    return StoreDataset(store, cache), plan, {t: prompts[t] for t in extra_prompts}
