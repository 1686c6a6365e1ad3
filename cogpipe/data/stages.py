"""The encoding stages, one code path for train.py's own cache (a plain folder, in the training processes) and for
`cogpipe data encode` (Ray Data, any number of workers on any number of machines):

    clip = decode_clip(data_or_path, frames, height, width)      # CPU: decode, sample frames, resize, crop
    with encoder_threads(device):
        latents = vae_encode(vae, [clip, ...])                   # the scaled latent distribution of each clip
        embeds = text_encode(tokenizer, text_encoder, caption, max_len)

A clip's latents are bit-identical whichever path, process or machine encodes it, with whatever neighbours: each VAE
forward holds exactly `data.encode_batch` clips of one shape (1 by default; where it is larger, a short batch is
filled with copies of its last clip, whose outputs are dropped; with model.vae_slicing the VAE runs each clip alone
and nothing is filled) and, on a CPU, always runs on ENCODE_THREADS threads (float kernels split their sums by batch
size and thread count, so either one changing changes the low bits of every latent). On a CPU, encoding on more
cores means more encoding processes (Ray workers), not more threads in one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch

from cogpipe.data.folders import DataError, Problem, frame_indices, resize_crop, shape_problem

ENCODE_THREADS = 1  # torch threads of a CPU encoder
STORE_FORMAT = 1  # bump when the stored tensors change meaning


def json_digest(obj) -> str:
    """sha256 of an object's canonical JSON: the keys of the cache and the store."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def clip_key(digest: str, shape, image: str | None = None) -> str:
    """A clip's key in the store: its content (sha256 of its bytes), the shape (frames, height, width) it is
    encoded at and, for an image-to-video recipe whose source lists a first-frame image for the clip, that image's
    content (sha256 of its bytes; None: the clip's own first frame, and the key is the one it always was). Who
    encodes it (VAE, text encoder, dtype) is the store's encoder identity, the same for every row."""
    key = dict(v=STORE_FORMAT, clip=digest, shape=[int(x) for x in shape])
    if image is not None:
        key["image"] = image
    return json_digest(key)


def extra_prompts(cfg, validation_prompts) -> list[str]:
    """The prompts training encodes besides its rows': the validation prompts, and "" (the unconditional embedding)
    where caption dropout or validation's guidance needs it."""
    prompts = list(validation_prompts)
    return prompts + ([""] if cfg.train.caption_dropout > 0 or prompts else [])


def recipe_i2v(cfg) -> bool:
    """Whether a recipe's model is image-to-video (its transformer's config)."""
    from cogpipe import models

    transformer_config, vcfg = models.component_configs(cfg.model)
    return bool(models.model_facts(transformer_config, vcfg)["i2v"])


def _reader(data, where: str):
    """The clip (bytes or a path) opened with cogpipe.video (decord or PyAV); DataError names the rule in the
    dataset check's words."""
    from cogpipe.video import VideoError, open_video

    if isinstance(data, (str, Path)):
        if not Path(data).is_file():
            raise DataError(f"{where}: video file not found", Problem(where, "video file not found"))
        data = Path(data).read_bytes()
    if len(data) == 0:
        raise DataError(f"{where}: empty file (0 bytes)", Problem(where, "empty file (0 bytes)"))
    try:
        return open_video(data)
    except VideoError as e:  # the message starts with "<N bytes>: ": keep the rule only
        rule = f"cannot decode video ({str(e).split(': ', 1)[-1]})"
        raise DataError(f"{where}: {rule}", Problem(where, rule)) from None


def probe_video(data, where: str = "clip") -> dict:
    """{"frames", "fps", "height", "width"} of a clip's bytes (or file); DataError names the rule."""
    with _reader(data, where) as reader:
        return dict(frames=reader.num_frames, fps=float(reader.fps), height=reader.height, width=reader.width)


def decode_clip(data, frames: int, height: int, width: int, where: str = "clip") -> torch.Tensor:
    """Decode a clip (bytes or a path), sample `frames` frames spread over it, resize and center-crop:
    float [F, 3, H, W] in [-1, 1]. DataError names the rule a clip too short or too small breaks."""
    with _reader(data, where) as reader:
        problem = shape_problem((reader.num_frames, reader.height, reader.width), (frames, height, width))
        if problem:
            raise DataError(f"{where}: {problem}", Problem(where, problem))
        pixels = torch.from_numpy(reader.frames(frame_indices(reader.num_frames, frames)))
    pixels = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (F, 3, h, w) in [-1, 1]
    return resize_crop(pixels, height, width).clamp(-1.0, 1.0).contiguous()


@contextlib.contextmanager
def encoder_threads(device):
    """ENCODE_THREADS torch threads while encoding on a CPU (see the module's docstring); restored after."""
    if torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(ENCODE_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def encode_videos(vae, clips: list[torch.Tensor]) -> list[dict]:
    """Clips [F,3,H,W] in [-1,1], all of one shape -> for each, the scaled latent distribution {"mean", "std"}
    of shape [C,F',H',W']. Encoded as one batch."""
    x = torch.stack(clips).to(vae.device, vae.dtype).permute(0, 2, 1, 3, 4)  # (B, 3, F, H, W)
    dist = vae.encode(x).latent_dist
    s = vae.config.scaling_factor
    return [{"mean": (m * s).float(), "std": (d * s).float()} for m, d in zip(dist.mean, dist.std)]


def latent_shape(vae_config, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(frames, height, width) of the latents of a clip: 4x in time (first frame kept), 2^(levels - 1) in space."""
    spatial = 2 ** (len(vae_config.block_out_channels) - 1)
    return (frames - 1) // vae_config.temporal_compression_ratio + 1, height // spatial, width // spatial


def encode_checked(vae, clips: list[torch.Tensor], log) -> list[dict]:
    """encode_videos, checked against the VAE's compression. The VAE's tiled encode (model.vae_tiling) gives
    latents of another size where its tiles do not partition the clip (small clips); those are encoded whole."""
    encoded = encode_videos(vae, clips)
    want = latent_shape(vae.config, *clips[0].shape[:1], *clips[0].shape[2:])
    got = tuple(encoded[0]["mean"].shape[1:])
    if got != want and getattr(vae, "use_tiling", False):
        log(f"cache: the VAE's tiled encode gave latents {got} for clips {tuple(clips[0].shape)}, not {want}: "
            f"encoding them whole (model.vae_tiling is for clips larger than its tiles)")
        vae.disable_tiling()
        encoded = encode_videos(vae, clips)
        got = tuple(encoded[0]["mean"].shape[1:])
    if got != want:
        raise ValueError(f"the VAE encoded clips {tuple(clips[0].shape)} to latents {got}, expected {want}")
    return encoded


@torch.no_grad()
def encode_first_frame(vae, image: torch.Tensor, variants: int, seed: int) -> torch.Tensor:
    """Image-to-video conditioning: `variants` encodings of the first frame [3,H,W], each with a little
    pixel noise (sigma = exp(N(-3, 0.5))) as CogVideoX I2V training does: [K, C, 1, H', W'].

    Scaled as the diffusers image-to-video pipeline scales image latents: x scaling_factor, or
    / scaling_factor where the VAE has `invert_scale_latents` (CogVideoX 1.5)."""
    g = torch.Generator().manual_seed(seed)
    s = vae.config.scaling_factor
    out = []
    for _ in range(variants):
        sigma = torch.exp(torch.normal(-3.0, 0.5, (1,), generator=g))
        noisy = image + torch.randn(image.shape, generator=g) * sigma
        x = noisy.to(vae.device, vae.dtype)[None, :, None]  # (1, 3, 1, H, W)
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g).to(dist.mean.device, dist.mean.dtype)
        out.append((z[0] / s if vae.config.invert_scale_latents else z[0] * s).float())
    return torch.stack(out)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, captions: list[str], max_len: int) -> torch.Tensor:
    """T5 embeddings [B, max_len, D], padded and truncated as the CogVideoX pipelines do."""
    ids = tokenizer(captions, padding="max_length", max_length=max_len, truncation=True,
                    add_special_tokens=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


def fills(vae, batch: int) -> bool:
    """Whether a short batch is filled to `batch` clips: only where one forward holds several clips (a VAE with
    slicing, model.vae_slicing, runs every clip alone whatever the batch)."""
    return batch > 1 and not getattr(vae, "use_slicing", False)


def vae_encode(vae, clips: list[torch.Tensor], batch: int, log=print) -> list[dict]:
    """Clips [F,3,H,W] of one shape -> for each, {"mean", "std"} of its scaled latent distribution [C,F',H',W'],
    encoded `batch` (data.encode_batch) at a time; where `fills`, a short batch is filled with copies of its last
    clip, so a clip's bits never depend on how many neighbours it had."""
    out = []
    for i in range(0, len(clips), batch):
        chunk = clips[i:i + batch]
        filled = chunk + [chunk[-1]] * (batch - len(chunk)) if fills(vae, batch) else chunk
        out += encode_checked(vae, filled, log)[:len(chunk)]
    return out


def first_frame_latents(vae, image: torch.Tensor, variants: int, key: str) -> torch.Tensor:
    """Image-to-video: the first frame's (the clip's own, or its listed first-frame image's) noisy encodings
    [K,C,1,H',W'], seeded by the clip's store key (`clip_key`, which holds the listed image's digest): the same
    draws on the folder cache's path and the store's."""
    return encode_first_frame(vae, image, variants, int(key[:15], 16))


def text_encode(tokenizer, text_encoder, caption: str, max_len: int) -> torch.Tensor:
    """One caption's T5 embeddings [L, D] in fp32 (always one caption a forward: the same bits whatever else is
    being encoded)."""
    return encode_prompts(tokenizer, text_encoder, [caption], max_len)[0].float()


def as_numpy(tensors: dict) -> dict:
    return {k: v.detach().cpu().numpy() for k, v in tensors.items()}


def _frames_bucket(shape) -> tuple[int, int, int]:
    return tuple(int(x) for x in shape)


def bucket_for(frames: int, height: int, width: int, shapes) -> tuple[tuple | None, str | None]:
    """The bucket of a clip of this shape among a recipe's `shapes`, or None and the rule it breaks (the dataset
    check's words: with one shape, too short/too small; with several, that it fits no bucket)."""
    from cogpipe.data.folders import choose_bucket

    available = (int(frames), int(height), int(width))
    shape = choose_bucket(available, shapes)
    if shape is not None:
        return _frames_bucket(shape), None
    rule = shape_problem(available, min(shapes, key=lambda b: b[0] * b[1] * b[2]))
    return None, rule if len(shapes) == 1 else f"fits no bucket of data.buckets: {rule}"


