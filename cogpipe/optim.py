"""The optimizer step: AdamW (fused where the device has the kernel) or 8-bit AdamW, a step skipped on the device
when a loss was not finite, and the EMA of the trained weights."""

from __future__ import annotations

import torch

from cogpipe.config import ConfigError


def make_optimizer(train_cfg, params, device_type: str = "cpu"):
    """AdamW, fused where the device has the kernel (one kernel a step, and it skips a non-finite step on the
    device: see step_unless_skipped); or bitsandbytes' 8-bit AdamW."""
    kwargs = dict(lr=train_cfg.lr, betas=tuple(train_cfg.adam_betas), eps=train_cfg.adam_eps,
                  weight_decay=train_cfg.weight_decay)
    if train_cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, fused=device_type in ("cuda", "cpu"), **kwargs)
    try:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    except Exception as e:  # not installed, or no build for this device
        raise ConfigError(f"train.optimizer: adamw8bit needs bitsandbytes with support for this device "
                          f"(pip install bitsandbytes; a CUDA GPU): {type(e).__name__}: {e}. "
                          f"Use train.optimizer=adamw instead") from None


@torch.no_grad()
def update_ema(ema: dict, weights: dict, decay: float, skipped: torch.Tensor | None = None) -> None:
    """ema <- decay * ema + (1 - decay) * weights, for every trained parameter (`weights`: {name: tensor shaped as
    its EMA entry: the whole weight, or this process's shard of it}); unchanged where `skipped` (a device scalar,
    1. for a step whose update was skipped) says so, without the host looking at it."""
    weight = (1.0 - decay) * (1.0 - skipped) if skipped is not None else 1.0 - decay
    for name, w in weights.items():
        ema[name].lerp_(w.detach().float(), weight)


def step_unless_skipped(optimizer, skipped: torch.Tensor) -> None:
    """The optimizer step unless `skipped`, without the host waiting for the device where the optimizer allows it:
    fused AdamW takes the flag as found_inf and skips on the device (as torch's GradScaler has it do); under fp16's
    GradScaler the wrapper's step goes through the scaler, whose own found_inf (non-finite gradients, which a
    non-finite loss always leaves) skips on the device, fused AdamW taking it as above; only an optimizer with
    neither (8-bit AdamW in bf16/fp32) has the host read the flag."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    if getattr(optimizer, "scaler", None) is not None:
        optimizer.step()  # scaler.step + scaler.update: the skip and the scale's back-off stay on the device
    elif inner.defaults.get("fused"):
        inner.found_inf = skipped
        inner.step()  # the wrapper would only forward the call, after two package probes a step (lomo)
        inner.zero_grad(set_to_none=True)
        return
    elif not skipped.item():
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
