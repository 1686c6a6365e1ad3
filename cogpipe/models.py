"""Model loading: tokenizer, T5 text encoder, VAE, transformer, scheduler and pipelines.

A preset (`model.preset`) is an entry of the family table (cogpipe/family.py): the configs of the real
diffusers/transformers classes, built here with a seeded random initialisation. `tiny` runs on a laptop CPU,
the others are the CogVideoX family's real shapes (built on the meta device when only their shapes are
needed). `model.pretrained` loads a Diffusers pipeline folder or hub id instead, the layout `save_pretrained`
writes.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from cogpipe import family
from cogpipe.family import DTYPES, PRESETS, scheduler_config  # noqa: F401 (models.DTYPES etc. stay importable)


def _is_local(path: str) -> bool:
    return Path(path).expanduser().exists()


PIPELINE_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")


def pretrained_folder(pretrained: str, parts=PIPELINE_PARTS) -> Path:
    """The local folder of `model.pretrained`: itself, or the hub cache's snapshot of the id (model_index.json and
    `parts`; downloaded if missing and the hub is reachable)."""
    if _is_local(pretrained):
        return Path(pretrained).expanduser()
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(pretrained, allow_patterns=["model_index.json", *(f"{p}/*" for p in parts)]))


def read_component_config(pretrained: str, subfolder: str) -> dict:
    if _is_local(pretrained):
        file = Path(pretrained).expanduser() / subfolder / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"model.pretrained: {file} not found; expected a Diffusers pipeline folder "
                                    f"(model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/)")
        return json.loads(file.read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(pretrained, "config.json", subfolder=subfolder)).read_text())


@dataclass(frozen=True)
class Resolved:
    """The configured model's full transformer and VAE configs, and whether a preset stood in for it."""

    transformer: dict
    vae: dict
    stand_in: str | None = None  # the preset whose shapes stand in for an unreachable model.pretrained hub id
    reason: str | None = None  # why the hub id could not be read (the exception's type)


def resolve_configs(model_cfg) -> Resolved:
    """Full transformer and VAE configs (constructor defaults filled in) of the configured model.

    A hub id that cannot be reached (offline, not cached) falls back to `model.preset`'s shapes, said by
    `stand_in`, so a recipe can be checked and planned anywhere; loading its weights still needs the hub."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel

    stand_in = reason = None
    if model_cfg.pretrained and not _is_local(model_cfg.pretrained):
        try:
            t = read_component_config(model_cfg.pretrained, "transformer")
            v = read_component_config(model_cfg.pretrained, "vae")
        except Exception as e:  # huggingface_hub raises several kinds when offline or not found
            if model_cfg.preset not in family.VARIANTS:
                raise FileNotFoundError(f"model.pretrained: cannot read {model_cfg.pretrained} ({e})") from None
            stand_in, reason = model_cfg.preset, type(e).__name__
            t, v = family.VARIANTS[stand_in].transformer, family.VARIANTS[stand_in].vae
    elif model_cfg.pretrained:
        t = read_component_config(model_cfg.pretrained, "transformer")
        v = read_component_config(model_cfg.pretrained, "vae")
    else:
        t, v = family.variant(model_cfg.preset).transformer, family.variant(model_cfg.preset).vae
    return Resolved(_with_defaults(CogVideoXTransformer3DModel, t), _with_defaults(AutoencoderKLCogVideoX, v),
                    stand_in, reason)


def component_configs(model_cfg) -> tuple[dict, dict]:
    """(transformer, VAE) configs of `resolve_configs`; warns when a preset stood in for model.pretrained."""
    r = resolve_configs(model_cfg)
    if r.stand_in is not None:
        warnings.warn(f"model.pretrained: {model_cfg.pretrained} not reachable ({r.reason}); "
                      f"using the shapes of model.preset={r.stand_in}")
    return r.transformer, r.vae


def _with_defaults(cls, config: dict) -> dict:
    import inspect

    params = inspect.signature(cls.__init__).parameters
    full = {k: p.default for k, p in params.items() if k != "self" and p.default is not inspect.Parameter.empty}
    full.update({k: v for k, v in config.items() if k in full})
    return full


def model_facts(transformer_config: dict, vcfg: dict) -> dict:
    """Version and mode of a transformer config (cogpipe/family.py)."""
    return dict(version=family.version(transformer_config), i2v=family.is_i2v(transformer_config))


def _seeded(seed: int, cls, kwargs: dict, dtype: torch.dtype, device=None):
    """A preset's component, randomly initialised from `seed`: built on `device` (None: torch's default, the CPU)
    so a real-size preset never materialises where it will not run, then cast to `dtype`."""
    device = torch.device(device) if device is not None else None
    with torch.random.fork_rng(devices=[device] if device is not None and device.type == "cuda" else []):
        torch.manual_seed(seed)
        with device or contextlib.nullcontext():
            model = cls(**kwargs).eval()  # as from_pretrained returns it: no dropout until training asks
    return model if dtype == torch.float32 else model.to(dtype)


def build_tokenizer(model_cfg):
    if model_cfg.pretrained:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_cfg.pretrained, subfolder="tokenizer")
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()  # byte-level: no vocabulary file needed


# Every builder takes the dtype from its caller (cogpipe.devices says which); a pretrained component loads on the
# CPU and its caller moves it, a preset is built on `device` directly.

def build_text_encoder(model_cfg, dtype: torch.dtype, device=None):
    from transformers import T5Config, T5EncoderModel

    if model_cfg.pretrained:  # onto its device shard by shard: T5-XXL is 9.5 GB in bf16, never whole in host RAM
        device_map = {"": str(device)} if device is not None and torch.device(device).type != "cpu" else None
        return T5EncoderModel.from_pretrained(model_cfg.pretrained, subfolder="text_encoder", dtype=dtype,
                                              device_map=device_map)
    config = T5Config(**family.variant(model_cfg.preset).text_encoder)
    return _seeded(model_cfg.init_seed + 1, T5EncoderModel, {"config": config}, dtype, device)


def build_vae(model_cfg, dtype: torch.dtype, device=None):
    from diffusers import AutoencoderKLCogVideoX

    if model_cfg.pretrained:
        return AutoencoderKLCogVideoX.from_pretrained(model_cfg.pretrained, subfolder="vae", dtype=dtype)
    return _seeded(model_cfg.init_seed + 2, AutoencoderKLCogVideoX, family.variant(model_cfg.preset).vae, dtype, device)


def build_transformer(model_cfg, dtype: torch.dtype, device=None, empty: bool = False):
    """The configured transformer: the pretrained weights, or the preset seeded. `empty` (a pretrained model on a
    process whose weights come from the first one: sharding.weights_from_main_process) builds it with
    uninitialised parameters instead of reading them."""
    from diffusers import CogVideoXTransformer3DModel

    if model_cfg.pretrained and empty:
        from accelerate import init_empty_weights

        with init_empty_weights():  # parameters on meta, buffers (position tables) real: the shards come from rank 0
            model = CogVideoXTransformer3DModel.from_config(read_component_config(model_cfg.pretrained, "transformer"))
        for module in model.modules():  # uninitialised storage: its pages stay untouched until the shards arrive
            for name, p in module.named_parameters(recurse=False):
                module._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=dtype), p.requires_grad)
        return model
    if model_cfg.pretrained:
        return CogVideoXTransformer3DModel.from_pretrained(model_cfg.pretrained, subfolder="transformer",
                                                           dtype=dtype)
    return _seeded(model_cfg.init_seed + 3, CogVideoXTransformer3DModel, family.variant(model_cfg.preset).transformer,
                   dtype, device)


def build_scheduler(model_cfg):
    from diffusers import CogVideoXDDIMScheduler

    if model_cfg.pretrained:
        return CogVideoXDDIMScheduler.from_pretrained(model_cfg.pretrained, subfolder="scheduler")
    return CogVideoXDDIMScheduler(**scheduler_config(model_cfg.preset))


def build_on_meta(model_cfg):
    """The transformer with real shapes and no memory: for planning and shape checks of real sizes."""
    from accelerate import init_empty_weights
    from diffusers import CogVideoXTransformer3DModel

    transformer_config, _ = component_configs(model_cfg)
    with init_empty_weights():
        return CogVideoXTransformer3DModel(**transformer_config)


def pipeline_class(transformer_config: dict):
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline

    return CogVideoXImageToVideoPipeline if family.is_i2v(transformer_config) else CogVideoXPipeline


def build_pipeline(model_cfg, dtype: torch.dtype, transformer=None, vae=None, text_encoder=None):
    """A diffusers CogVideoX(ImageToVideo)Pipeline from the configured components (built if not given)."""
    transformer = transformer if transformer is not None else build_transformer(model_cfg, dtype)
    cls = pipeline_class(dict(transformer.config))
    return cls(tokenizer=build_tokenizer(model_cfg),
               text_encoder=text_encoder if text_encoder is not None else build_text_encoder(model_cfg, dtype),
               vae=vae if vae is not None else build_vae(model_cfg, dtype),
               transformer=transformer, scheduler=build_scheduler(model_cfg))


def compile_blocks(transformer) -> None:
    """torch.compile each transformer block in place (regional compile: the blocks share their code, so one compiled
    graph serves them all and compilation takes a block's time, not the model's)."""
    for block in transformer.transformer_blocks:
        block.compile()
