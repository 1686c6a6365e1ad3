"""Low-VRAM switches (cogpipe/offload.py): block swapping, activation offload and int8 storage give the plain
path's gradients; their hooks run in the order they must; the simulation (`cogpipe plan --simulate`) sees them."""

import pytest
import torch
from safetensors.torch import load_file

from cogpipe import checkpoint, family, offload
from cogpipe.config import ConfigError, load_config
from cogpipe.diffusion import RotaryTables, diffusion_loss, model_inputs
from cogpipe.lora import add_lora

from helpers import NEEDS_TORCHAO, REPO, run_tiny

RECIPE = REPO / "configs" / "tiny_lora.yaml"
LAYERS = 3  # the tiny preset's shapes with one block more than its two: a swapped block between two others


def _cfg(*overrides):
    return load_config(RECIPE, ["data.root=x", "output_dir=y", "model.pretrained=null", "model.preset=tiny",
                                "train.gradient_checkpointing=true", "lora.rank=4", *overrides], validate_model=False)


def _model(cfg, dequantized_from=None):
    """The tiny transformer (3 blocks, seeded), the recipe's storage, a LoRA, checkpointing, the offload switches.
    dequantized_from: a model of `_model` whose int8 block weights this one takes, dequantized (the reference)."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    t = CogVideoXTransformer3DModel(**dict(family.variant("tiny").transformer, num_layers=LAYERS))
    t = t.to(family.DTYPES[cfg.model.weight_dtype])
    if cfg.model.fp8_frozen:
        t.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    offload.quantize_frozen(t, cfg.model)
    if dequantized_from is not None:
        with torch.no_grad():
            for name, p in dequantized_from.named_parameters():
                if type(p).__name__ == "Int8Tensor":
                    t.get_parameter(name.replace(".base_layer", "")).copy_(p.dequantize())
    add_lora(t, cfg.lora)
    t.enable_gradient_checkpointing()
    off = offload.apply(t, cfg.train, torch.device("cpu"), record=True)
    return t, off


def _inputs(t, dtype=torch.float32):
    tc = dict(t.config)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 1, 5, 16, 8, 8, generator=g)  # each (B, F, C, H, W): 17 frames, 64x64, as latents
    prompt = torch.randn(1, tc["max_text_seq_length"], tc["text_embed_dim"], generator=g)
    alphas = torch.linspace(0.999, 0.01, 1000)
    return model_inputs(x0, noise, torch.tensor([500]), prompt, None, transformer_config=tc, alphas_cumprod=alphas,
                        rotary=RotaryTables(tc), dtype=dtype)


def _step(t, dtype=torch.float32):
    """One training step's loss and LoRA gradients, cogpipe's own model inputs and loss."""
    inputs = _inputs(t, dtype)
    loss = diffusion_loss(t(**inputs.kwargs)[0], inputs.target)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in t.named_parameters() if p.requires_grad}
    t.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _equal(a, b):
    assert torch.equal(a[0], b[0])
    assert a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.fixture(scope="module")
def plain():
    return _step(_model(_cfg())[0])


def test_block_swap_is_exact_and_fetches_in_order(plain):
    t, off = _model(_cfg("train.blocks_to_swap=2"))
    swap = off.swap
    frozen = t.transformer_blocks[1].attn1.to_q.base_layer.weight
    assert frozen.numel() == 0  # swapped out: only the host copy holds it
    assert t.transformer_blocks[2].attn1.to_q.base_layer.weight.numel() > 0  # not swapped
    assert t.transformer_blocks[1].attn1.to_q.lora_A["default"].weight.numel() > 0  # trained weights stay
    _equal(_step(t), plain)
    # forward 0, 1, 2 (block 0 fetched with 1 prefetched, 0 dropped when 1 starts); the checkpointed backward runs
    # the blocks again in reverse, prefetching the one before
    assert swap.events == [("fetch", 0), ("wait", 0), ("fetch", 1), ("release", 0), ("wait", 1),
                           ("release", 1), ("fetch", 1), ("wait", 1), ("fetch", 0), ("release", 1), ("wait", 0)]
    swap.events.clear()
    _equal(_step(t), plain)  # the second step starts with block 0 still there from the backward
    assert swap.events[:3] == [("wait", 0), ("fetch", 1), ("release", 0)]
    assert off.mover.copies["to_device"] > 0 and off.mover.bytes["to_host"] == swap.bytes_per_step() // 2
    assert set(swap.resident) == {0}
    # a forward without gradients (validation during training) fetches in forward order and gives the same output
    swap.events.clear()
    reference = _model(_cfg())[0]
    with torch.no_grad():
        assert torch.equal(t(**_inputs(t).kwargs)[0], reference(**_inputs(reference).kwargs)[0])
    assert [e for e in swap.events if e[0] == "wait"] == [("wait", 0), ("wait", 1)]


def test_activation_offload_is_exact_and_copies_every_blocks_inputs(plain):
    t, off = _model(_cfg("train.activation_offload=true"))
    result = _step(t)
    _equal(result, plain)
    tc = dict(t.config)
    hidden = 5 * 4 * 4 * tc["num_attention_heads"] * tc["attention_head_dim"] * 4  # batch 1 x tokens x H, fp32
    text = tc["max_text_seq_length"] * tc["num_attention_heads"] * tc["attention_head_dim"] * 4
    assert off.mover.copies == {"to_host": 2 * LAYERS, "to_device": 2 * LAYERS}  # hidden + text states a block
    assert off.activations.moved == 2 * LAYERS * (hidden + text)  # out and back


@NEEDS_TORCHAO
def test_int8_storage_computes_with_the_dequantized_weights():
    quantized, _ = _model(_cfg("model.quantize_frozen=int8"))
    weight = quantized.transformer_blocks[0].attn1.to_q.base_layer.weight
    assert type(weight).__name__ == "Int8Tensor" and weight.qdata.dtype == torch.int8
    reference, _ = _model(_cfg(), dequantized_from=quantized)
    loss, grads = _step(quantized)
    ref_loss, ref_grads = _step(reference)
    # torchao scales each row after the int8 product (x @ q^T * s), the reference before (x @ (q s)^T): the same
    # numbers rounded in another order, fp32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("storage", [pytest.param("model.quantize_frozen=int8", marks=NEEDS_TORCHAO),
                                     "model.fp8_frozen=true"])
def test_the_switches_compose_with_int8_and_fp8_storage(storage):
    dtype = ["model.weight_dtype=bf16", "train.mixed_precision=bf16"] if "fp8" in storage else []
    alone = _step(_model(_cfg(storage, *dtype))[0], torch.bfloat16 if dtype else torch.float32)
    t, off = _model(_cfg(storage, *dtype, "train.blocks_to_swap=3", "train.activation_offload=true"))
    _equal(_step(t, torch.bfloat16 if dtype else torch.float32), alone)
    assert ("fetch", 2) in off.swap.events and off.activations.moved > 0


def test_switch_rules():
    with pytest.raises(ConfigError, match="train.blocks_to_swap"):
        _cfg("train.blocks_to_swap=2", "train.gradient_checkpointing=false")
    with pytest.raises(ConfigError, match="train.activation_offload"):
        _cfg("train.activation_offload=true", "train.gradient_checkpointing=false")
    with pytest.raises(ConfigError, match="train.blocks_to_swap"):
        _cfg("train.blocks_to_swap=2", "train.mode=full")
    with pytest.raises(ConfigError, match="model.quantize_frozen"):
        _cfg("model.quantize_frozen=int8", "model.fp8_frozen=true", "model.weight_dtype=bf16")
    with pytest.raises(ConfigError, match="model.quantize_frozen"):
        _cfg("model.quantize_frozen=nf4")
    with pytest.raises(ValueError, match="train.blocks_to_swap"):
        _model(_cfg("train.blocks_to_swap=4"))  # 3 blocks
    with pytest.raises(ConfigError, match="train.blocks_to_swap"):
        offload.apply(_model(_cfg())[0], _cfg("train.blocks_to_swap=1").train, torch.device("cpu"), launcher="fsdp")


@pytest.mark.slow
def test_training_with_the_switches_gives_the_same_weights(trained, clips, tmp_path):
    out, _ = run_tiny(clips, tmp_path / "swap", trained[2], **{
        "train.gradient_checkpointing": True, "train.blocks_to_swap": 1, "train.activation_offload": True})
    a = load_file(str(trained[0] / "checkpoints" / "checkpoint-000004" / checkpoint.TRAINABLE))
    b = load_file(str(out / "checkpoints" / "checkpoint-000004" / checkpoint.TRAINABLE))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_int8_storage_without_torchao_stops_the_run_before_it_starts(tmp_path, monkeypatch):
    import importlib.util

    from cogpipe.training import train

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else
                        find_spec(name, *a))
    cfg = load_config(REPO / "configs" / "tiny_lora.yaml", ["model.quantize_frozen=int8",
                                                            f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(ConfigError, match=r'model.quantize_frozen=int8 needs torchao: pip install -e "\.\[quantize\]"'):
        train(cfg)
    assert not (tmp_path / "out").exists()
