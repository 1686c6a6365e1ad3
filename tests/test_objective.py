"""The training objective against the libraries: noising and the v-target against CogVideoXDDIMScheduler's
add_noise / get_velocity, the weighted loss against the official CogVideo finetune's formula, and the model
inputs (patch_t padding, image latents) against what the diffusers pipelines feed the transformer."""

import pytest
import torch

from cogpipe import models
from cogpipe.config import ModelConfig
from cogpipe.diffusion import RotaryTables, add_noise, diffusion_loss, model_inputs, noisy_and_target, v_target


def _scheduler(preset: str):
    return models.build_scheduler(ModelConfig(preset=preset))


def _official_loss(scheduler, v_pred, x0, noisy, t):
    """finetune/models/*/lora_trainer.py compute_loss in the official CogVideo repository, on (B, F, C, H, W)."""
    latent_pred = scheduler.get_velocity(v_pred, noisy, t)  # = sqrt(a) x_t - sqrt(1 - a) v: the predicted x0
    alphas_cumprod = scheduler.alphas_cumprod[t]
    weights = 1 / (1 - alphas_cumprod)
    while len(weights.shape) < len(latent_pred.shape):
        weights = weights.unsqueeze(-1)
    loss = torch.mean((weights * (latent_pred - x0) ** 2).reshape(x0.shape[0], -1), dim=1)
    return loss.mean()


@pytest.mark.parametrize("preset", ["2b", "5b"])  # SNR shift 3.0 and 1.0
def test_noise_target_and_loss_equal_the_scheduler_and_the_official_formula(preset):
    scheduler = _scheduler(preset)
    g = torch.Generator().manual_seed(0)
    x0, noise, v_pred = (torch.randn(4, 5, 16, 6, 6, generator=g) for _ in range(3))  # fp32, as trained
    t = torch.tensor([0, 1, 500, 999])
    alphas = scheduler.alphas_cumprod
    noisy = add_noise(x0, noise, t, alphas)
    torch.testing.assert_close(noisy, scheduler.add_noise(x0, noise, t), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v_target(x0, noise, t, alphas), scheduler.get_velocity(x0, noise, t).float(),
                               rtol=1e-6, atol=1e-6)
    v = v_target(x0, noise, t, alphas)
    assert torch.equal(noisy_and_target(x0, noise, t, alphas)[0], noisy)
    assert torch.equal(noisy_and_target(x0, noise, t, alphas)[1], v)
    # the official weighted x0 loss is an unweighted MSE on v (what diffusion.py's docstring derives)
    ours = diffusion_loss(v_pred, v)
    official = _official_loss(scheduler, v_pred, x0, noisy, t).float()  # its weights come out in fp64
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-6)
    assert ours.item() > 0 and diffusion_loss(v, v).item() == 0  # exact v: zero loss


def _tiny_config(**changes) -> dict:
    from diffusers import CogVideoXTransformer3DModel

    base = models.PRESETS["tiny"]["transformer"]
    return dict(CogVideoXTransformer3DModel.from_config({**base, **changes}).config)


def test_patch_t_padding_equals_the_official_finetune_and_the_pipeline():
    config = _tiny_config(patch_size_t=2, patch_bias=False, sample_frames=81)
    alphas = _scheduler("1.5-5b").alphas_cumprod
    x0 = torch.randn(2, 5, 16, 8, 8)  # (B, F, C, H, W): 5 latent frames, odd
    noise, t = torch.randn(2, 6, 16, 8, 8), torch.tensor([10, 900])  # noise for the padded count: fresh in each
    inputs = model_inputs(x0, noise, t, torch.zeros(2, 3, 32), None, transformer_config=config,
                          alphas_cumprod=alphas, rotary=RotaryTables(config), dtype=torch.float32)
    with pytest.raises(ValueError, match="padded latent shape"):  # a noise frame repeated would be a silent bug
        model_inputs(x0, noise[:, 1:], t, torch.zeros(2, 3, 32), None, transformer_config=config,
                     alphas_cumprod=alphas, rotary=RotaryTables(config), dtype=torch.float32)
    # official finetune: latent (B, C, F, H, W); ncopy = F % patch_t copies of the first frame in front
    latent = x0.permute(0, 2, 1, 3, 4)
    ncopy = latent.shape[2] % 2
    official = torch.cat([latent[:, :, :1].repeat(1, 1, ncopy, 1, 1), latent], dim=2).permute(0, 2, 1, 3, 4)
    assert inputs.x0.shape == (2, 6, 16, 8, 8) and torch.equal(inputs.x0, official)
    assert torch.equal(inputs.target, v_target(official, noise, t, alphas))
    assert torch.equal(inputs.noisy, add_noise(official, noise, t, alphas))
    assert inputs.kwargs["hidden_states"].shape == (2, 6, 16, 8, 8)
    assert inputs.kwargs["ofs"] is None
    even = model_inputs(x0[:, :4], noise[:, :4], t, torch.zeros(2, 3, 32), None, transformer_config=config,
                        alphas_cumprod=alphas, rotary=RotaryTables(config), dtype=torch.float32)
    assert torch.equal(even.x0, x0[:, :4])  # an even count is left as it is


@pytest.mark.parametrize("patch_t", [None])  # CogVideoX-5B-I2V structure; 1.5-I2V: the __call__ test below
def test_image_latents_are_placed_as_the_image_to_video_pipeline_places_them(patch_t):
    """The transformer's second 16 channels: the first frame's scaled latents, then zeros, exactly as
    CogVideoXImageToVideoPipeline.prepare_latents builds them at inference."""
    from diffusers import CogVideoXImageToVideoPipeline

    changes = dict(in_channels=32, out_channels=16)
    if patch_t:
        changes.update(patch_size_t=2, patch_bias=False, ofs_embed_dim=32)
    config = _tiny_config(**changes)
    vae = models.build_vae(ModelConfig(preset="tiny"), torch.float32)
    transformer = models.build_transformer(ModelConfig(preset="tiny-i2v"), torch.float32) if not patch_t else None
    if transformer is None:
        from diffusers import CogVideoXTransformer3DModel

        transformer = CogVideoXTransformer3DModel.from_config(config)
    pipe = CogVideoXImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                         scheduler=_scheduler("5b"))
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        _, pipeline_images = pipe.prepare_latents(image, 1, 16, 17, 64, 64, torch.float32, torch.device("cpu"),
                                                  torch.Generator().manual_seed(3))
        z = vae.encode(image[:, :, None]).latent_dist.sample(torch.Generator().manual_seed(3))  # (1, C, 1, h, w)
    first = (z * vae.config.scaling_factor).permute(0, 2, 1, 3, 4)  # (1, 1, C, h, w)
    image_latents = torch.cat([first, torch.zeros(1, 4, 16, 8, 8)], dim=1)  # 17 frames -> 5 latent frames
    x0 = torch.randn(1, 5, 16, 8, 8)
    inputs = model_inputs(x0, torch.randn_like(x0), torch.tensor([500]), torch.zeros(1, 3, 32), image_latents,
                          transformer_config=config, alphas_cumprod=_scheduler("5b").alphas_cumprod,
                          rotary=RotaryTables(config), dtype=torch.float32)
    hidden = inputs.kwargs["hidden_states"]
    assert hidden.shape == (1, 6 if patch_t else 5, 32, 8, 8)
    torch.testing.assert_close(hidden[:, :, 16:], pipeline_images, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden[:, :, :16], inputs.noisy)
    if patch_t:
        assert torch.equal(inputs.kwargs["ofs"], torch.tensor([2.0]))  # 1.5-I2V's ofs, as its pipeline passes


def test_1_5_i2v_inputs_equal_what_the_pipeline_call_gives_the_transformer(tmp_path):
    """A real tiny CogVideoX1.5-I2V pipeline (the hub layout of tests/fixtures/hub.py) called at 81 frames: 21 latent
    frames, which __call__ pads to 22 by adding to num_frames before prepare_latents. The transformer's inputs are
    captured (its forward patched) and compared with cogpipe's model_inputs for the same latents: image latents
    [image, 0 x 21] (not the first frame repeated), noise of its own in all 22 frames, ofs 2, the same rotary
    tables and timestep."""
    from diffusers import CogVideoXImageToVideoPipeline
    from PIL import Image

    from fixtures.hub import write_hub_pipeline

    pipe = CogVideoXImageToVideoPipeline.from_pretrained(write_hub_pipeline(tmp_path / "hub", "1.5-5b-i2v"))
    config = dict(pipe.transformer.config)
    captured = {}

    def forward(**kwargs):
        captured.update(kwargs)
        raise StopIteration  # the inputs are all this test needs

    pipe.transformer.forward = forward
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 22, 16, 8, 8, generator=g)  # what __call__ would draw: 22 fresh frames
    prompt = torch.randn(1, config["max_text_seq_length"], config["text_embed_dim"], generator=g)
    image = Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).byte().numpy())
    with pytest.raises(StopIteration), torch.no_grad():
        pipe(image=image, prompt_embeds=prompt, negative_prompt_embeds=prompt, num_frames=81, height=64, width=64,
             num_inference_steps=2, guidance_scale=1.0, latents=noise, use_dynamic_cfg=False, output_type="latent")
    hidden = captured["hidden_states"]
    assert hidden.shape == (1, 22, 32, 8, 8)
    pipeline_image = hidden[:, :, 16:]
    assert pipeline_image[:, 0].abs().sum() > 0 and pipeline_image[:, 1:].abs().sum() == 0  # [image, 0 x 21]
    torch.testing.assert_close(hidden[:, :, :16], noise * pipe.scheduler.init_noise_sigma)

    # cogpipe, same image latents as cached ([image, 0 x 20] for 21 latent frames) and x0 = 0, so the noisy input is
    # sqrt(1 - alpha_bar_t) * noise exactly where the pipeline gives the pure noise
    t = captured["timestep"].long()
    cached_image = torch.cat([pipeline_image[:, :1], torch.zeros(1, 20, 16, 8, 8)], dim=1)
    ours = model_inputs(torch.zeros(1, 21, 16, 8, 8), noise, t, prompt, cached_image, transformer_config=config,
                        alphas_cumprod=pipe.scheduler.alphas_cumprod, rotary=RotaryTables(config),
                        dtype=torch.float32)
    mine = ours.kwargs["hidden_states"]
    assert mine.shape == hidden.shape
    assert torch.equal(mine[:, :, 16:], pipeline_image)
    sigma = (1 - pipe.scheduler.alphas_cumprod[t].float()).sqrt()
    torch.testing.assert_close(mine[:, :, :16], hidden[:, :, :16] * sigma, rtol=1e-6, atol=1e-7)
    assert torch.equal(ours.kwargs["ofs"], captured["ofs"].float()) and captured["ofs"].item() == 2
    for a, b in zip(ours.kwargs["image_rotary_emb"], captured["image_rotary_emb"]):
        torch.testing.assert_close(a, b)
    assert torch.equal(ours.kwargs["encoder_hidden_states"], captured["encoder_hidden_states"])
