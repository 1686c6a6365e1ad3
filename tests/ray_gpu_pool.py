"""`cogpipe data encode` on a Ray cluster that has GPUs, on this CPU machine: a local Ray declaring 2 logical GPUs
(and 4 CPUs), so encode takes its GPU path (decoding as CPU tasks beside an actor pool of one GPU an actor). Torch
finds no CUDA in the actors, so the encoders run on the CPU: what runs is Ray's scheduling and the data flow of
that path, not a GPU. Run as a script by tests/test_data_ray.py; prints one JSON line (encode's result):

    python tests/ray_gpu_pool.py RECIPE MANIFEST_DIR STORE OVERRIDE...
"""

import json
import sys

import ray

from cogpipe.config import load_config
from cogpipe.data import encode, raycluster


def main(recipe: str, manifest: str, out: str, *overrides: str) -> None:
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        raycluster.connect()
        assert raycluster.gpus() == 2
        result = encode.encode(load_config(recipe, list(overrides)), manifest, out, log=lambda *_: None)
        print(json.dumps({k: result[k] for k in ("added", "failed", "workers", "pids", "rows")}), flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
