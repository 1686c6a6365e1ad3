"""`cogpipe data encode` on a Ray cluster of two nodes on this machine (ray.cluster_utils.Cluster: two raylets): the
driver's head node with 1 CPU, and a node with 4 CPUs and 2 logical GPUs, so encode takes its GPU path (decoding as
CPU tasks beside an actor pool of one GPU an actor). Torch finds no CUDA in the actors, so the encoders run on the
CPU: what runs is Ray's scheduling and the data flow of that path, not a GPU. Run as a script by
tests/test_data_ray.py; prints one JSON line:

    python tests/ray_cluster.py RECIPE MANIFEST_DIR STORE SCRATCH OVERRIDE...

`result`: encode's result for MANIFEST_DIR into STORE. `driver`: the driver's node id; `local`: the nodes that ran
encode's reading tasks (encode.read_plan) for a manifest folder of 30 row groups (written under SCRATCH from the
manifest's rows, each with a digest of its own); `unpinned`: the nodes that ran the same reading tasks without
read_plan's node choice (the control: they spread when nothing holds them)."""

import hashlib
import json
import sys

import pyarrow as pa
import ray
from ray.cluster_utils import Cluster

from cogpipe.config import load_config
from cogpipe.data import encode, index, raycluster


def with_node(table):
    """Each row with the node of the task that made it (fused by Ray Data into the reading task before it)."""
    return table.append_column("node", pa.array([ray.get_runtime_context().get_node_id()] * len(table)))


def nodes(ds) -> list[str]:
    return sorted({r["node"] for r in ds.map_batches(with_node, batch_format="pyarrow").iter_rows()})


def main(recipe: str, manifest: str, out: str, scratch: str, *overrides: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=4, num_gpus=2)
    ray.init(address=cluster.address, logging_level="ERROR")
    try:
        raycluster.connect()
        cfg = load_config(recipe, list(overrides))
        rows = index.read_manifest(manifest)
        many = [{**rows[i % len(rows)], "digest": hashlib.sha256(str(i).encode()).hexdigest()} for i in range(480)]
        index.GROUP_ROWS = 16
        index.write_manifest(f"{scratch}/many", many, {})
        planned = encode.plan(cfg, f"{scratch}/many", set())
        unpinned = ray.data.from_items(planned.items, override_num_blocks=len(planned.items)).map_batches(
            encode._read_items, batch_size=1, batch_format="pyarrow")
        got = dict(driver=ray.get_runtime_context().get_node_id(), items=len(planned.items),
                   local=nodes(encode.read_plan(planned)), unpinned=nodes(unpinned))
        result = encode.encode(cfg, manifest, out, log=lambda *_: None)
        got["result"] = {k: result[k] for k in ("added", "failed", "workers", "rows")}
        print(json.dumps(got), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
