"""The CogVideoX training objective as pure functions.

v-prediction on the CogVideoX DDIM schedule (scaled-linear betas, zero terminal SNR, SNR shift). As in
the official finetune code the loss compares the predicted clean latents with the true ones, weighted
by 1 / (1 - alpha_bar_t); since x0_pred - x0 = sqrt(1 - alpha_bar_t) (v - v_pred), this equals an
unweighted MSE on v.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _at(alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod.to(like.device, torch.float32)[t]
    return a.view(-1, *([1] * (like.ndim - 1)))  # (B, 1, ...) broadcast over the latent dims


def sample_timestep(num_train_timesteps: int, generator: torch.Generator, sampling: str = "uniform",
                    logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    """One training timestep, shape (1,). `uniform`: every t alike (the CogVideoX finetune code);
    `logit_normal`: t / T = sigmoid(N(logit_mean, logit_std)), more of the steps where the noise leaves
    the content ambiguous and the prompt decides it (mean 0: centred on t = T/2; > 0: noisier)."""
    device = generator.device
    if sampling == "uniform":
        return torch.randint(0, num_train_timesteps, (1,), generator=generator, device=device)
    z = logit_mean + logit_std * torch.randn((1,), generator=generator, device=device)
    return (torch.sigmoid(z) * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)


def add_noise(x0, noise, t, alphas_cumprod):
    a = _at(alphas_cumprod, t, x0)
    return (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(x0.dtype)


def v_target(x0, noise, t, alphas_cumprod):
    a = _at(alphas_cumprod, t, x0)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def x0_from_v(noisy, v, t, alphas_cumprod):
    a = _at(alphas_cumprod, t, noisy)
    return a.sqrt() * noisy.float() - (1 - a).sqrt() * v.float()


def loss_weight(t, alphas_cumprod, like):
    return 1.0 / (1.0 - _at(alphas_cumprod, t, like))


def diffusion_loss(v_pred, x0, noisy, t, alphas_cumprod) -> torch.Tensor:
    """Mean over the batch of the 1/(1 - alpha_bar_t)-weighted squared error of the predicted x0."""
    x0_pred = x0_from_v(noisy, v_pred, t, alphas_cumprod)
    err = loss_weight(t, alphas_cumprod, x0) * (x0_pred - x0.float()) ** 2
    return err.flatten(1).mean(1).mean()


def pad_for_patch_t(latents: torch.Tensor, patch_t) -> torch.Tensor:
    """(B, F, C, H, W): CogVideoX1.5 (patch_t=2) needs an even frame count; repeat the first frame."""
    if not patch_t or latents.shape[1] % patch_t == 0:
        return latents
    extra = patch_t - latents.shape[1] % patch_t
    return torch.cat([latents[:, :1].expand(-1, extra, -1, -1, -1), latents], dim=1)


def rotary_embeddings(transformer_config: dict, latent_frames: int, latent_h: int, latent_w: int, device):
    """(cos, sin) rotary tables exactly as the CogVideoX pipelines build them; None without RoPE."""
    if not transformer_config.get("use_rotary_positional_embeddings"):
        return None
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    p, p_t = transformer_config["patch_size"], transformer_config.get("patch_size_t")
    grid_h, grid_w = latent_h // p, latent_w // p
    base_w, base_h = transformer_config["sample_width"] // p, transformer_config["sample_height"] // p
    if p_t is None:  # CogVideoX 1.0
        crops = get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h)
        return get_3d_rotary_pos_embed(embed_dim=transformer_config["attention_head_dim"], crops_coords=crops,
                                       grid_size=(grid_h, grid_w), temporal_size=latent_frames, device=device)
    return get_3d_rotary_pos_embed(embed_dim=transformer_config["attention_head_dim"], crops_coords=None,
                                   grid_size=(grid_h, grid_w), temporal_size=(latent_frames + p_t - 1) // p_t,
                                   grid_type="slice", max_size=(base_h, base_w), device=device)


class RotaryTables:
    """`rotary_embeddings` for one transformer config, computed once per latent shape and device."""

    def __init__(self, transformer_config: dict):
        self.transformer_config, self._tables = transformer_config, {}

    def __call__(self, latent_frames: int, latent_h: int, latent_w: int, device):
        key = (latent_frames, latent_h, latent_w, str(device))
        if key not in self._tables:
            self._tables[key] = rotary_embeddings(self.transformer_config, latent_frames, latent_h, latent_w, device)
        return self._tables[key]


@dataclass
class ModelInputs:
    x0: torch.Tensor  # (B, F, C, H, W): clean latents, padded for patch_t
    noisy: torch.Tensor  # (B, F, C, H, W): x0 noised to the batch's timesteps
    kwargs: dict  # the CogVideoXTransformer3DModel forward's keyword arguments


def model_inputs(x0, noise, timesteps, prompt_embeds, image_latents, *, transformer_config: dict, alphas_cumprod,
                 rotary: RotaryTables, dtype) -> ModelInputs:
    """Everything a CogVideoX transformer takes for one training batch, as the CogVideoX pipelines prepare it:
    latents (B, F, C, H, W) padded to a multiple of patch_t (1.5) by repeating the first frame, noised; for
    image-to-video the first frame's latents (zeros after it) concatenated on channels; rotary tables for the
    latent shape; ofs = 2 where the model embeds it (1.5-I2V). Latents and prompt embeddings in `dtype`."""
    patch_t = transformer_config.get("patch_size_t")
    x0, noise = pad_for_patch_t(x0, patch_t), pad_for_patch_t(noise, patch_t)
    noisy = add_noise(x0, noise, timesteps, alphas_cumprod)  # (B, F, C, H, W)
    hidden = noisy if image_latents is None else torch.cat([noisy, pad_for_patch_t(image_latents, patch_t)], dim=2)
    batch, frames, _, height, width = x0.shape
    ofs = torch.full((batch,), 2.0, device=x0.device) if transformer_config.get("ofs_embed_dim") else None
    kwargs = dict(hidden_states=hidden.to(dtype), encoder_hidden_states=prompt_embeds.to(dtype), timestep=timesteps,
                  ofs=ofs, image_rotary_emb=rotary(frames, height, width, x0.device), return_dict=False)
    return ModelInputs(x0=x0, noisy=noisy, kwargs=kwargs)
