"""Content-keyed cache of VAE latents and T5 prompt embeddings, as safetensors files.

A video's key hashes the clip's bytes, the VAE's identity and the preprocessing (frames, size,
dtype); a prompt's key hashes its text, the tokenizer/T5 identity, the text length and dtype. A
changed clip, model or resolution gives a new key, so stale entries are never read and nobody
deletes files by hand. Entries are written to a temporary name and renamed (cogpipe.atomic), so an
interrupted caching pass leaves nothing that reads as valid; build_cache sweeps what such a pass left.

    entries = build_cache(cfg, samples, device)   # encodes what is missing, then frees VAE and T5
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from cogpipe import atomic, models, sharding
from cogpipe.data import stages
from cogpipe.data.folders import load_image, probe_clip
from cogpipe.devices import DTYPE_NAMES, encoder_dtype

CACHE_FORMAT = 1  # bump when the stored tensors change meaning


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_digest(path, memo: Path | None = None) -> str:
    """The sha256 of a file's bytes, computed once per (path, size, mtime): remembered in this process and, with
    `memo` (a cache folder), on disk, so a resumed or relaunched run does not read every clip again."""
    path = Path(path).resolve()
    st = os.stat(path)
    return _file_digest(str(path), st.st_size, st.st_mtime_ns, str(memo) if memo else None)


@functools.lru_cache(maxsize=None)
def _file_digest(path: str, size: int, mtime_ns: int, memo: str | None) -> str:
    record = Path(memo) / "digests" / f"{hashlib.sha256(path.encode()).hexdigest()[:32]}.json" if memo else None
    if record is not None and record.is_file():
        try:
            known = json.loads(record.read_text())
            if (known["path"], known["size"], known["mtime_ns"]) == (path, size, mtime_ns):
                return known["sha256"]
        except (OSError, ValueError, KeyError):
            pass  # unreadable record: hash again
    digest = sha256_file(path)
    if record is not None:
        atomic.write_json(record, {"path": path, "size": size, "mtime_ns": mtime_ns, "sha256": digest})
    return digest


def encoder_identity(model_cfg, component: str) -> str:
    """Who encodes: a preset's config and seed, or a pretrained folder's config and weight files."""
    if not model_cfg.pretrained:
        preset = models.PRESETS[model_cfg.preset]
        return stages.json_digest(dict(preset=model_cfg.preset, seed=model_cfg.init_seed, component=component,
                            config=preset.get(component), torch=torch.__version__.split("+")[0]))
    folder = models.pretrained_folder(model_cfg.pretrained, [component])  # a hub snapshot's path holds its commit
    files = sorted((folder / component).glob("*"))
    return stages.json_digest(dict(component=component, files=[(f.name, f.stat().st_size, f.stat().st_mtime_ns,
                                                     f.read_text() if f.suffix == ".json" else None)
                                                    for f in files if f.is_file()]))


@dataclass(frozen=True)
class Entry:
    """One training example in the cache."""
    latents: Path  # safetensors with "mean" and "std" of the scaled latent distribution [C, F', H', W']
    prompt: Path  # safetensors with "prompt_embeds" [L, D]
    caption: str


class Cache:
    def __init__(self, root, model_cfg, data_cfg, max_text_len: int, dtype: str = "fp32", i2v: bool = False):
        self.root = Path(root).expanduser()
        self.model_cfg, self.data_cfg, self.max_text_len, self.dtype = model_cfg, data_cfg, max_text_len, dtype
        self.i2v = i2v
        self._vae_id = encoder_identity(model_cfg, "vae")
        self._text_id = stages.json_digest([encoder_identity(model_cfg, "text_encoder"),
                                 encoder_identity(model_cfg, "tokenizer")])

    @classmethod
    def for_config(cls, cfg, device) -> "Cache":
        """The cache of a recipe whose encoders run on `device` (their dtype, and so the keys, follow from it:
        cogpipe.devices.encoder_dtype; the same for LoRA and full fine-tunes)."""
        transformer_config, vcfg = models.component_configs(cfg.model)
        dtype = DTYPE_NAMES[encoder_dtype(device)]
        # a run from a latent store (no data.root) caches only the prompts the store lacks, in its output folder
        root = cfg.data.cache_dir or Path(cfg.data.root or cfg.output_dir) / ".cogpipe_cache"
        return cls(root, cfg.model, cfg.data,
                   transformer_config["max_text_seq_length"], dtype,
                   models.model_facts(transformer_config, vcfg)["i2v"])

    def probe(self, sample) -> tuple[int, int, int]:
        """(frames, height, width) of a sample's clip, remembered by content in the cache."""
        path = self.root / "probe" / f"{file_digest(sample.video, self.root)}.json"
        if path.exists():
            return tuple(json.loads(path.read_text()))
        shape = probe_clip(sample.video)
        atomic.write_json(path, shape)
        return shape

    def video_path(self, sample) -> Path:
        """The entry of a Sample (its clip at its bucket's shape, and its first-frame image for I2V)."""
        d = self.data_cfg
        frames, height, width = sample.shape or (d.frames, d.height, d.width)
        image = None
        if self.i2v:
            image = dict(image=file_digest(sample.image, self.root) if sample.image else "first-frame",
                         variants=d.image_noise_variants)
        key = stages.json_digest(dict(v=CACHE_FORMAT, clip=file_digest(sample.video, self.root), vae=self._vae_id,
                                      frames=frames, height=height, width=width, dtype=self.dtype, image=image))
        return self.root / "latents" / key[:2] / f"{key}.safetensors"

    def prompt_path(self, caption: str) -> Path:
        key = stages.json_digest(dict(v=CACHE_FORMAT, text=caption, encoder=self._text_id, length=self.max_text_len,
                                      dtype=self.dtype))
        return self.root / "prompts" / key[:2] / f"{key}.safetensors"


def build_cache(cfg, samples, device, rank: int = 0, world: int = 1, barrier=lambda: None,
                log=print, extra_prompts=()) -> list[Entry]:
    """Make sure every sample has cached latents and prompt embeddings; return the entries.

    Every process lists what is missing, then all meet at a barrier before any writes, so each sees the same
    work list and encodes its share of it (every `world`-th item). The encoders (in cogpipe.devices.encoder_dtype
    on `device`) are loaded only if something is missing and are freed before the final barrier, after which
    every entry must exist (a clear error names what is missing).
    """
    cache = Cache.for_config(cfg, device)
    if rank == 0:
        for path in atomic.sweep(cache.root):
            log(f"cache {cache.root}: removed {path.relative_to(cache.root)}, left by a killed write")
    entries = [Entry(cache.video_path(s), cache.prompt_path(s.caption), s.caption) for s in samples]
    prompts = {e.caption: e.prompt for e in entries}
    for text in extra_prompts:  # e.g. validation prompts and "" (the unconditional embedding)
        prompts[text] = cache.prompt_path(text)
    atomic.failpoint(f"cache-list:{rank}")
    todo_videos = [(s, e) for s, e in zip(samples, entries) if not e.latents.exists()]
    todo_prompts = sorted((c, p) for c, p in prompts.items() if not p.exists())
    barrier()  # the work list is fixed on every process before any process writes
    log(f"cache {cache.root}: {len(samples) - len(todo_videos)}/{len(samples)} clips and "
        f"{len(prompts) - len(todo_prompts)}/{len(prompts)} prompts already encoded")
    dtype = encoder_dtype(device)
    # whole encoders on each process, also under a ZeRO-3 launch; a CPU encoder on stages.ENCODE_THREADS threads
    with sharding.unpartitioned(), stages.encoder_threads(device):
        if todo_videos[rank::world]:
            _encode_videos(cfg, cache, todo_videos[rank::world], device, dtype, log)
        if todo_prompts[rank::world]:
            tokenizer = models.build_tokenizer(cfg.model)
            text_encoder = models.build_text_encoder(cfg.model, dtype, device).to(device).eval()
            for caption, path in todo_prompts[rank::world]:
                embeds = stages.text_encode(tokenizer, text_encoder, caption, cache.max_text_len)
                atomic.save_safetensors(path, {"prompt_embeds": embeds}, {"caption": caption})
            del text_encoder, tokenizer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    barrier()
    missing = [str(e.latents) for e in entries if not e.latents.exists()]
    missing += [str(p) for p in prompts.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"cache {cache.root}: {len(missing)} entries missing after every process encoded "
                                f"its share (a process stopped early, or the cache folder is not shared by all "
                                f"of them): {missing[:3]}")
    return entries


def _encode_videos(cfg, cache: Cache, todo: list, device, dtype, log=print) -> None:
    """The folder cache's encoding: the same stages (cogpipe.data.stages) as `cogpipe data encode`."""
    vae = models.build_vae(cfg.model, dtype, device).to(device).eval()
    if cfg.model.vae_slicing:
        vae.enable_slicing()
    if cfg.model.vae_tiling:
        vae.enable_tiling()
    by_shape: dict[tuple, list] = {}
    for s, e in todo:
        by_shape.setdefault(s.shape or (cfg.data.frames, cfg.data.height, cfg.data.width), []).append((s, e))
    size = cfg.data.encode_batch
    for (num_frames, height, width), group in by_shape.items():
        for i in range(0, len(group), size):
            batch = group[i:i + size]
            clips = [stages.decode_clip(s.video, num_frames, height, width, str(s.video)) for s, _ in batch]
            for (s, e), frames, tensors in zip(batch, clips, stages.vae_encode(vae, clips, size, log)):
                if cache.i2v:  # seeded by the clip's store key: the draws `cogpipe data encode` makes
                    image = load_image(s.image, height, width) if s.image else frames[0]
                    key = stages.clip_key(file_digest(s.video, cache.root), (num_frames, height, width),
                                          file_digest(s.image, cache.root) if s.image else None)
                    tensors["image_latents"] = stages.first_frame_latents(vae, image, cfg.data.image_noise_variants,
                                                                          key)
                atomic.save_safetensors(e.latents, tensors,
                                        {"video": str(s.video), "shape": json.dumps([num_frames, height, width])})


def load_prompt_embeds(cfg, texts, device) -> dict[str, torch.Tensor]:
    """Cached embeddings {text: [L, D]} of prompts that build_cache encoded on `device`."""
    cache = Cache.for_config(cfg, device)
    return {t: load_file(str(cache.prompt_path(t)))["prompt_embeds"] for t in texts}


class CachedDataset(torch.utils.data.Dataset):
    """Training examples read from the cache: {"mean", "std", "prompt_embeds"[, "image_latents"]}. Examples read
    once stay in memory while they fit in `memory_bytes` (each DataLoader worker keeps its own), so a dataset that
    fits is read from disk once, not every epoch."""

    def __init__(self, entries: list[Entry], memory_bytes: int = 2 * 1024**3):
        self.entries, self.memory_bytes, self._kept, self._used = entries, memory_bytes, {}, 0

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        if i in self._kept:
            return self._kept[i]
        e = self.entries[i]
        item = {**load_file(str(e.latents)), **load_file(str(e.prompt))}
        size = sum(t.numel() * t.element_size() for t in item.values())
        if self._used + size <= self.memory_bytes:
            self._kept[i], self._used = item, self._used + size
        return item
