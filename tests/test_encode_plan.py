"""`cogpipe data encode`'s plan without Ray: the rows to encode and their order are those of a plain Python plan over
the whole manifest (skip problems, each key once, skip stored keys, sort by bucket, caption and key) whether the
manifest comes as rows or as Parquet read a batch at a time; the store's keys held as a KeySet behave as a set."""

import hashlib

import numpy as np
import pytest

from cogpipe.config import load_config
from cogpipe.data import encode as encode_mod
from cogpipe.data import index as index_mod
from cogpipe.data import store
from cogpipe.data.folders import recipe_buckets

from helpers import NEEDS_DATA, REPO

pytestmark = NEEDS_DATA  # the extras these tests need: skipped, named, where missing

CAPTIONS = ["a red square", "a red square", "", "é accent", "e plain", "Zebra", "zebra", "日本語", "🙂 emoji",
            "a red square moving", "a red squar"]


def _cfg():
    return load_config(REPO / "configs" / "tiny_lora.yaml",
                       ["model.pretrained=null", "data.buckets=[[17,64,64],[9,64,64],[9,32,64]]"])


def _manifest(n: int) -> list[dict]:
    """Rows of several shapes (so several buckets), captions that sort differently by bytes and by case, some
    clips listed twice (same digest), some with a problem, some fitting no bucket."""
    rows = []
    for i in range(n):
        j = i % (n - 7)  # the last 7 rows list earlier clips again
        digest = hashlib.sha256(f"clip {j}".encode()).hexdigest()
        frames, height, width = [(17, 64, 64), (9, 64, 64), (13, 32, 64), (33, 64, 64), (5, 64, 64)][j % 5]
        row = dict(uri=f"clips/{i:04d}.mp4", locator=f'["file", "clips/{i:04d}.mp4"]', size=100 + i, mtime=1.5,
                   caption=CAPTIONS[i % len(CAPTIONS)], digest=digest, frames=frames, fps=8.0, height=height,
                   width=width, bucket=None, key=None, problem=None)
        if i % 13 == 5:
            row.update(problem="cannot decode video", digest=None, frames=None, height=None, width=None)
        rows.append(row)
    return rows


def _python_plan(cfg, manifest: list[dict], have: set):
    """The plan as it was: every row as a dict, a set of keys seen, a Python sort."""
    rows = [dict(r) for r in manifest]
    index_mod.assign_buckets(rows, recipe_buckets(cfg.data))
    problems = [r for r in rows if r.get("problem")]
    todo, seen, present = [], set(), 0
    for r in rows:
        if r.get("problem") or r["key"] in seen:
            continue
        seen.add(r["key"])
        if r["key"] in have:
            present += 1
            continue
        todo.append(dict(key=r["key"], uri=r["uri"], locator=r["locator"], caption=r["caption"],
                         bucket=list(r["bucket"])))
    todo.sort(key=lambda r: (r["bucket"], r["caption"], r["key"]))
    return todo, problems, present


@pytest.mark.parametrize("source", ["rows", "parquet"])
def test_plan_is_the_python_plan(source, tmp_path, monkeypatch):
    cfg = _cfg()
    manifest = _manifest(300)
    want_all = _python_plan(cfg, manifest, set())[0]
    stored = {r["key"] for r in want_all[::3]} | {"not-in-the-manifest"}
    want, problems, present = _python_plan(cfg, manifest, stored)
    assert len({r["bucket"][0] for r in want}) > 1 and len(problems) > 10 and present > 10
    monkeypatch.setattr(encode_mod, "GROUP_ROWS", 16)  # many row groups (a list of rows)
    monkeypatch.setattr(index_mod, "GROUP_ROWS", 16)  # (a manifest folder)
    if source == "parquet":
        index_mod.write_manifest(tmp_path / "m", manifest, {})
        manifest = tmp_path / "m"
    for have in (stored, store.KeySet(stored)):
        got = encode_mod.plan(cfg, manifest, have)
        assert got.sorted_rows() == want and len(got) == len(want)
        assert len(got.items) > 5 and all(len(item["keep"]) == 2 for item in got.items)  # a bit a row
        assert (got.present, got.problems, got.rows) == (present, len(problems), 300)
        assert got.shown == [(r["uri"], r["problem"]) for r in problems[:encode_mod.SHOWN]]
    none = encode_mod.plan(cfg, manifest, {r["key"] for r in want_all})
    assert len(none) == 0 and none.sorted_rows() == [] and none.items == [] and none.present == len(want_all)
    assert encode_mod.plan(cfg, tmp_path / "nothing", set()).rows == 0


def test_keyset_is_a_set_of_keys():
    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(50)] + ["short", "é", "日本", "x" * 80]
    ks = store.KeySet(keys[::2])
    assert all(k in ks for k in keys[::2]) and not any(k in ks for k in keys[1::2])
    assert "" not in ks and "x" * 81 not in ks and keys[0][:-1] not in ks
    ks.update(keys[1::2])
    assert all(k in ks for k in keys) and len(ks) == len(keys)
    ks.merge()
    assert all(k in ks for k in keys) and len(ks) == len(keys) and "absent" not in ks and ks == set(keys)
    found = ks.find(store.key_bytes(["absent", keys[3], "x" * 80, "x" * 90]))
    assert found[0] == -1 and found[3] == -1 and found[1] >= 0 and found[2] >= 0 and found[1] != found[2]
    big = store.KeySet()
    big.MERGE = 7
    for k in keys:
        big.add(k)
    assert all(k in big for k in keys) and len(big) == len(keys)
    assert list(store.KeySet().find(store.key_bytes(["a"]))) == [-1]


def test_key_bytes_from_arrow_and_python_agree():
    import pyarrow as pa

    same = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(10)]
    mixed = same + ["é", "short"]
    for keys in (same, mixed):
        want = np.array([k.encode() for k in keys], dtype=np.bytes_)
        assert (store.key_bytes(keys) == want).all()
        assert (store.key_bytes(pa.array(keys)) == want).all()
        assert (store.key_bytes(pa.array(keys).slice(2)) == want[2:]).all()
        assert (store.key_bytes(pa.chunked_array([keys[:4], keys[4:]])) == want).all()
    assert len(store.key_bytes([])) == 0 and len(store.key_bytes(pa.array([], pa.string()))) == 0


def test_existing_keys_reads_every_shard(tmp_path):
    import torch

    cfg = load_config(REPO / "configs" / "tiny_lora.yaml", ["model.pretrained=null"])
    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(20)] + ["a-longer-key-" * 8, "k"]
    row = dict(caption="c", mean=torch.zeros(2, 1, 2, 2), std=torch.ones(2, 1, 2, 2), prompt_embeds=torch.zeros(3, 4))
    with store.StoreWriter(tmp_path / "s", store.store_identity(cfg, torch.device("cpu")), max_rows=6) as w:
        w.add((1, 16, 16), [{**row, "key": k} for k in keys])
    w = store.StoreWriter(tmp_path / "s", store.store_identity(cfg, torch.device("cpu")))
    have = w.existing_keys()
    assert len(w.store.shards) == 4 and len(have) == len(keys) and all(k in have for k in keys)
    assert w.add((1, 16, 16), [{**row, "key": keys[0]}, {**row, "key": "new"}]) == 1 and "new" in have


def test_a_manifest_changed_after_planning_is_named_not_misread(tmp_path):
    """The reading tasks find the row groups the plan counted, or stop with an error naming the manifest."""
    from cogpipe.data.folders import DataError

    index_mod.write_manifest(tmp_path / "m", _manifest(100), {})
    planned = encode_mod.plan(_cfg(), tmp_path / "m", set())
    assert len(planned.sorted_rows()) == len(planned) > 0
    index_mod.write_manifest(tmp_path / "m", _manifest(120), {})  # re-indexed meanwhile: more rows
    with pytest.raises(DataError, match="manifest changed while it was encoded"):
        planned.sorted_rows()
