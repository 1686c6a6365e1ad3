"""Helpers shared by the tests: the repository root, small synthetic clip folders, the tiny recipe's overrides."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_clips(root: Path, specs, frames: int = 17, size: int = 64, layout: str = "txt") -> Path:
    """Write clips of the synthetic world in one of the dataset layouts; returns root."""
    from cogpipe.video import write_mp4
    from cogpipe.world.render import caption, render

    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (shape, colour, direction) in enumerate(specs):
        name = f"{i:02d}_{colour}_{shape}_{direction}.mp4"
        sub = "" if layout == "folder" else "videos/"
        write_mp4(render(shape, colour, direction, frames=frames, size=size, seed=i), root / sub / name)
        rows.append((sub + name, caption(shape, colour, direction)))
    if layout == "txt":
        (root / "videos.txt").write_text("".join(f"{v}\n" for v, _ in rows))
        (root / "prompts.txt").write_text("".join(f"{c}\n" for _, c in rows))
    elif layout == "folder":
        for v, c in rows:
            (root / v).with_suffix(".txt").write_text(c + "\n")
    elif layout == "jsonl":
        import json

        (root / "metadata.jsonl").write_text("".join(json.dumps({"video": v, "caption": c}) + "\n" for v, c in rows))
    elif layout == "csv":
        import csv

        with open(root / "metadata.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file_name", "prompt"])
            w.writerows(rows)
    return root


SPECS = [("square", "purple", "right"), ("circle", "purple", "up"), ("triangle", "purple", "left"),
         ("square", "purple", "down")]


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
