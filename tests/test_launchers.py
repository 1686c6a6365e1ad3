"""Every launch config in configs/accelerate/ on 2 CPU processes, launched as docs/multi_gpu.md launches it; the
process count, a free port and the CPU switch are the only differences. DDP runs on gloo (ACCELERATE_USE_CPU=1);
DeepSpeed ZeRO-2/3 on DeepSpeed's CPU accelerator and FSDP2 through torch's fully_shard on gloo, both with
DS_ACCELERATOR=cpu, under which cogpipe.sharding.allow_cpu_sharding lets accelerate count their ranks.

Each launcher trains LoRA and a full fine-tune with checkpoints, is SIGKILLed in step 3, resumes to the end and
exports; the final weights equal one process's with the same global batch."""

import os

import pytest
import torch
from safetensors.torch import load_file

from cogpipe import checkpoint

from helpers import launch, run_tiny

pytest.importorskip("deepspeed")  # the [deepspeed] extra, which CI installs

FULL = {"train.mode": "full"}

def _weights(out, step=4):
    return load_file(str(out / "checkpoints" / f"checkpoint-{step:06d}" / checkpoint.TRAINABLE))


@pytest.fixture(scope="module")
def reference(trained, clips, tmp_path_factory):
    """One process, batch 2: the LoRA run of conftest's `trained`, and the same recipe as a full fine-tune."""
    base = tmp_path_factory.mktemp("one-full")
    out, _ = run_tiny(clips, base / "out", trained[2], **FULL)
    return {"lora": _weights(trained[0]), "full": _weights(out)}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("launcher", ["ddp", "zero2", "zero3", "fsdp"])
def test_killed_then_resumed_equals_one_process(launcher, mode, reference, clips, trained, tmp_path):
    if launcher == "ddp" and mode == "lora":
        pytest.skip("DDP LoRA: tests/test_multiprocess.py (the same launch)")
    extra = FULL if mode == "full" else {}
    out = tmp_path / "out"
    killed = launch(launcher, clips, out, trained[2], "train-step:3", check=False, **extra)
    assert killed.returncode != 0 and (out / "checkpoints" / "latest").read_text().strip() == "checkpoint-000002"
    r = launch(launcher, clips, out, trained[2], **{"train.resume_from": "latest", **extra})
    assert "resumed from" in r.stdout + r.stderr
    final = _weights(out)
    assert set(final) == set(reference[mode])
    tolerance = dict(rtol=1e-4, atol=2e-5) if mode == "full" else dict(rtol=1e-5, atol=1e-6)  # as test_full_finetune
    for k, v in reference[mode].items():
        torch.testing.assert_close(final[k], v, **tolerance)
    assert (out / "export" / "model_index.json").is_file()
    from diffusers import CogVideoXTransformer3DModel

    exported = CogVideoXTransformer3DModel.from_pretrained(out / "export" / "transformer")
    if mode == "full":
        for k, v in final.items():
            torch.testing.assert_close(exported.state_dict()[k], v)
    else:
        assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    if launcher == "zero2" and mode == "lora":  # DeepSpeed's checkpoint: trainable and optimizer state only
        from cogpipe.weights import open_state_dict

        states = out / "checkpoints" / "checkpoint-000004" / "pytorch_model" / "mp_rank_00_model_states.pt"
        saved = open_state_dict(states, master_weights=False)
        assert saved and all(".lora_" in k for k in saved), sorted(saved)[:5]
        lora = sum(v.numel() * 4 for v in final.values())
        base = sum(p.numel() * 4 for p in exported.parameters())
        assert states.stat().st_size < lora + 64_000 < base, (states.stat().st_size, lora, base)  # + pickle, config


@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_skips_the_step_on_all(clips, trained, tmp_path):
    """ZeRO-2 discards the update of a window where one rank's loss is NaN, and counts it, ending on the weights
    of one process that skipped the same step."""
    os.environ["COGPIPE_FAILPOINT"] = "loss:2:*=NAN"  # the reference: one process skipping the same step
    try:
        one, _ = run_tiny(clips, tmp_path / "one-nan", trained[2])
    finally:
        del os.environ["COGPIPE_FAILPOINT"]
    out = tmp_path / "zero2"
    launch("zero2", clips, out, trained[2], "loss:2:1=NAN")
    state = checkpoint.read_state(out / "checkpoints" / "checkpoint-000004")
    assert state["skipped_steps"] == 1
    assert checkpoint.read_state(one / "checkpoints" / "checkpoint-000004")["skipped_steps"] == 1
    ref, got, clean = _weights(one), _weights(out), _weights(trained[0])
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)
    assert max((ref[k] - clean[k]).abs().max().item() for k in ref) > 1e-4  # the skip changed the outcome


@pytest.mark.slow
def test_validation_under_zero3_with_more_prompts_than_processes(clips, trained, tmp_path):
    """3 prompts on 2 processes: the prompt list is padded so both run the same number of sharded forwards."""
    prompts = "[a purple square moving left,a purple circle moving up,a purple triangle moving down]"
    out = tmp_path / "out"
    launch("zero3", clips, out, trained[2], **{"train.max_steps": 2, "train.checkpoint_every": 0,
                                                "validation.every": 1, "validation.prompts": prompts,
                                                "train.collective_timeout_min": 3})
    assert sorted(p.name for p in (out / "validation").glob("step-000001-*.mp4")) == [
        "step-000001-0.mp4", "step-000001-1.mp4", "step-000001-2.mp4"]
