import pytest
import torch
from safetensors.torch import load_file

from cogpipe import atomic, models
from cogpipe.cache import build_cache
from cogpipe.config import load_config
from cogpipe.data import discover
from helpers import REPO, SPECS, make_clips, tiny_overrides


def _cfg(root, cache, *extra):
    return load_config(REPO / "configs" / "tiny_lora.yaml", tiny_overrides(root, root / "out", cache) + list(extra))


def test_encode_then_hit_then_invalidate(tmp_path, monkeypatch):
    root = make_clips(tmp_path / "d", SPECS[:2])
    cache = tmp_path / "cache"
    cfg = _cfg(root, cache)
    entries = build_cache(cfg, discover(root), log=lambda *_: None)
    lat = load_file(str(entries[0].latents))
    assert lat["mean"].shape == (16, 5, 8, 8) and lat["std"].shape == (16, 5, 8, 8)  # 17 frames -> 5, 64px -> 8
    assert (lat["std"] > 0).all()
    emb = load_file(str(entries[0].prompt))["prompt_embeds"]
    assert emb.shape == (48, 32)
    vae = models.build_vae(cfg.model)
    x = torch.zeros(1, 3, 17, 64, 64)
    assert vae.encode(x).latent_dist.mean.shape == (1, 16, 5, 8, 8)

    # A second pass encodes nothing: building an encoder would fail.
    def boom(*a, **k):
        raise AssertionError("encoder built on a cache hit")

    monkeypatch.setattr(models, "build_vae", boom)
    monkeypatch.setattr(models, "build_text_encoder", boom)
    again = build_cache(cfg, discover(root), log=lambda *_: None)
    assert again == entries
    monkeypatch.undo()

    # A changed clip, a changed resolution or another model gives new keys.
    from cogpipe.video import write_mp4
    from cogpipe.world.render import render

    write_mp4(render("circle", "purple", "down", seed=99), discover(root)[0].video)
    changed = build_cache(cfg, discover(root), log=lambda *_: None)
    assert changed[0].latents != entries[0].latents and changed[1].latents == entries[1].latents
    assert changed[0].prompt == entries[0].prompt  # same caption, same embedding
    smaller = build_cache(_cfg(root, cache, "data.height=32", "data.width=32"), discover(root), log=lambda *_: None)
    assert load_file(str(smaller[1].latents))["mean"].shape == (16, 5, 4, 4)
    other = build_cache(_cfg(root, cache, "model.init_seed=1"), discover(root), log=lambda *_: None)
    assert other[1].latents != entries[1].latents and other[1].prompt != entries[1].prompt
    assert not list(cache.rglob("*.tmp"))
    assert not atomic.temps(cache)  # temporary names are cogpipe.atomic's


def test_clips_encoded_in_batches_match_one_by_one(tmp_path):
    """build_cache encodes clips of one shape together (cache.ENCODE_BATCH); each entry is what encoding
    that clip alone gives."""
    from cogpipe import cache as cache_mod
    from cogpipe.data import load_clip

    root = make_clips(tmp_path / "d", SPECS[:3])
    cfg = _cfg(root, tmp_path / "cache")
    entries = build_cache(cfg, discover(root), log=lambda *_: None)
    vae = models.build_vae(cfg.model).eval()
    for sample, entry in zip(discover(root), entries):
        alone = cache_mod.encode_videos(vae, [load_clip(sample.video, 17, 64, 64)])[0]
        cached = load_file(str(entry.latents))
        torch.testing.assert_close(cached["mean"], alone["mean"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cached["std"], alone["std"], atol=1e-5, rtol=1e-4)
    assert len({load_file(str(e.latents))["mean"].sum().item() for e in entries}) == 3  # three different clips
