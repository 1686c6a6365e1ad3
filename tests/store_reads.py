"""train.py with the latent store's reader recording what it hands this process, for the tests that launch
training from a store on several processes (helpers.launch(..., reads=FOLDER)):

    accelerate launch ... tests/store_reads.py train.py --config ... data.store=...

FOLDER/process<RANK>.jsonl (FOLDER from COGPIPE_TEST_READS) gets one line a row StoreDataset returned in this
process, in order: the row number and a digest of the example's tensors (every name, dtype, shape and byte), so
two processes that received the same sample write the same line. helpers.assert_store_reads reads them."""

import hashlib
import json
import os
import runpy
import sys
from pathlib import Path

import torch

from cogpipe.data import reader

_path = Path(os.environ["COGPIPE_TEST_READS"]) / f"process{os.environ.get('RANK', '0')}.jsonl"
_path.parent.mkdir(parents=True, exist_ok=True)
_getitem = reader.StoreDataset.__getitem__


def digest(example: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(example):
        t = example[name].contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def recorded(self, row):
    example = _getitem(self, row)
    with open(_path, "a") as f:  # a line a read, written before the step: a process killed later keeps it
        f.write(json.dumps({"row": int(row), "digest": digest(example)}) + "\n")
    return example


reader.StoreDataset.__getitem__ = recorded
sys.argv = sys.argv[1:]  # train.py and its arguments, run as `python train.py ...` runs it
sys.path[0] = str(Path(sys.argv[0]).resolve().parent)
runpy.run_path(sys.argv[0], run_name="__main__")
