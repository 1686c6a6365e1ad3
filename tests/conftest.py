"""Shared fixtures: offline, wandb off the network, small synthetic clip folders (helpers.py)."""

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import SPECS, make_clips, run_tiny  # noqa: E402


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
