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


def tiny_overrides(data_root, output_dir, cache_dir, **extra) -> list[str]:
    # the recipe's random preset, not the shipped model tiny_lora.yaml builds on: fast, independent of its weights
    base = {"model.pretrained": "null",
            "data.root": data_root, "output_dir": output_dir, "data.cache_dir": cache_dir, "report_to": "none",
            "train.max_steps": 4, "train.checkpoint_every": 2, "train.batch_size": 2, "lora.rank": 4,
            "lora.alpha": 8, "validation.steps": 2, "train.lr": 1e-2, "train.warmup_steps": 0}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def run_tiny(clips, out, cache, **extra):
    """Train the tiny LoRA recipe in this process with the test overrides."""
    from cogpipe.config import load_config
    from cogpipe.training import train

    cfg = load_config(REPO / "configs" / "tiny_lora.yaml", tiny_overrides(clips, out, cache, **extra))
    return train(cfg), cfg


@pytest.fixture(scope="session")
def trained(clips, tmp_path_factory):
    """One 4-step tiny LoRA run (batch 2, checkpoints at 2 and 4): (output_dir, cfg, cache_dir)."""
    base = tmp_path_factory.mktemp("run")
    out, cfg = run_tiny(clips, base / "out", base / "cache")
    return out, cfg, base / "cache"
