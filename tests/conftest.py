"""Shared fixtures: offline, wandb off the network, small synthetic clip folders (helpers.py)."""

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Under pytest-xdist the workers share the machine's cores: each takes its share of threads, for itself (torch reads
# OMP_NUM_THREADS at import, below) and for every process it starts (training reads COGPIPE_CPU_THREADS,
# devices.cpu_threads). Two workers of two threads each on two cores would spin against each other in every
# parallel kernel: a third slower in total than one thread each, measured on this suite.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _share = str(max(1, len(os.sched_getaffinity(0)) // _WORKERS))
    os.environ.setdefault("OMP_NUM_THREADS", _share)
    os.environ.setdefault("COGPIPE_CPU_THREADS", _share)

from helpers import SPECS, make_clips, run_tiny  # noqa: E402

# The test files that take longest (measured with --durations under two workers), in that order: pytest-xdist hands
# files to its workers in collection order (the count-based reordering is switched off below), so these start first
# and the short files fill in behind them, and the two workers end close together.
LONGEST_FIRST = ["test_readme.py", "test_launchers.py", "test_sequence_parallel.py", "world/test_pretrain.py",
                 "test_bench.py", "test_faults.py", "test_hub_layout.py", "test_ui_browser.py", "test_multiprocess.py"]


def pytest_report_header(config):
    from cogpipe import video

    try:  # which one reads the clips: decord where installed, PyAV where not or forced (tests/no_decord, .ci/run)
        return f"video backend: {video.backend_name()}"
    except video.VideoBackendError as e:
        return f"video backend: none ({e})"


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent

    def rank(item) -> int:
        name = item.path.relative_to(here).as_posix() if item.path.is_relative_to(here) else ""
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the rest keeps its order


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> Path:
    """Four 64x64, 17-frame clips in the prompts.txt + videos.txt layout."""
    return make_clips(tmp_path_factory.mktemp("clips"), SPECS)


@pytest.fixture(scope="session")
def trained(clips, tmp_path_factory):
    """One 4-step tiny LoRA run (batch 2, checkpoints at 2 and 4): (output_dir, cfg, cache_dir)."""
    base = tmp_path_factory.mktemp("run")
    out, cfg = run_tiny(clips, base / "out", base / "cache")
    return out, cfg, base / "cache"
