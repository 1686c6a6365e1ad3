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

from helpers import REPO, run_tiny

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
    r = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(REPO)})
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

def store_from_folder(cfg, url, **options):
    """A store holding the folder cache's examples of `cfg`'s clips, in the folder's order (as an encoder would)."""
    from cogpipe.data.cache import build_cache
    from cogpipe.data.checks import usable_samples

    samples = usable_samples(cfg, log=lambda *_: None, device=torch.device("cpu"))
    entries = build_cache(cfg, samples, torch.device("cpu"), log=lambda *_: None)
    with S.StoreWriter(url, S.store_identity(cfg, torch.device("cpu")), **options) as w:
        for sample, e in zip(samples, entries):
            latents = load_file(str(e.latents))
            w.add(sample.shape, [{"key": e.latents.stem, "caption": e.caption, "uri": str(sample.video),
                                  "prompt_embeds": load_file(str(e.prompt))["prompt_embeds"], **latents}])
    return S.open_store(url, options.get("storage_options"))


def weights(out, step=4):
    return load_file(str(out / "checkpoints" / f"checkpoint-{step:06d}" / checkpoint.TRAINABLE))


@pytest.fixture(scope="module")
def store(trained, tmp_path_factory):
    return store_from_folder(trained[1], tmp_path_factory.mktemp("store") / "s")


@pytest.fixture(scope="module")
def from_store(store, clips, trained, tmp_path_factory):
    """The `trained` run (4 steps, batch 2) again, from the store and no data.root (so no clip is read)."""
    base = tmp_path_factory.mktemp("from_store")
    out, _ = run_tiny(clips, base / "out", base / "cache", **{"data.store": store.url, "data.root": "null"})
    return out


def test_training_from_a_store_equals_the_folder(from_store, trained):
    """Rows in the folder's order, one window of shards: the same order, so the same weights, exactly."""
    a, b = weights(trained[0]), weights(from_store)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((from_store / "checkpoints" / "checkpoint-000004" / checkpoint.STATE).read_text())
    assert state["data"]["epoch"] * 1 + state["data"]["position"] >= 0 and "store_digest" in state["data"]
    assert not (from_store.parent / "cache").exists()  # nothing encoded, no clip cache made


def test_killed_and_resumed_from_a_store_with_loader_workers(from_store, store, clips, tmp_path):
    """Killed by SIGKILL after step 3 (checkpoint at 2), resumed with 2 DataLoader workers: the unkilled run's
    weights, bit for bit, with 0 workers or 2."""
    overrides = {"data.store": store.url, "data.root": "null", "data.num_workers": 2}
    env = {**os.environ, "COGPIPE_FAILPOINT": "train-step:3", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", "import sys; sys.path.insert(0, 'tests'); from helpers import run_tiny; "
           f"run_tiny({str(clips)!r}, {str(tmp_path / 'out')!r}, {str(tmp_path / 'cache')!r}, **{overrides!r})"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert (tmp_path / "out" / "checkpoints" / "latest").read_text() == "checkpoint-000002"
    run_tiny(clips, tmp_path / "out", tmp_path / "cache", **overrides, **{"train.resume_from": "latest"})
    a, b = weights(from_store), weights(tmp_path / "out")
    assert all(torch.equal(a[k], b[k]) for k in a)
