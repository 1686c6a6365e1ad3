"""The CogVideoX training objective as pure functions.

v-prediction on the CogVideoX DDIM schedule (scaled-linear betas, zero terminal SNR, SNR shift). The
official finetune code compares the predicted clean latents with the true ones, weighted by
1 / (1 - alpha_bar_t); since x0_pred - x0 = sqrt(1 - alpha_bar_t) (v - v_pred), that is an unweighted
MSE on v, which is what diffusion_loss computes (fewer operations a step; tests/test_objective.py
checks the two agree).
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


def noisy_and_target(x0, noise, t, alphas_cumprod) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 noised to timesteps t (in x0's dtype), and the v-prediction target (fp32 for fp32 latents), from one
    lookup of alpha_bar_t: noisy = sqrt(a) x0 + sqrt(1 - a) noise, v = sqrt(a) noise - sqrt(1 - a) x0."""
    a = _at(alphas_cumprod, t, x0)
    signal, sigma = a.sqrt(), (1 - a).sqrt()
    return (signal * x0 + sigma * noise).to(x0.dtype), signal * noise - sigma * x0


def add_noise(x0, noise, t, alphas_cumprod):
    return noisy_and_target(x0, noise, t, alphas_cumprod)[0]


def v_target(x0, noise, t, alphas_cumprod):
    return noisy_and_target(x0, noise, t, alphas_cumprod)[1]


def diffusion_loss(v_pred, target) -> torch.Tensor:
    """The CogVideoX finetune loss: the 1/(1 - alpha_bar_t)-weighted squared error of the predicted clean latents,
    averaged per example, then over the batch. Since x0_pred - x0 = sqrt(1 - alpha_bar_t) (v - v_pred), it is the
    squared error of v itself, and the examples of a batch share one shape: one MSE over the batch, in fp32."""
    return torch.nn.functional.mse_loss(v_pred.float(), target)


def padding_frames(frames: int, patch_t) -> int:
    """Latent frames CogVideoX1.5 (patch_t=2) adds in front to make the count a multiple of patch_t."""
    return (patch_t - frames % patch_t) % patch_t if patch_t else 0


def padded_frames(frames: int, patch_t) -> int:
    """The latent frame count the transformer sees: `frames` plus CogVideoX1.5's padding (the noise is drawn at it)."""
    return frames + padding_frames(frames, patch_t)


def pad_for_patch_t(latents: torch.Tensor, patch_t) -> torch.Tensor:
    """(B, F, C, H, W) clean latents: CogVideoX1.5 (patch_t=2) needs an even frame count; the first frame is
    repeated in front (the padding frame the pipeline drops from its output: `latents[:, additional_frames:]`)."""
    extra = padding_frames(latents.shape[1], patch_t)
    if not extra:
        return latents
    return torch.cat([latents[:, :1].expand(-1, extra, -1, -1, -1), latents], dim=1)


def pad_image_latents(image_latents: torch.Tensor, patch_t) -> torch.Tensor:
    """(B, F, C, H, W) first-frame latents then zeros, padded as CogVideoXImageToVideoPipeline.__call__ has them:
    it adds the padding to num_frames before prepare_latents, which then builds [image, 0 x (F + pad - 1)] (its own
    first-frame repeat never fires: the count is already even). So the padding is zeros, after the image."""
    extra = padding_frames(image_latents.shape[1], patch_t)
    if not extra:
        return image_latents
    zeros = image_latents.new_zeros(image_latents.shape[:1] + (extra,) + image_latents.shape[2:])
    return torch.cat([image_latents, zeros], dim=1)


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
    target: torch.Tensor  # (B, F, C, H, W): the v-prediction target, fp32
    kwargs: dict  # the CogVideoXTransformer3DModel forward's keyword arguments


def model_inputs(x0, noise, timesteps, prompt_embeds, image_latents, *, transformer_config: dict, alphas_cumprod,
                 rotary: RotaryTables, dtype) -> ModelInputs:
    """Everything a CogVideoX transformer takes for one training batch, as the CogVideoX pipelines' __call__ gives
    it: latents (B, F, C, H, W) padded to a multiple of patch_t (1.5) by repeating the first frame, noised with
    `noise`, which has the padded frame count already (fresh noise in every frame, as the pipeline draws it:
    batches.draw_batch draws it so); for image-to-video the first frame's latents then zeros (the padding too)
    concatenated on channels; rotary tables for the latent shape; ofs = 2 where the model embeds it (1.5-I2V).
    Latents and prompt embeddings in `dtype`."""
    patch_t = transformer_config.get("patch_size_t")
    x0 = pad_for_patch_t(x0, patch_t)
    if noise.shape != x0.shape:
        raise ValueError(f"noise {tuple(noise.shape)} must have the padded latent shape {tuple(x0.shape)} "
                         f"(patch_size_t={patch_t}: the padding frames get noise of their own)")
    noisy, target = noisy_and_target(x0, noise, timesteps, alphas_cumprod)  # (B, F, C, H, W)
    hidden = noisy if image_latents is None else torch.cat([noisy, pad_image_latents(image_latents, patch_t)], dim=2)
    batch, frames, _, height, width = x0.shape
    ofs = torch.full((batch,), 2.0, device=x0.device) if transformer_config.get("ofs_embed_dim") else None
    kwargs = dict(hidden_states=hidden.to(dtype), encoder_hidden_states=prompt_embeds.to(dtype), timestep=timesteps,
                  ofs=ofs, image_rotary_emb=rotary(frames, height, width, x0.device), return_dict=False)
    return ModelInputs(x0=x0, noisy=noisy, target=target, kwargs=kwargs)
