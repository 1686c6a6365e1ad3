"""Full fine-tuning: every transformer weight trains; the export is a transformer folder that
from_pretrained loads directly, with the trained weights. Full fine-tuning on 2 processes (DDP, ZeRO-2/3, FSDP2),
killed and resumed, equal to one process: tests/test_launchers.py."""

import pytest
import torch
from safetensors.torch import load_file

from cogpipe import checkpoint, models

from helpers import run_tiny

FULL = {"train.mode": "full", "train.lr": 1e-3}


@pytest.fixture(scope="module")
def full_run(clips, trained):
    out, cfg = run_tiny(clips, trained[0].parent / "full", trained[2], **FULL)
    return out, cfg


def test_every_weight_trains_and_exports(full_run):
    from diffusers import CogVideoXTransformer3DModel

    out, cfg = full_run
    state = load_file(str(out / "checkpoints" / "checkpoint-000004" / checkpoint.TRAINABLE))
    fresh = models.build_transformer(cfg.model, torch.float32).state_dict()
    assert set(state) == set(fresh)
    changed = [k for k in fresh if not torch.equal(state[k], fresh[k])]
    assert len(changed) > 0.9 * len(fresh)
    loaded, info = CogVideoXTransformer3DModel.from_pretrained(out / "export", subfolder="transformer",
                                                               output_loading_info=True)
    assert not any(info.values()), info
    assert all(torch.equal(loaded.state_dict()[k], state[k]) for k in state)
    assert not (out / "lora").exists()


def test_the_export_holds_a_comfyui_native_transformer_that_converts_back_exactly(full_run, tmp_path):
    from cogpipe.convert import convert
    from cogpipe.weights import load_state_dict

    from fixtures import comfy

    out, cfg = full_run
    native, = (out / "export" / "comfyui").glob("*_comfyui_core.safetensors")
    assert native.name == f"{out.resolve().name}_comfyui_core.safetensors"
    tensors = load_file(str(native))
    config = dict(models.build_transformer(cfg.model, torch.float32).config)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == comfy.port_shapes(config)  # the port's tensors
    convert(native, tmp_path / "back")
    state = load_file(str(out / "checkpoints" / "checkpoint-000004" / checkpoint.TRAINABLE))
    back = load_state_dict(tmp_path / "back")
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
