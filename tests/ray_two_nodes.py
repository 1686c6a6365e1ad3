"""Where `cogpipe data encode` reads a manifest on a Ray cluster of two nodes (ray.cluster_utils.Cluster: two raylets
on this machine, the head with 1 CPU, the other with 4); run as a script by tests/test_encode_plan.py, prints one
JSON line:

    python tests/ray_two_nodes.py MANIFEST_DIR

`driver`: the driver's node id; `local`: the nodes that ran encode's reading tasks (encode.read_plan) for the
manifest at MANIFEST_DIR, a local folder; `unpinned`: the nodes that ran the same reading tasks without read_plan's
node choice (the control: the tasks do spread over both nodes when nothing holds them)."""

import json
import sys

import pyarrow as pa
import ray
from ray.cluster_utils import Cluster

from cogpipe.config import load_config
from cogpipe.data import encode

from helpers import REPO


def with_node(table):
    """Each row with the node of the task that made it (fused by Ray Data into the reading task before it)."""
    return table.append_column("node", pa.array([ray.get_runtime_context().get_node_id()] * len(table)))


def nodes(ds) -> list[str]:
    return sorted({r["node"] for r in ds.map_batches(with_node, batch_format="pyarrow").iter_rows()})


def main(manifest: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=4)
    ray.init(address=cluster.address, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        cfg = load_config(REPO / "configs" / "tiny_lora.yaml", ["model.pretrained=null"])
        planned = encode.plan(cfg, manifest, set())
        unpinned = ray.data.from_items(planned.items, override_num_blocks=len(planned.items)).map_batches(
            encode._read_items, batch_size=1, batch_format="pyarrow")
        print(json.dumps(dict(driver=ray.get_runtime_context().get_node_id(), items=len(planned.items),
                              local=nodes(encode.read_plan(planned)), unpinned=nodes(unpinned))), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
