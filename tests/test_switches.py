"""Memory and training switches: EMA, validation during training, fp8 frozen weights, gradient
checkpointing, 8-bit AdamW's message, logit-normal timestep sampling."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from cogpipe import checkpoint, models
from cogpipe.config import ConfigError, load_config

from helpers import REPO, run_tiny

RECIPE = REPO / "configs" / "tiny_lora.yaml"


@pytest.fixture(scope="module")
def ema_run(clips, tmp_path_factory):
    base = tmp_path_factory.mktemp("ema")
    out, cfg = run_tiny(clips, base / "out", base / "cache", **{
        "train.ema_decay": 0.5, "validation.every": 2, "validation.prompts": '["a red circle moving left"]'})
    return out, base / "cache"


def test_ema_is_saved_and_exported(ema_run):
    out, _ = ema_run
    ckpt = out / "checkpoints" / "checkpoint-000004"
    ema, live = load_file(str(ckpt / checkpoint.EMA)), load_file(str(ckpt / checkpoint.TRAINABLE))
    assert set(ema) == set(live)
    assert any(not torch.equal(ema[k], live[k]) for k in ema)
    from cogpipe.lora import adapter_state_dict

    lora = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    scale = 8 / 4  # lora.alpha / lora.rank of the test overrides, baked into lora_B by the export
    expected = {f"transformer.{k}": v * scale if ".lora_B." in k else v for k, v in adapter_state_dict(ema).items()}
    assert set(lora) == set(expected) and all(torch.equal(lora[k], expected[k]) for k in lora)


def test_ema_resumes_exactly(ema_run, clips, tmp_path):
    out, cache = ema_run
    part = tmp_path / "part"
    shutil.copytree(out / "checkpoints" / "checkpoint-000002", part / "checkpoints" / "checkpoint-000002")
    (part / "checkpoints" / "latest").write_text("checkpoint-000002")
    run_tiny(clips, part, cache, **{"train.ema_decay": 0.5, "train.resume_from": "latest"})
    a = load_file(str(out / "checkpoints" / "checkpoint-000004" / checkpoint.EMA))
    b = load_file(str(part / "checkpoints" / "checkpoint-000004" / checkpoint.EMA))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_validation_during_training_writes_videos(ema_run):
    from cogpipe.video import read_video

    out, _ = ema_run
    mid = out / "validation" / "step-000002-0.mp4"
    assert read_video(mid).shape == (17, 64, 64, 3)
    assert (out / "validation" / "step-000002-0.txt").read_text().strip() == "a red circle moving left"
    assert (out / "validation" / "step-000004-0.mp4").is_file()  # the final one, from the export


def test_gradient_checkpointing_gives_the_same_weights(trained, clips, tmp_path):
    out, _ = run_tiny(clips, tmp_path / "gc", trained[2], **{"train.gradient_checkpointing": True})
    a = load_file(str(trained[0] / "checkpoints" / "checkpoint-000004" / checkpoint.TRAINABLE))
    b = load_file(str(out / "checkpoints" / "checkpoint-000004" / checkpoint.TRAINABLE))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fp8_frozen_weights_keep_lora_trainable():
    from cogpipe.lora import add_lora

    cfg = load_config(RECIPE, ["data.root=x", "output_dir=y", "model.weight_dtype=bf16", "model.fp8_frozen=true",
                               "model.pretrained=null", "model.preset=tiny"])
    t = models.build_transformer(cfg.model, torch.bfloat16)
    t.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    add_lora(t, cfg.lora)
    q = t.transformer_blocks[0].attn1.to_q
    assert q.base_layer.weight.dtype == torch.float8_e4m3fn
    assert q.lora_A["default"].weight.dtype == torch.float32 and q.lora_A["default"].weight.requires_grad
    x = torch.randn(1, 5, 16, 8, 8, dtype=torch.bfloat16)
    out = t(hidden_states=x, encoder_hidden_states=torch.randn(1, 48, 32, dtype=torch.bfloat16),
            timestep=torch.tensor([10]), return_dict=False)[0]
    out.float().pow(2).mean().backward()
    assert q.lora_B["default"].weight.grad is not None


def test_switch_rules():
    with pytest.raises(ConfigError, match="model.fp8_frozen"):
        load_config(RECIPE, ["model.fp8_frozen=true", "model.weight_dtype=bf16", "train.mode=full"])
    with pytest.raises(ConfigError, match="model.fp8_frozen"):
        load_config(RECIPE, ["model.fp8_frozen=true"])  # fp32 compute
    with pytest.raises(ConfigError, match="train.ema_decay"):
        load_config(RECIPE, ["train.ema_decay=1.5"])


def test_adamw8bit_without_bitsandbytes_says_what_to_do(monkeypatch):
    import builtins

    from cogpipe.optim import make_optimizer

    real_import = builtins.__import__

    def no_bnb(name, *a, **k):
        if name == "bitsandbytes":
            raise ModuleNotFoundError("No module named 'bitsandbytes'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    cfg = load_config(RECIPE, ["train.optimizer=adamw8bit"])
    with pytest.raises(ConfigError, match="train.optimizer: adamw8bit needs bitsandbytes"):
        make_optimizer(cfg.train, [torch.nn.Parameter(torch.zeros(2))])


def test_logit_normal_timesteps_follow_their_distribution():
    from cogpipe.data.batches import Draws, draw_batch
    from cogpipe.diffusion import sample_timestep

    g = torch.Generator().manual_seed(0)
    t = torch.cat([sample_timestep(1000, g, "logit_normal", 0.5, 1.0) for _ in range(4000)]).float()
    assert 0 <= t.min() and t.max() <= 999
    # t / 1000 = sigmoid(N(0.5, 1)): median sigmoid(0.5) = 0.62; a quarter below sigmoid(0.5 - 0.674) = 0.46
    assert abs(t.median().item() - 622) < 20 and abs((t < 457).float().mean().item() - 0.25) < 0.03
    u = torch.cat([sample_timestep(1000, g) for _ in range(4000)]).float()
    assert abs(u.median().item() - 500) < 30 and abs((u < 250).float().mean().item() - 0.25) < 0.03
    # the training batch draws its timesteps with the chosen sampling, per example and reproducibly
    batch = {"mean": torch.zeros(64, 16, 2, 4, 4), "std": torch.ones(64, 16, 2, 4, 4),
             "prompt_embeds": torch.zeros(64, 3, 8)}

    def draw(sampling, mean, std):
        draws = Draws(seed=0, num_timesteps=1000, timestep_sampling=sampling, logit_mean=mean, logit_std=std)
        return draw_batch(_examples(batch), micro_step=0, rank=0, world=1, draws=draws, device="cpu").timesteps.float()

    shifted = draw("logit_normal", 2.0, 0.5)  # sigmoid(2 +- 1.5) is above 0.6 with probability 0.9987
    assert (shifted > 600).float().mean() > 0.95 and torch.equal(shifted, draw("logit_normal", 2.0, 0.5))
    assert (draw("uniform", 0.0, 1.0) > 600).float().mean() < 0.6


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_loss_and_gradients():
    """train.compile: every CogVideoXBlock compiled in place (regional), the forward and backward as eager's."""
    from cogpipe.config import LoraConfig, ModelConfig
    from cogpipe.diffusion import rotary_embeddings
    from cogpipe.lora import add_lora

    results = []
    for compiled in (False, True):
        t = models.build_transformer(ModelConfig(preset="tiny"), torch.float32)
        torch.manual_seed(0)  # peft draws lora_A from the global generator: the same adapter for both
        add_lora(t, LoraConfig(rank=4, alpha=4))
        if compiled:
            models.compile_blocks(t)
            assert all(b._compiled_call_impl is not None for b in t.transformer_blocks)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 5, 16, 8, 8, generator=g)
        text = torch.randn(1, 48, 32, generator=g)
        rope = rotary_embeddings(dict(t.config), 5, 8, 8, "cpu")
        out = t(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([500]), image_rotary_emb=rope,
                return_dict=False)[0]
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in t.named_parameters() if p.requires_grad}))
    (eager, eager_grads), (comp, comp_grads) = results
    torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-5)
    assert any(g.abs().max() > 0 for g in eager_grads.values())
    for n, grad in eager_grads.items():
        torch.testing.assert_close(comp_grads[n], grad, rtol=1e-3, atol=1e-6)


def _examples(batch: dict) -> list[dict]:
    """The examples of a stacked batch, as the loader hands them to draw_batch."""
    return [{k: v[j] for k, v in batch.items()} for j in range(len(batch["mean"]))]
