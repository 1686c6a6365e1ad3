import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from cogpipe import atomic, models
from cogpipe.config import load_config
from cogpipe.data.cache import build_cache
from cogpipe.data.folders import discover

from helpers import REPO, SPECS, make_clips, tiny_overrides

RECIPE = REPO / "configs" / "tiny_lora.yaml"


def _cfg(root, cache, *extra):
    return load_config(REPO / "configs" / "tiny_lora.yaml", tiny_overrides(root, root / "out", cache) + list(extra))


def test_encode_then_hit_then_invalidate(tmp_path, monkeypatch):
    root = make_clips(tmp_path / "d", SPECS[:2])
    cache = tmp_path / "cache"
    cfg = _cfg(root, cache)
    entries = build_cache(cfg, discover(root), "cpu", log=lambda *_: None)
    lat = load_file(str(entries[0].latents))
    assert lat["mean"].shape == (16, 5, 8, 8) and lat["std"].shape == (16, 5, 8, 8)  # 17 frames -> 5, 64px -> 8
    assert (lat["std"] > 0).all()
    emb = load_file(str(entries[0].prompt))["prompt_embeds"]
    assert emb.shape == (48, 32)
    vae = models.build_vae(cfg.model, torch.float32)
    x = torch.zeros(1, 3, 17, 64, 64)
    assert vae.encode(x).latent_dist.mean.shape == (1, 16, 5, 8, 8)

    # A second pass encodes nothing: building an encoder would fail.
    def boom(*a, **k):
        raise AssertionError("encoder built on a cache hit")

    monkeypatch.setattr(models, "build_vae", boom)
    monkeypatch.setattr(models, "build_text_encoder", boom)
    again = build_cache(cfg, discover(root), "cpu", log=lambda *_: None)
    assert again == entries
    monkeypatch.undo()

    # A changed clip, a changed resolution or another model gives new keys.
    from cogpipe.video import write_mp4
    from cogpipe.world.render import render

    write_mp4(render("circle", "purple", "down", seed=99), discover(root)[0].video)
    changed = build_cache(cfg, discover(root), "cpu", log=lambda *_: None)
    assert changed[0].latents != entries[0].latents and changed[1].latents == entries[1].latents
    assert changed[0].prompt == entries[0].prompt  # same caption, same embedding
    smaller = build_cache(_cfg(root, cache, "data.height=32", "data.width=32"), discover(root), "cpu",
                          log=lambda *_: None)
    assert load_file(str(smaller[1].latents))["mean"].shape == (16, 5, 4, 4)
    other = build_cache(_cfg(root, cache, "model.init_seed=1"), discover(root), "cpu", log=lambda *_: None)
    assert other[1].latents != entries[1].latents and other[1].prompt != entries[1].prompt
    assert not list(cache.rglob("*.tmp"))
    assert not atomic.temps(cache)  # temporary names are cogpipe.atomic's


def test_clips_encoded_in_batches_match_one_by_one(tmp_path):
    """build_cache encodes clips of one shape together (data.encode_batch, 8 in the tiny recipe); each entry is what
    encoding that clip alone gives."""
    from cogpipe.data import stages
    from cogpipe.data.folders import load_clip

    root = make_clips(tmp_path / "d", SPECS[:3])
    cfg = _cfg(root, tmp_path / "cache")
    entries = build_cache(cfg, discover(root), "cpu", log=lambda *_: None)
    vae = models.build_vae(cfg.model, torch.float32).eval()
    for sample, entry in zip(discover(root), entries):
        alone = stages.encode_videos(vae, [load_clip(sample.video, 17, 64, 64)])[0]
        cached = load_file(str(entry.latents))
        torch.testing.assert_close(cached["mean"], alone["mean"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cached["std"], alone["std"], atol=1e-5, rtol=1e-4)
    assert len({load_file(str(e.latents))["mean"].sum().item() for e in entries}) == 3  # three different clips


def test_a_short_batch_is_filled_only_where_one_forward_holds_several():
    """stages.vae_encode with data.encode_batch 8 fills a short batch to 8 clips, and a clip's bits are those of a
    full batch; at batch 1, or with the VAE's slicing (model.vae_slicing: each clip its own forward), nothing is
    filled and the bits are those of the clip alone."""
    from cogpipe.data import stages

    cfg = _cfg(Path("unused"), Path("unused"))
    vae = models.build_vae(cfg.model, torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    clips = [torch.rand((17, 3, 64, 64), generator=g) * 2 - 1 for _ in range(8)]
    seen, encode = [], vae.encode

    def spy(x, *a, **k):
        seen.append(x.shape[0])
        return encode(x, *a, **k)

    vae.encode = spy
    full = stages.vae_encode(vae, clips, 8)
    short = stages.vae_encode(vae, clips[:3], 8)
    assert seen == [8, 8]
    assert all(torch.equal(a["mean"], b["mean"]) and torch.equal(a["std"], b["std"]) for a, b in zip(short, full))
    seen.clear()
    alone = stages.vae_encode(vae, clips[:3], 1)
    assert seen == [1, 1, 1]
    seen.clear()
    vae.enable_slicing()
    sliced = stages.vae_encode(vae, clips[:3], 8)
    assert seen == [3] and not stages.fills(vae, 8)
    assert all(torch.equal(a["mean"], b["mean"]) for a, b in zip(sliced, alone))


RACE = """
import sys, torch.distributed as dist
from cogpipe.data.cache import build_cache
from cogpipe.config import load_config
from cogpipe.data.folders import discover
rank, init, recipe, root, cache, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
overrides = ["model.pretrained=null", f"data.root={root}", f"data.cache_dir={cache}", f"output_dir={out}"]
cfg = load_config(recipe, overrides)
build_cache(cfg, discover(root), "cpu", rank, 2, dist.barrier, log=lambda *_: None, extra_prompts=[""])
dist.destroy_process_group()
"""


def test_two_processes_encode_every_entry_when_one_lists_late(tmp_path):
    """Rank 1 sleeps before listing what is missing. Without a barrier between listing and writing, rank 0's
    entries would already exist when rank 1 lists, its share would shift and some entries would never be
    encoded; with it, every entry is there after the final barrier."""
    import os
    import subprocess
    import sys

    root = make_clips(tmp_path / "d", SPECS)
    init = f"file://{tmp_path / 'rendezvous'}"
    env = {**os.environ, "COGPIPE_FAILPOINT": "cache-list:1=SLEEP4", "OMP_NUM_THREADS": "1"}
    args = [str(RECIPE), str(root), str(tmp_path / "cache"), str(tmp_path / "out")]
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(rank), init, *args], env=env, stderr=subprocess.PIPE,
                              text=True) for rank in (0, 1)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    cfg = _cfg(root, tmp_path / "cache")
    from cogpipe.data.cache import Cache

    cache = Cache.for_config(cfg, "cpu")
    assert all(cache.video_path(s).is_file() and cache.prompt_path(s.caption).is_file() for s in discover(root))
    assert len(list((tmp_path / "cache" / "latents").rglob("*.safetensors"))) == 4


def test_a_relaunch_does_not_hash_the_clips_again(tmp_path, monkeypatch):
    from cogpipe.data import cache as cache_mod
    from cogpipe.data.checks import check_dataset

    root = make_clips(tmp_path / "d", SPECS)
    cfg = _cfg(root, tmp_path / "cache")
    first = build_cache(cfg, check_dataset(cfg, device="cpu")[0], "cpu", log=lambda *_: None)
    calls = []
    real = cache_mod.sha256_file
    monkeypatch.setattr(cache_mod, "sha256_file", lambda path, *a: calls.append(path) or real(path, *a))
    cache_mod._file_digest.cache_clear()  # a new process: only the on-disk records remain
    again = build_cache(cfg, check_dataset(cfg, device="cpu")[0], "cpu", log=lambda *_: None)
    assert again == first and calls == []
    clip = next((root / "videos").glob("*.mp4"))
    os.utime(clip, ns=(clip.stat().st_atime_ns, clip.stat().st_mtime_ns + 1_000_000))  # touched: hashed again
    cache_mod._file_digest.cache_clear()
    build_cache(cfg, check_dataset(cfg, device="cpu")[0], "cpu", log=lambda *_: None)
    assert calls == [str(clip.resolve())]


def test_lora_and_full_runs_share_the_cache_and_gpus_encode_in_bf16(tmp_path):
    from cogpipe.data.cache import Cache

    root = make_clips(tmp_path / "d", SPECS[:1])
    [sample] = discover(root)
    lora = _cfg(root, tmp_path / "cache", "model.weight_dtype=bf16")
    full = _cfg(root, tmp_path / "cache", "train.mode=full")
    assert Cache.for_config(lora, "cpu").video_path(sample) == Cache.for_config(full, "cpu").video_path(sample)
    assert Cache.for_config(lora, "cpu").dtype == "fp32"  # encoders run in fp32 on a CPU ...
    assert Cache.for_config(full, "cuda").dtype == "bf16"  # ... and in bf16 on a GPU, whatever the recipe trains in


def test_tiled_encoding_that_misses_the_latent_size_is_redone_whole(tmp_path):
    """diffusers' tiled VAE encode gives 9x9 latents for a 64x64 clip whose tiles (32 px) do not partition it;
    the cache checks every encoding against the VAE's compression and encodes such clips whole."""
    root = make_clips(tmp_path / "d", SPECS[:1])
    logs = []
    [entry] = build_cache(_cfg(root, tmp_path / "cache", "model.vae_tiling=true"), discover(root), "cpu",
                          log=logs.append)
    assert load_file(str(entry.latents))["mean"].shape == (16, 5, 8, 8)
    assert any("tiled encode gave latents (5, 9, 9)" in line for line in logs)
