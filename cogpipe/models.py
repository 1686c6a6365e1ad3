"""Model presets and loading: tokenizer, T5 text encoder, VAE, transformer and scheduler.

A preset is a one-line-per-component registry of the real diffusers/transformers classes' configs:
`tiny` runs on a laptop CPU, the others are the CogVideoX family's real shapes (built on the meta
device when only their shapes are needed). `model.pretrained` loads a Diffusers pipeline folder or
hub id instead, the layout `save_pretrained` writes.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# T5 configs: the tiny byte-level encoder and T5-XXL (what every CogVideoX uses, d_model 4096).
_T5_TINY = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                vocab_size=384)
_T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, vocab_size=32128,
               feed_forward_proj="gated-gelu", is_gated_act=True, dense_act_fn="gelu_new")

_TINY = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, time_embed_dim=32, text_embed_dim=32,
             sample_height=8, sample_width=8, sample_frames=17, max_text_seq_length=48,
             use_rotary_positional_embeddings=True)
_VAE_TINY = dict(block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=4, latent_channels=16,
                 sample_height=64, sample_width=64, scaling_factor=0.7)
# tiny-world: hidden 128 (4 heads x 32), 4 layers; text from the fixed n-gram T5 of cogpipe/world/pretrain.py
# its VAE compresses 4x in space (3 levels): a 64x64 clip is 16x16 latent pixels, 8x8 tokens a frame
_TINY_WORLD = dict(num_attention_heads=4, attention_head_dim=32, num_layers=4, time_embed_dim=64, text_embed_dim=64,
                   sample_height=16, sample_width=16, sample_frames=17, max_text_seq_length=48,
                   use_rotary_positional_embeddings=True)
_T5_WORLD = dict(d_model=64, d_kv=8, d_ff=64, num_layers=1, num_heads=14, relative_attention_num_buckets=32,
                 relative_attention_max_distance=64, vocab_size=384)
_VAE_WORLD = dict(block_out_channels=(16, 32, 32), down_block_types=("CogVideoXDownBlock3D",) * 3,
                  up_block_types=("CogVideoXUpBlock3D",) * 3, layers_per_block=1, norm_num_groups=4,
                  latent_channels=16, sample_height=64, sample_width=64, scaling_factor=1.0)
_VAE_FULL = dict(block_out_channels=(128, 256, 256, 512), layers_per_block=3, latent_channels=16)
_5B = dict(num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True)
_15 = dict(_5B, patch_size_t=2, patch_bias=False, sample_height=300, sample_width=300, sample_frames=81)

# preset -> transformer kwargs, VAE kwargs, T5 kwargs, scheduler snr_shift_scale
PRESETS = {
    "tiny": dict(transformer=_TINY, vae=_VAE_TINY, text_encoder=_T5_TINY, snr_shift_scale=1.0),
    # image-to-video: 16 noisy + 16 first-frame latent channels in
    "tiny-i2v": dict(transformer=dict(_TINY, in_channels=32), vae=_VAE_TINY, text_encoder=_T5_TINY,
                     snr_shift_scale=1.0),
    # models/tiny-world: pretrained from scratch on the synthetic world by `cogpipe world pretrain`
    "tiny-world": dict(transformer=_TINY_WORLD, vae=_VAE_WORLD, text_encoder=_T5_WORLD,
                       snr_shift_scale=1.0),
    "2b": dict(transformer=dict(num_attention_heads=30, num_layers=30),
               vae=dict(_VAE_FULL, scaling_factor=1.15258426), text_encoder=_T5_XXL, snr_shift_scale=3.0),
    "5b": dict(transformer=_5B, vae=dict(_VAE_FULL, scaling_factor=0.7), text_encoder=_T5_XXL,
               snr_shift_scale=1.0),
    "5b-i2v": dict(transformer=dict(_5B, in_channels=32, use_learned_positional_embeddings=True),
                   vae=dict(_VAE_FULL, scaling_factor=0.7), text_encoder=_T5_XXL, snr_shift_scale=1.0),
    "1.5-5b": dict(transformer=_15, vae=dict(_VAE_FULL, scaling_factor=0.7, invert_scale_latents=True),
                   text_encoder=_T5_XXL, snr_shift_scale=1.0),
    "1.5-5b-i2v": dict(transformer=dict(_15, in_channels=32, ofs_embed_dim=512),
                       vae=dict(_VAE_FULL, scaling_factor=0.7, invert_scale_latents=True),
                       text_encoder=_T5_XXL, snr_shift_scale=1.0),
}


def scheduler_config(snr_shift_scale: float) -> dict:
    """The CogVideoX DDIM schedule: v-prediction, scaled-linear betas, zero terminal SNR, SNR shift."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="v_prediction", rescale_betas_zero_snr=True, snr_shift_scale=snr_shift_scale,
                timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True, steps_offset=0)


def _is_local(path: str) -> bool:
    return Path(path).expanduser().exists()


def _read_component_config(pretrained: str, subfolder: str) -> dict:
    if _is_local(pretrained):
        file = Path(pretrained).expanduser() / subfolder / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"model.pretrained: {file} not found; expected a Diffusers pipeline folder "
                                    f"(model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/)")
        return json.loads(file.read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(pretrained, "config.json", subfolder=subfolder)).read_text())


def component_configs(model_cfg) -> tuple[dict, dict]:
    """Full transformer and VAE configs (constructor defaults filled in) of the configured model.

    A hub id that cannot be reached (offline, not cached) falls back to `model.preset`'s shapes, with
    a warning, so a recipe can be checked and planned anywhere; loading its weights still needs the hub."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel

    if model_cfg.pretrained and not _is_local(model_cfg.pretrained):
        try:
            t = _read_component_config(model_cfg.pretrained, "transformer")
            v = _read_component_config(model_cfg.pretrained, "vae")
        except Exception as e:  # huggingface_hub raises several kinds when offline or not found
            if model_cfg.preset not in PRESETS:
                raise FileNotFoundError(f"model.pretrained: cannot read {model_cfg.pretrained} ({e})") from None
            warnings.warn(f"model.pretrained: {model_cfg.pretrained} not reachable ({type(e).__name__}); "
                          f"using the shapes of model.preset={model_cfg.preset}")
            t, v = PRESETS[model_cfg.preset]["transformer"], PRESETS[model_cfg.preset]["vae"]
    elif model_cfg.pretrained:
        t = _read_component_config(model_cfg.pretrained, "transformer")
        v = _read_component_config(model_cfg.pretrained, "vae")
    else:
        t, v = PRESETS[model_cfg.preset]["transformer"], PRESETS[model_cfg.preset]["vae"]
    return _with_defaults(CogVideoXTransformer3DModel, t), _with_defaults(AutoencoderKLCogVideoX, v)


def _with_defaults(cls, config: dict) -> dict:
    import inspect

    params = inspect.signature(cls.__init__).parameters
    full = {k: p.default for k, p in params.items() if k != "self" and p.default is not inspect.Parameter.empty}
    full.update({k: v for k, v in config.items() if k in full})
    return full


def model_facts(tcfg: dict, vcfg: dict) -> dict:
    """Version and mode of a transformer config (DESIGN.md §4)."""
    return dict(version="1.0" if tcfg.get("patch_size_t") is None else "1.5",
                i2v=tcfg["in_channels"] == 2 * (tcfg.get("out_channels") or 16))


def _seeded(seed: int, build, dtype):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build().eval()  # as from_pretrained returns it: no dropout until training asks
    return model if dtype == torch.float32 else model.to(dtype)


def build_tokenizer(model_cfg):
    if model_cfg.pretrained:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_cfg.pretrained, subfolder="tokenizer")
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()  # byte-level: no vocabulary file needed


def build_text_encoder(model_cfg, dtype=torch.float32):
    from transformers import T5Config, T5EncoderModel

    if model_cfg.pretrained:
        return T5EncoderModel.from_pretrained(model_cfg.pretrained, subfolder="text_encoder", dtype=dtype)
    cfg = T5Config(**PRESETS[model_cfg.preset]["text_encoder"])
    return _seeded(model_cfg.init_seed + 1, lambda: T5EncoderModel(cfg), dtype)


def build_vae(model_cfg, dtype=torch.float32):
    from diffusers import AutoencoderKLCogVideoX

    if model_cfg.pretrained:
        return AutoencoderKLCogVideoX.from_pretrained(model_cfg.pretrained, subfolder="vae", dtype=dtype)
    cfg = PRESETS[model_cfg.preset]["vae"]
    return _seeded(model_cfg.init_seed + 2, lambda: AutoencoderKLCogVideoX(**cfg), dtype)


def build_transformer(model_cfg, dtype=torch.float32):
    from diffusers import CogVideoXTransformer3DModel

    if model_cfg.pretrained:
        return CogVideoXTransformer3DModel.from_pretrained(model_cfg.pretrained, subfolder="transformer",
                                                           dtype=dtype)
    cfg = PRESETS[model_cfg.preset]["transformer"]
    return _seeded(model_cfg.init_seed + 3, lambda: CogVideoXTransformer3DModel(**cfg), dtype)


def build_scheduler(model_cfg):
    from diffusers import CogVideoXDDIMScheduler

    if model_cfg.pretrained:
        return CogVideoXDDIMScheduler.from_pretrained(model_cfg.pretrained, subfolder="scheduler")
    return CogVideoXDDIMScheduler(**scheduler_config(PRESETS[model_cfg.preset]["snr_shift_scale"]))


def build_on_meta(model_cfg):
    """The transformer with real shapes and no memory: for planning and shape checks of real sizes."""
    from accelerate import init_empty_weights
    from diffusers import CogVideoXTransformer3DModel

    tcfg, _ = component_configs(model_cfg)
    with init_empty_weights():
        return CogVideoXTransformer3DModel(**tcfg)


def pipeline_class(transformer_config: dict):
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline

    i2v = transformer_config["in_channels"] == 2 * (transformer_config.get("out_channels") or 16)
    return CogVideoXImageToVideoPipeline if i2v else CogVideoXPipeline


def build_pipeline(model_cfg, transformer=None, vae=None, text_encoder=None, dtype=torch.float32):
    """A diffusers CogVideoX(ImageToVideo)Pipeline from the configured components (built if not given)."""
    transformer = transformer if transformer is not None else build_transformer(model_cfg, dtype)
    cls = pipeline_class(dict(transformer.config))
    return cls(tokenizer=build_tokenizer(model_cfg),
               text_encoder=text_encoder if text_encoder is not None else build_text_encoder(model_cfg, dtype),
               vae=vae if vae is not None else build_vae(model_cfg, dtype),
               transformer=transformer, scheduler=build_scheduler(model_cfg))
