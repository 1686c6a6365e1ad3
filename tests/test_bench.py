"""bench/train_step.py runs at tiny size on CPU and prints one JSON line; its FLOP count is what torch counts."""

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cogpipe import plan

from helpers import REPO  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_cpu_run_prints_one_json_line(tmp_path):
    out = tmp_path / "result.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(REPO / "bench" / "train_step.py"), "--size", "tiny", "--steps", "3",
                        "--warmup", "1", "--gradient-checkpointing", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [line for line in p.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    r = json.loads(lines[0])
    assert json.loads(out.read_text()) == r
    assert (r["size"], r["mode"], r["dtype"], r["device"]) == ("tiny", "lora", "bf16", "cpu")
    assert (r["frames"], r["height"], r["width"], r["batch"], r["gradient_checkpointing"]) == (17, 64, 64, 1, True)
    assert r["latent_shape"] == [1, 5, 16, 8, 8] and r["tokens"] == {"video": 80, "text": 48, "total": 128}
    assert len(r["step_times_s"]) == 3 and min(r["step_times_s"]) > 0
    assert r["step_time_s_median"] == pytest.approx(statistics.median(r["step_times_s"][1:]))  # after warm-up
    assert r["samples_per_s"] == pytest.approx(1 / r["step_time_s_median"])
    assert 0.05 < r["peak_memory_gb"] < 20 and r["peak_memory_kind"].startswith("peak RSS")
    assert r["mfu"] is None and r["peak_flops"] is None  # no peak to compare with on CPU
    assert r["flops_per_step"] > 0
    assert r["tflops_per_s"] == pytest.approx(r["flops_per_step"] / r["step_time_s_median"] / 1e12)
    assert r["trainable_params"] < r["params"] and r["lora_rank"] == 8
    assert math.isfinite(r["loss_first"]) and math.isfinite(r["loss_last"])
    assert r["torch"] == torch.__version__ and r["diffusers"] and r["python"]


def _tiny_config(**extra):
    from diffusers import CogVideoXTransformer3DModel

    from cogpipe.models import _with_defaults

    return _with_defaults(CogVideoXTransformer3DModel, dict(
        num_attention_heads=2, attention_head_dim=32, num_layers=3, time_embed_dim=64, text_embed_dim=48,
        sample_height=16, sample_width=16, sample_frames=17, max_text_seq_length=24,
        use_rotary_positional_embeddings=True, **extra))


@pytest.mark.parametrize("variant,mode", [("1.0", "full"), ("1.5-i2v", "lora")])
def test_flop_count_matches_torch_flop_counter(variant, mode):
    """Forward FLOPs equal torch's FlopCounterMode exactly (math SDPA, so attention is counted as matmuls).
    A training step counts the convention (3x forward; LoRA: 2x frozen linears + 3x attention + 3x adapters),
    which includes input gradients the first layers never compute (their inputs need none): a few percent
    more than torch counts at this tiny size, and less than 1% at real sizes."""
    from diffusers import CogVideoXTransformer3DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from cogpipe.config import LoraConfig
    from cogpipe.diffusion import rotary_embeddings
    from cogpipe.lora import add_lora

    extra = dict(patch_size_t=2, patch_bias=False, in_channels=32, ofs_embed_dim=64) if variant == "1.5-i2v" else {}
    transformer_config = _tiny_config(**extra)
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(**transformer_config)
    if mode == "lora":
        add_lora(model, LoraConfig(rank=4, alpha=4))
    else:
        model.requires_grad_(True)
    B = 2
    shape = plan.token_shape(transformer_config, 17, 128, 128, B)
    F = shape["latent_frames"]
    kwargs = dict(hidden_states=torch.randn(B, F, transformer_config["in_channels"], 16, 16),
                  encoder_hidden_states=torch.randn(B, 24, 48), timestep=torch.tensor([3, 700]),
                  ofs=torch.full((B,), 2.0) if transformer_config["ofs_embed_dim"] else None,
                  image_rotary_emb=rotary_embeddings(transformer_config, F, 16, 16, "cpu"), return_dict=False)
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as forward:
            model(**kwargs)
        with FlopCounterMode(display=False) as step:
            model(**kwargs)[0].float().square().mean().backward()
    rank = 4 if mode == "lora" else 0
    assert forward.get_total_flops() == plan.forward_flops(transformer_config, shape, rank, TARGETS)["total"]
    formula = plan.train_flops(transformer_config, shape, mode, rank, TARGETS)
    assert step.get_total_flops() <= formula <= step.get_total_flops() * 1.06


@pytest.mark.slow
def test_gpu_check_runs_its_code_paths_tiny_on_the_cpu(tmp_path):
    """bench/gpu_check.py --tiny: the real-path run (hub layout, train with validation, export, render, infer.py)
    and every recipe's step benchmark, at toy sizes, so the script a GPU session runs is known to work."""
    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--tiny", "--out", str(out),
                        "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = json.loads(out.read_text())
    run = report["parts"]["run"]
    assert run["train"]["steps"] == 2 and run["train"]["video_shape"] == [17, 64, 64, 3]
    assert run["train"]["validation_videos"] == ["step-000001-0.mp4", "step-000002-0.mp4"]
    assert run["infer"]["exit"] == 0 and run["infer"]["video_shape"] == [17, 64, 64, 3]
    assert list(report["parts"]) == ["steps-2b", "steps-5b", "steps-1.5", "caption", "run", "memory", "inference"]
    cap = report["parts"]["caption"]["fp32"]  # the tiny captioner on the CPU: fp32 (cogpipe/devices.py)
    assert cap["clips_per_min"] > 0 and all(n > 0 for n in cap["caption_chars"])
    assert "error" not in report["parts"]["inference"] and report["parts"]["inference"]["modes"]["eager"]["s_per_step"]
    assert report["parts"]["memory"]["runs"] and all("error" not in r for r in report["parts"]["memory"]["runs"])
    steps = [report["parts"][name] for name in ("steps-2b", "steps-5b", "steps-1.5")]
    assert [(s["like"], s["mode"], s["dtype"], s["steps"]) for s in steps] == [
        ("2b", "lora", "fp16", 2), ("5b", "lora", "bf16", 2), ("1.5-5b", "lora", "bf16", 2)]
    assert steps[0]["grad_scaler"] and all(s["fused_adamw"] for s in steps)  # 2B as its recipe: fp16, GradScaler
    assert all(s["step_time_s_median"] > 0 and s["flops_per_step"] > 0 and s["stage_wall_s"] > 0 for s in steps)


def test_gpu_check_records_a_failing_stage_and_runs_the_next(tmp_path, monkeypatch):
    """A stage that fails (here: a timeout of its own) is recorded in the JSON, written before the next runs."""
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_check

    def slow(work, tiny, partial):
        gpu_check.write_json(partial, {"first": "written"})
        import time

        time.sleep(60)

    seen = []
    monkeypatch.setattr(gpu_check, "STAGES", [("slow", 0.01, slow), ("next", 0.01, lambda w, t, p: {"ok": 1})])
    monkeypatch.setattr(gpu_check, "launch_stage", _in_process(gpu_check, seen))
    monkeypatch.setattr(gpu_check, "MIN_STAGE_S", 1)  # each stage gets 1% of the budget: 3 s
    out = tmp_path / "g.json"
    assert gpu_check.main(["--out", str(out), "--work", str(tmp_path / "w"), "--budget-min", "5"]) == 1
    report = json.loads(out.read_text())
    assert report["parts"]["slow"]["first"] == "written" and "timeout" in report["parts"]["slow"]["error"]
    assert report["parts"]["next"]["ok"] == 1 and seen == ["slow", "next"]


def _in_process(gpu_check, seen):
    """gpu_check.launch_stage in a thread of this process (the test's stages are not importable by a child), with the
    timeout honoured."""
    import threading

    def run(cmd, timeout):
        name, partial = cmd[cmd.index("--stage") + 1], Path(cmd[cmd.index("--out") + 1])
        seen.append(name)
        worker = threading.Thread(target=gpu_check.run_stage, args=(name, partial.parent, False, partial), daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            raise subprocess.TimeoutExpired(cmd, timeout)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def test_convert_bench_tiny_reports_both_directions_against_cp(tmp_path):
    """bench/convert.py at tiny size: both directions timed against `cp` of the same bytes in the same run, the
    round trip checked bit for bit (the script asserts it), one JSON line."""
    p = subprocess.run([sys.executable, str(REPO / "bench" / "convert.py"), "--size", "tiny", "--repeat", "2",
                        "--workdir", str(tmp_path / "work")], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [line for line in p.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    r = json.loads(lines[0])
    assert r["size"] == "tiny" and set(r["directions"]) == {"sat->diffusers", "diffusers->sat"}
    for d in r["directions"].values():
        assert [run["order"] for run in d["runs"]] == ["cp first", "conversion first"]
        for run in d["runs"]:
            assert run["ratio"] == pytest.approx(run["convert_wall_s"] / run["cp_sync_s"], rel=1e-2)
            assert run["cp_sync_s"] >= run["cp_s"] > 0 and 0 < run["convert_peak_rss_mib"] < 1024
        assert d["ratio"] == pytest.approx(statistics.median(run["ratio"] for run in d["runs"]), rel=1e-3)
    assert r["machine"]["cores"] == os.cpu_count() and r["machine"]["disk"]["filesystem"]
    assert "evicted" in r["page_cache"] and not (tmp_path / "work").exists()
