"""Image-to-video on the tiny I2V model: data with first frames, training, export, generation."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cogpipe.config import load_config

from helpers import REPO, SPECS, make_clips, tiny_overrides

RECIPE = REPO / "configs" / "tiny_i2v_lora.yaml"


@pytest.fixture(scope="module")
def i2v_run(clips, tmp_path_factory):
    from cogpipe.training import train

    base = tmp_path_factory.mktemp("i2v")
    cfg = load_config(RECIPE, tiny_overrides(clips, base / "out", base / "cache", **{"train.caption_dropout": 0.5}))
    return train(cfg), cfg, base / "cache"


def test_cache_holds_first_frame_variants(i2v_run):
    _, cfg, cache = i2v_run
    files = list((cache / "latents").rglob("*.safetensors"))
    assert len(files) == 4
    t = load_file(str(files[0]))
    assert t["mean"].shape == (16, 5, 8, 8)
    assert t["image_latents"].shape == (cfg.data.image_noise_variants, 16, 1, 8, 8)
    assert not torch.equal(t["image_latents"][0], t["image_latents"][1])  # each variant has its own noise
    assert len(list((cache / "prompts").rglob("*.safetensors"))) == 5  # 4 captions + the empty prompt


def test_training_batch_concatenates_the_padded_first_frame():
    from cogpipe.data.batches import Draws, draw_batch

    def training_batch(batch, caption_dropout):
        b = draw_batch(_examples(batch), micro_step=0, rank=0, world=1, device="cpu",
                       draws=Draws(seed=0, num_timesteps=1000, caption_dropout=caption_dropout, empty_embeds=empty))
        return b.x0, b.noise, b.timesteps, b.prompt_embeds, b.image_latents

    batch = {"mean": torch.randn(2, 16, 5, 8, 8), "std": torch.full((2, 16, 5, 8, 8), 0.1),
             "prompt_embeds": torch.randn(2, 48, 32), "image_latents": torch.randn(2, 3, 16, 1, 8, 8)}
    empty = torch.zeros(48, 32)
    x0, noise, t, embeds, image = training_batch(batch, 0.0)
    assert x0.shape == noise.shape == image.shape == (2, 5, 16, 8, 8)
    assert image[:, 1:].abs().sum() == 0  # zeros after the first latent frame
    assert any(torch.equal(image[0, 0], batch["image_latents"][0, k, :, 0]) for k in range(3))
    _, _, _, dropped, _ = training_batch(batch, 0.999)
    assert torch.equal(dropped, torch.zeros(2, 48, 32))  # caption dropout uses the empty prompt


def test_i2v_exports_an_image_to_video_pipeline(i2v_run):
    import json

    out, _, _ = i2v_run
    index = json.loads((out / "export" / "model_index.json").read_text())
    assert index["_class_name"] == "CogVideoXImageToVideoPipeline"
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    # .json: the render's speed report (block evaluations done and skipped, seconds)
    assert sorted(p.suffix for p in (out / "validation").iterdir()) == [".json", ".mp4", ".png", ".txt"]


def test_infer_from_an_image(i2v_run, tmp_path):
    from cogpipe.video import read_video

    out, _, _ = i2v_run
    image = next((out / "validation").glob("*.png"))
    video = tmp_path / "i2v.mp4"
    r = subprocess.run([sys.executable, str(REPO / "infer.py"), "--model", str(out / "export"), "--lora",
                        str(out / "lora"), "--image", str(image), "--prompt", "a purple circle moving up",
                        "--steps", "2", "--num-frames", "9", "--output", str(video)],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert read_video(video).shape == (9, 64, 64, 3)


def test_images_column_and_unreadable_image(tmp_path):
    from PIL import Image

    from cogpipe.data.checks import check_dataset

    root = make_clips(tmp_path / "d", SPECS[:2], layout="jsonl")
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(root / "first.png")
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    lines = (root / "metadata.jsonl").read_text().splitlines()
    import json

    rows = [json.loads(x) for x in lines]
    rows[0]["image"], rows[1]["image"] = "first.png", "broken.png"
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(RECIPE, tiny_overrides(root, tmp_path / "o", tmp_path / "c"))
    good, problems = check_dataset(cfg)
    assert [s.image.name for s in good] == ["first.png"]
    assert len(problems) == 1 and "broken.png" in problems[0].file
    assert "cannot read first-frame image" in problems[0].rule


def _examples(batch: dict) -> list[dict]:
    """The examples of a stacked batch, as the loader hands them to draw_batch."""
    return [{k: v[j] for k, v in batch.items()} for j in range(len(batch["mean"]))]
