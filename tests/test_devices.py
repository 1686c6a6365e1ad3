"""The device and dtype policy (cogpipe/devices.py): its choices on CPU-only, CUDA and MPS machines."""

import os

import pytest
import torch

from cogpipe import devices


@pytest.fixture
def machine(monkeypatch):
    def set_machine(cuda: bool = False, mps: bool = False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)

    return set_machine


def test_inference_prefers_cuda_then_mps_then_cpu(machine):
    machine(cuda=True, mps=True)
    assert devices.inference_device().type == "cuda"
    machine(cuda=False, mps=True)
    assert devices.inference_device().type == "mps"
    machine()
    assert devices.inference_device().type == "cpu"
    assert devices.inference_device("cpu").type == "cpu"  # --device overrides
    with pytest.raises(ValueError, match="--device cuda: CUDA is not available"):
        devices.inference_device("cuda")


def test_inference_dtype_is_bf16_on_gpus_fp16_where_the_card_says_fp32_on_cpu():
    cuda, cpu, mps = torch.device("cuda"), torch.device("cpu"), torch.device("mps")
    assert devices.inference_dtype(cuda) == torch.bfloat16
    assert devices.inference_dtype(cuda, card_dtype="fp16") == torch.float16  # CogVideoX-2B's card
    assert devices.inference_dtype(mps) == torch.float16
    assert devices.inference_dtype(cpu) == torch.float32
    assert devices.inference_dtype(cpu, card_dtype="fp16") == torch.float32  # half precision is slow on a CPU
    assert devices.inference_dtype(cpu, requested="bf16") == torch.bfloat16  # --dtype overrides
    with pytest.raises(ValueError, match="--dtype must be one of"):
        devices.inference_dtype(cpu, requested="int8")


def test_encoders_are_bf16_on_a_gpu_for_every_recipe_and_fp32_on_cpu():
    assert devices.encoder_dtype(torch.device("cuda")) == torch.bfloat16
    assert devices.encoder_dtype(torch.device("cpu")) == torch.float32


def test_rendering_computes_in_the_training_dtype():
    assert devices.compute_dtype("bf16", torch.bfloat16, "lora") == torch.bfloat16
    assert devices.compute_dtype("bf16", torch.float32, "full") == torch.bfloat16  # autocast dtype, not fp32 masters
    assert devices.compute_dtype("no", torch.bfloat16, "lora") == torch.bfloat16  # the frozen base's dtype
    assert devices.compute_dtype("no", torch.bfloat16, "full") == torch.float32


def test_tiled_decoding_is_used_only_where_its_tiles_give_the_exact_size():
    from diffusers import AutoencoderKLCogVideoX

    from cogpipe.inference import tiled_decode_size

    real = AutoencoderKLCogVideoX.from_config({"block_out_channels": [128, 256, 256, 512], "layers_per_block": 3})
    real.enable_tiling()
    assert tiled_decode_size(real, 60, 90, 8) == (480, 720)  # CogVideoX 1.0
    assert tiled_decode_size(real, 96, 170, 8) == (768, 1360)  # CogVideoX 1.5
    tiny = AutoencoderKLCogVideoX.from_config({"block_out_channels": [16, 16, 16, 16], "norm_num_groups": 4,
                                               "sample_height": 64, "sample_width": 64})
    tiny.enable_tiling()
    assert tiled_decode_size(tiny, 8, 8, 8) == (70, 68)  # what the tiled decode really gives: not 64 x 64
    with torch.no_grad():
        assert tiny.decode(torch.zeros(1, 16, 2, 8, 8)).sample.shape[-2:] == (70, 68)


def test_cpu_threads_the_request_then_the_shared_machine_then_the_cores_a_process(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("COGPIPE_CPU_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what `accelerate launch` sets: not read
    assert devices.cpu_threads() == cores and devices.cpu_threads(3) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))  # more processes than cores: one thread each
    assert devices.cpu_threads() == 1
    monkeypatch.setenv("COGPIPE_CPU_THREADS", "5")  # jobs sharing the machine say their share
    assert devices.cpu_threads() == 5 and devices.cpu_threads(2) == 2
    for bad in ("0", "two"):
        monkeypatch.setenv("COGPIPE_CPU_THREADS", bad)
        with pytest.raises(ValueError, match=f"^COGPIPE_CPU_THREADS: '{bad}' is not a thread count"):
            devices.cpu_threads()
