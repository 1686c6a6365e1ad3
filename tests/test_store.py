"""The latent store (cogpipe/data/store.py) and training from it (cogpipe/data/reader.py): shards published whole,
a killed writer resumed with every key once, checksums that name a damaged shard, the data order, and training from
a store to the same weights as from the folder, killed and resumed exactly."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from cogpipe import checkpoint
from cogpipe.data import store as S
from cogpipe.data.batches import epoch_batches
from cogpipe.data.reader import StoreDataset, store_epoch

from helpers import NEEDS_DATA, REPO, child_env, run_tiny, store_from_folder

pytestmark = NEEDS_DATA  # the extras these tests need: skipped, named, where missing

IDENTITY = {"vae": "v", "text_encoder": "t"}


def rows(n, bucket=0, start=0):
    """n rows of tiny tensors whose mean holds the row's number (to tell them apart when read back)."""
    return [{"key": f"b{bucket}-{start + i}", "caption": f"clip {start + i}", "uri": f"file:///clip{start + i}.mp4",
             "mean": torch.full((4, 3, 2, 2), float(start + i)), "std": torch.rand(4, 3, 2, 2),
             "prompt_embeds": torch.randn(5, 8)} for i in range(n)]


def write(url, n_by_bucket: dict, max_rows=3, **kw):
    with S.StoreWriter(url, IDENTITY, max_rows=max_rows, **kw) as w:
        for bucket, n in n_by_bucket.items():
            w.add(bucket, rows(n, bucket[0]))
    return S.open_store(url)


def test_write_read_round_trip(tmp_path):
    store = write(tmp_path / "s", {(9, 16, 16): 7, (5, 16, 16): 2})
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert index["rows"] == 9 and index["buckets"] == [[5, 16, 16], [9, 16, 16]]
    assert sorted(s.rows for s in store.shards) == [1, 2, 3, 3]  # bounded shards (max_rows 3), one bucket each
    for s in store.shards:
        assert s.path.startswith(f"shards/{'x'.join(map(str, s.bucket))}/") and s.path.endswith(".parquet")
    import pyarrow.parquet as pq  # a shard opens as it is, and says its tensors' shapes

    table = pq.read_table(tmp_path / "s" / store.shards[0].path)
    spec = json.loads(table.schema.metadata[b"cogpipe.tensors"])
    assert spec["latents"] == {"shape": [2, 4, 3, 2, 2], "dtype": "float32"}
    ds = StoreDataset(store)
    got = sorted(float(ds[r]["mean"][0, 0, 0, 0]) for r in range(len(ds)))
    assert got == sorted([float(i) for i in range(7)] + [0.0, 1.0])
    example = ds[0]
    assert set(example) == {"mean", "std", "prompt_embeds"} and example["prompt_embeds"].shape == (5, 8)
    with pytest.raises(S.StoreError, match="other encoders.*vae"):  # one encoder a store
        S.StoreWriter(tmp_path / "s", {**IDENTITY, "vae": "another"})


def test_writer_killed_then_resumed_has_every_key_once(tmp_path):
    """A writer SIGKILLed between writing a shard and listing it: the shard does not exist for readers, the next
    writer sweeps it, and the keys it held are written again; every key once."""
    url = tmp_path / "s"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from test_store import IDENTITY, rows
        from cogpipe.data import store as S
        w = S.StoreWriter({str(url)!r}, IDENTITY, max_rows=2)
        w.add((9, 16, 16), rows(4))          # two shards published
        w.write_shard((9, 16, 16), rows(2, start=4))   # written, not yet listed
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([sys.executable, "-c", script], env=child_env())
    assert r.returncode == -signal.SIGKILL
    assert len(list((url / "shards" / "9x16x16").glob("*.parquet"))) == 3
    assert S.open_store(url).rows == 4
    removed = []
    w = S.StoreWriter(url, IDENTITY, max_rows=2, log=removed.append)
    assert len(removed) == 1 and "killed writer" in removed[0]
    assert w.existing_keys() == {f"b0-{i}" for i in range(4)}
    assert w.add((9, 16, 16), rows(6)) == 2  # only the two that were never published
    w.close()
    store = S.open_store(url)
    keys = [k for s in store.shards for k in _keys(url / s.path)]
    assert sorted(keys) == sorted(f"b0-{i}" for i in range(6)) and S.verify(url) == []
    # a shard written elsewhere (a Ray task) holding a stored key is refused, the index left as it was
    w = S.StoreWriter(url, IDENTITY)
    again = w.write_shard((9, 16, 16), rows(1, start=5))
    with pytest.raises(S.StoreError, match=f"{again.path}.*'b0-5'.*not published"):
        w.publish([again])
    assert S.open_store(url).rows == 6


def _keys(path):
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["key"]).column("key").to_pylist()


def test_damaged_shard_is_named_by_verify_and_the_reader(tmp_path, capsys):
    store = write(tmp_path / "s", {(9, 16, 16): 6})
    bad = store.shards[1]
    path = tmp_path / "s" / bad.path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    problems = S.verify(tmp_path / "s")
    assert len(problems) == 1 and bad.path in problems[0] and bad.sha256 in problems[0]
    assert S.sha256_bytes(bytes(data)) in problems[0]  # the actual checksum, beside the expected one
    args = type("Args", (), {"store": str(tmp_path / "s"), "storage_option": []})
    assert S.run(args) == 1 and bad.path in capsys.readouterr().out
    ds = StoreDataset(store)
    assert ds[0]["mean"].shape == (4, 3, 2, 2)  # the sound shard reads
    with pytest.raises(S.StoreError, match=f"{bad.path}.*damaged.*{bad.sha256}"):
        ds[3]


def test_store_order_keeps_buckets_and_splits_global_batches():
    shards = [S.Shard(f"s{i}", b, n, 0, "", "") for i, (b, n) in enumerate(
        [((9, 8, 8), 5), ((5, 8, 8), 4), ((9, 8, 8), 3), ((5, 8, 8), 6), ((9, 8, 8), 2)])]
    bucket_of = [s.bucket for s in shards for _ in range(s.rows)]
    # one window: exactly the folder's order over the same rows
    for epoch in range(2):
        assert store_epoch(shards, 2, 7, epoch, 0, 1).tolist() == epoch_batches(bucket_of, 2, 7, epoch, 0, 1)
    # windows of 2 shards: rows carried between windows, so an epoch loses only each bucket's last remainder
    one = store_epoch(shards, 2, 7, 0, 0, 1, window=2)
    ranks = [store_epoch(shards, 1, 7, 0, r, 2, window=2) for r in range(2)]
    assert len(one) == 10 // 2 + 10 // 2
    assert torch.equal(torch.stack(ranks, 1).reshape(-1, 2), one)  # rank r takes every 2nd example of a batch
    for batch in one.tolist():
        assert len({bucket_of[i] for i in batch}) == 1
    assert len(set(one.flatten().tolist())) == one.numel()
    assert store_epoch(shards, 2, 7, 1, 0, 1, window=2).tolist() != one.tolist()


# ---- training from a store --------------------------------------------------------------------------------------

def weights(out, step=4):
    return load_file(str(out / "checkpoints" / f"checkpoint-{step:06d}" / checkpoint.TRAINABLE))


@pytest.fixture(scope="module")
def store(trained, tmp_path_factory):
    return store_from_folder(trained[1], tmp_path_factory.mktemp("store") / "s")


def test_a_recipe_checks_the_store_it_trains_on(store, trained, capsys):
    """`cogpipe check` of a recipe with data.store reads the index and checks the store against the recipe: its
    encoders must be the model's (another VAE/T5 seed is named), its buckets among the recipe's."""
    from cogpipe.data.checks import run

    def check(*overrides):
        args = type("Args", (), {"config": str(REPO / "configs" / "tiny_lora.yaml"), "overrides": [
            "model.pretrained=null", "output_dir=unused", "data.root=null", f"data.store={store.url}", *overrides]})
        code = run(args)
        return code, capsys.readouterr().out

    code, out = check()
    assert code == 0 and f"{store.rows} rows in 1 shards, buckets 17x64x64" in out
    code, out = check("model.init_seed=1")  # the preset's weights, so its VAE and T5, differ
    assert code == 2 and "other encoders" in out and "vae: store" in out and "text_encoder: store" in out
    code, out = check("data.frames=9")
    assert code == 2 and "buckets [[17, 64, 64]] are not the recipe's" in out


@pytest.mark.slow
def test_store_run_killed_and_resumed_equals_the_folder_run(store, clips, trained, tmp_path):
    """The `trained` run (4 steps, batch 2, from the folder, no DataLoader workers) again from the store with no
    data.root (no clip read) and 2 DataLoader workers, killed by SIGKILL after step 3 and resumed from its step-2
    checkpoint: the rows are in the folder's order and the store is one window of shards, so the order is the
    folder's, and the weights equal the uninterrupted folder run's exactly."""
    overrides = {"data.store": store.url, "data.root": "null", "data.num_workers": 2}
    env = child_env(COGPIPE_FAILPOINT="train-step:3")
    cmd = [sys.executable, "-c", "import sys; sys.path.insert(0, 'tests'); from helpers import run_tiny; "
           f"run_tiny({str(clips)!r}, {str(tmp_path / 'out')!r}, {str(tmp_path / 'cache')!r}, **{overrides!r})"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    ckpt = tmp_path / "out" / "checkpoints"
    assert (ckpt / "latest").read_text() == "checkpoint-000002"
    # 2 micro-steps of 2 clips from 4 clips: 2 batches an epoch, so the cursor stands at the start of epoch 1
    state = json.loads((ckpt / "checkpoint-000002" / checkpoint.STATE).read_text())
    assert state["data"] == {"store": store.url, "store_digest": store.digest, "epoch": 1, "position": 0}
    run_tiny(clips, tmp_path / "out", tmp_path / "cache", **overrides, **{"train.resume_from": "latest"})
    a, b = weights(trained[0]), weights(tmp_path / "out")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "cache").exists()  # nothing encoded: no clip cache made


def test_shard_cache_is_bounded_and_checks_downloads(tmp_path):
    """A remote store (fsspec's memory:// here) is read through the machine's cache: whole shards by content, the
    least recently used evicted past the size limit, a damaged download named and not kept."""
    import fsspec

    from cogpipe.data.reader import ShardCache

    store = write("memory://cache-test/s", {(9, 16, 16): 9})
    limit = sum(s.bytes for s in store.shards[:2])
    cache = ShardCache(tmp_path / "cache", limit)
    ds = StoreDataset(store, cache)
    assert [float(ds[r]["mean"][0, 0, 0, 0]) for r in range(9)] == [float(i) for i in range(9)]
    kept = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert kept == sorted(f"{s.sha256}.parquet" for s in store.shards[1:])  # the first, least recent, evicted
    fs = fsspec.filesystem("memory")
    path = f"/cache-test/s/{store.shards[0].path}"
    fs.pipe_file(path, fs.cat_file(path)[:-1] + b"!")
    with pytest.raises(S.StoreError, match=f"{store.shards[0].path}.*damaged"):
        cache.path(store, store.shards[0])
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == kept  # nothing of it kept


# ---- two machines, one store on an S3 server ---------------------------------------------------------------------

BUCKET = "cogpipe-store"


@pytest.fixture(scope="module")
def s3(store, trained):
    """An S3 server on 127.0.0.1 (moto's server mode: the real S3 API) holding the store, written there by
    StoreWriter through s3fs. Yields (url, storage options, env with dummy credentials)."""
    from moto.server import ThreadedMotoServer

    from helpers import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    options = {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
    try:
        import s3fs

        s3fs.S3FileSystem(**options).mkdir(BUCKET)
        remote = store_from_folder(trained[1], f"s3://{BUCKET}/s", storage_options=options)
        assert remote.digest == store.digest  # the same shards, byte for byte, as the local store
        yield remote.url, options, env
    finally:
        server.stop()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def two_machines(s3, out, caches, **extra):
    """Two `accelerate launch --num_machines 2` processes on this host (machine ranks 0 and 1, one CPU process
    each), each with its own shard cache, reading the store from the S3 server; batch 1 each."""
    from helpers import CPU_SWITCH, free_port, tiny_overrides

    url, options, env = s3
    port = free_port()
    procs = []
    for rank, cache in enumerate(caches):
        overrides = {"train.batch_size": 1, "data.root": "null", "data.store": url,
                     "data.store_options": json.dumps(options), "data.store_cache_dir": str(cache), **extra}
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2", "--num_machines", "2",
               "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
               str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny_lora.yaml"),
               *tiny_overrides("null", out, out.parent / "prompt-cache", **overrides)]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **env, **CPU_SWITCH["ddp"],
                                                          "OMP_NUM_THREADS": "1"},
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"machine {rank}:\n{log[-3000:]}"
    return logs


@pytest.fixture(scope="module")
def machines(s3, tmp_path_factory):
    base = tmp_path_factory.mktemp("machines")
    caches = [base / "machine0-cache", base / "machine1-cache"]
    logs = two_machines(s3, base / "out", caches)
    return base / "out", caches, logs


@pytest.mark.slow
def test_two_machines_from_s3_match_one_machine(machines, trained, store):
    out, caches, logs = machines
    one, both = weights(trained[0]), weights(out)  # 1 process with batch 2; 2 machines with batch 1 each
    assert set(one) == set(both)
    for k in one:  # the gradients are averaged across machines: the same sums in another order
        torch.testing.assert_close(both[k], one[k], rtol=1e-5, atol=1e-6)
    for cache in caches:  # each machine fetched the shard into its own cache, checked
        assert sorted(p.name for p in cache.iterdir()) == [f"{s.sha256}.parquet" for s in store.shards]
    assert "shard cache" in logs[0]


@pytest.mark.slow
def test_two_machines_resumed_with_loader_workers_equal_the_unkilled_run(machines, s3, tmp_path):
    """Two machines stopped after their step-2 checkpoint (the state a kill leaves), resumed on fresh caches with 2
    DataLoader workers each: the uninterrupted run's weights, bit for bit."""
    import shutil

    out, _, _ = machines
    part = tmp_path / "out"
    shutil.copytree(out / "checkpoints" / "checkpoint-000002", part / "checkpoints" / "checkpoint-000002")
    (part / "checkpoints" / "latest").write_text("checkpoint-000002")
    logs = two_machines(s3, part, [tmp_path / "c0", tmp_path / "c1"],
                        **{"train.resume_from": "latest", "data.num_workers": 2})
    assert "resumed from" in logs[0]
    a, b = weights(out), weights(part)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
