"""Sequence parallel (cogpipe/sequence_parallel.py): the transformer across 2 and 4 CPU processes (gloo) gives one
process's output and parameter gradients for every position scheme; SP x DP training from a latent store, killed
and resumed, equals one process; the size checks."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from cogpipe import checkpoint
from cogpipe import sequence_parallel as sp

from helpers import REPO, assert_store_reads, free_port, launch, store_from_folder

# fp64 throughout: the SP run sums the same products in another order (tokens split over ranks, gradients summed
# over the group), so the results differ by rounding only: about 1e-16 of the values' scale a step; 1e-12 of the
# scale leaves room for the few hundred additions of these sizes and fails on any real error (a missing or
# doubled part is of the order of the values themselves)
REL = 1e-12


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    """One launch of 4 processes: SP 2 (x DP 2: two groups of 2 processes) and SP 4, every variant."""
    out = tmp_path_factory.mktemp("sp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port",
           str(free_port()), str(REPO / "tests" / "sp_equality.py"), str(out)]
    r = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [json.loads((out / f"rank{i}.json").read_text()) for i in range(4)]


@pytest.mark.slow
def test_output_and_every_gradient_equal_one_process(four):
    from sp_equality import VARIANTS

    names = {f"sp{n}/{v[0]}" for n in (2, 4) for v in VARIANTS}
    for rank, report in enumerate(four):
        assert set(report) == names
        for name, r in report.items():
            assert r["output"] <= REL * r["output_scale"], (rank, name, r)
            assert r["grad"] <= REL * r["grad_scale"], (rank, name, r)
            assert r["zero_grads"] == [], (rank, name)  # every parameter's gradient was compared, none trivially
            assert r["restored"] == 0.0  # disable() gives back the model's own attention
            # per block: the q/k/v and output all-to-alls forward and back, the text heads' reduce-scatter; twice
            # that again where gradient checkpointing recomputes the forward
            checkpointed = name.endswith("ofs")
            assert r["all_to_all"] == 2 * (5 + 2 * checkpointed), (name, r)
            assert r["all_gather"] == 2 * (1 + checkpointed) + 1, (name, r)


@pytest.mark.slow
def test_counted_bytes_match_the_analytic_count(four):
    from sp_equality import COMMON, TEXT, VARIANTS

    for name, kwargs, frames, h, w, checkpointed in VARIANTS:
        cfg = {"patch_size": 2, "patch_size_t": None, **COMMON, **kwargs}
        tokens = (frames // (cfg["patch_size_t"] or 1)) * (h // 2) * (w // 2)
        for n in (2, 4):
            expected = sp.exchanged_bytes(cfg, tokens, TEXT, batch=2, sp=n, element_size=8,
                                          checkpointing=checkpointed)
            counted = four[0][f"sp{n}/{name}"]["bytes_sent"]
            assert counted == expected["step"], (name, n, counted, expected)


def test_size_problems_name_the_valid_values():
    assert sp.problem(1, 30, 8) is None and sp.problem(2, 30, 8) is None and sp.problem(8, 48, 8) is None
    assert "valid values: 1, 2, 3, 5, 6, 10, 15, 30" in sp.problem(4, 30, None)
    assert "valid values here: 1, 2, 3, 6" in sp.problem(5, 30, 6)
    assert "valid values here: 1, 2, 3, 6" in sp.problem(4, 30, 6)  # 5 does not divide 6 processes
    assert sp.valid_sizes(48) == [2, 3, 4, 6, 8] and sp.valid_sizes(30) == [2, 3, 5, 6]
    assert "does not divide the 6 processes" in sp.problem(4, 48, 6)
    layout = sp.Layout(rank=5, world=8, sp=4)
    assert (layout.sp_rank, layout.dp_rank, layout.dp_world, layout.group_ranks(1)) == (1, 1, 2, [4, 5, 6, 7])


def _weights(out, step=4):
    return load_file(str(out / "checkpoints" / f"checkpoint-{step:06d}" / checkpoint.TRAINABLE))


def _assert_same_weights(a, b):
    # fp32 training, the same global batch: the runs differ only in the order of sums (tokens split over ranks,
    # gradients averaged over 2 or 4 ranks), about 1e-7 of a weight a step over 4 Adam steps; the tolerance of the
    # data-parallel comparison in tests/test_multiprocess.py
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    assert any(v.abs().max() > 0 for k, v in b.items() if "lora_B" in k)


def _all_to_alls(r) -> int:
    m = re.search(r"sequence parallel \d+: (\d+) all-to-alls", r.stdout + r.stderr)
    assert m, (r.stdout + r.stderr)[-3000:]
    return int(m.group(1))


@pytest.mark.slow
def test_sp2_x_dp2_on_four_processes_resumes_to_the_weights_of_dp2(trained, tmp_path):
    """SP 2 x DP 2 (4 processes, batch 1 a DP rank) trained from a latent store (data.store, no data.root), killed
    at step 3 and resumed from the step-2 checkpoint, ends with the weights of the same global batch of 2 without
    sequence parallel (1 process here, from the clip folder; tests/test_multiprocess.py shows DP 2 on 2 processes
    gives these too). The store holds the folder cache's examples in the folder's order (helpers.store_from_folder),
    so the data are the reference's; both processes of an SP group received the same sample from the store's reader
    at every micro-step, and the two groups the two parts of each global batch (tests/store_reads.py). The
    end-of-run render runs across the first SP group and writes its video once."""
    store = store_from_folder(trained[1], tmp_path / "store")
    out, cache = tmp_path / "out", tmp_path / "cache"
    sp4 = {"train.sequence_parallel": 2, "processes": 4, "validation.prompts": "[a purple square]",
           "data.store": store.url}
    killed = launch("ddp", "null", out, cache, failpoint="train-step:3", check=False, reads=tmp_path / "reads-killed",
                    **sp4)
    assert killed.returncode != 0 and (out / "checkpoints" / "checkpoint-000002").is_dir()
    assert not (out / "checkpoints" / "checkpoint-000004").exists()
    r = launch("ddp", "null", out, cache, reads=tmp_path / "reads-resumed", **{"train.resume_from": "latest", **sp4})
    assert "resumed from" in r.stdout + r.stderr
    for run in (killed, r):  # the data order of 2 data-parallel ranks: 2 global batches of 2 an epoch
        assert f"data.store {store.url}: 4 rows in 1 shards, buckets [[17, 64, 64]], 2 batches an epoch" in run.stdout
    seed = trained[1].train.seed
    assert_store_reads(tmp_path / "reads-killed", store, seed, range(3), 4, sp=2, killed=True)
    assert_store_reads(tmp_path / "reads-resumed", store, seed, range(2, 4), 4, sp=2)
    assert not cache.exists()  # nothing encoded: no clip cache made
    # tiny preset: 2 layers; per block and micro-step 2 all-to-alls forward, 3 backward; steps 3 and 4
    assert _all_to_alls(r) == 2 * 2 * 5
    _assert_same_weights(_weights(trained[0]), _weights(out))
    assert sorted(p.name for p in (out / "validation").glob("*.mp4")) == ["step-000004-0.mp4"]


# infer.py with cogpipe.video.write_mp4 also saving the frames it is given (<output>.npy): the frames the model made,
# before the mp4 encoder (PyAV's libx264 does not write the same bitstream for the same frames on every run)
_KEEP_FRAMES = """import runpy, sys
import numpy as np
import cogpipe.video as video
write = video.write_mp4
def keep(frames, path, *a, **k):
    np.save(str(path) + ".npy", np.asarray(frames))
    return write(frames, path, *a, **k)
video.write_mp4 = keep
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_infer_runs_one_video_across_two_processes(tmp_path, monkeypatch):
    """`accelerate launch --num_processes 2 infer.py --sequence-parallel 2` writes the video one process writes."""
    import numpy as np

    from cogpipe import video
    from cogpipe.inference import cli
    from cogpipe.video import read_video

    keep = tmp_path / "keep_frames.py"
    keep.write_text(_KEEP_FRAMES)
    args = ["--prompt", "a purple square moving left", "--steps", "2"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / "accelerate" /
           "ddp.yaml"), "--num_processes", "2", "--main_process_port", str(free_port()), str(keep),
           str(REPO / "infer.py"), *args, "--sequence-parallel", "2", "--output", str(tmp_path / "sp.mp4")]
    r = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # tiny-world: 4 layers, 2 all-to-alls each a forward, one forward a step (guidance doubles the batch)
    assert re.search(r"across 2 processes, 16 all-to-alls", r.stdout), r.stdout[-2000:]
    write = video.write_mp4
    monkeypatch.setattr(video, "write_mp4", lambda frames, path, *a, **k: (
        np.save(str(path) + ".npy", np.asarray(frames)), write(frames, path, *a, **k))[1])
    assert cli.main([*args, "--output", str(tmp_path / "one.mp4")]) == 0
    # both wrote a playable mp4 of the clip's size
    assert read_video(tmp_path / "sp.mp4").shape == read_video(tmp_path / "one.mp4").shape == (17, 64, 64, 3)
    # the frames before the encoder: the same computation summed in another order, the float frames agree to about
    # 1e-6, so at most a rare pixel rounds to the neighbouring 8-bit level; a wrong attention changes them all. (The
    # mp4s are not compared: the encoder alone makes them differ by 0.1-0.5 levels on average between runs.)
    sp_frames = np.load(tmp_path / "sp.mp4.npy").astype(int)
    one = np.load(tmp_path / "one.mp4.npy").astype(int)
    assert sp_frames.shape == one.shape == (17, 64, 64, 3)
    assert np.abs(sp_frames - one).mean() < 0.05


def test_infer_sequence_parallel_needs_its_launch(tmp_path, capsys):
    from cogpipe.inference import cli

    assert cli.main(["--prompt", "x", "--steps", "1", "--sequence-parallel", "2", "--output",
                     str(tmp_path / "x.mp4")]) == 2
    # on CPUs accelerate's default launch starts one process: the suggestion is the launch that starts two here, the
    # one test_infer_runs_one_video_across_two_processes runs
    err = capsys.readouterr().err
    assert re.search(r"`ACCELERATE_USE_CPU=1 accelerate launch --config_file \S*configs/accelerate/ddp\.yaml "
                     r"--num_processes 2 infer\.py \.\.\. --sequence-parallel 2`", err), err
    assert not (tmp_path / "x.mp4").exists()


def test_long_video_recipe_opens_with_its_8_gpu_launch_and_fits_only_split():
    from cogpipe.config import load_config
    from cogpipe.plan.launchers import per_launcher
    from cogpipe.plan.memory import estimate
    from cogpipe.plan.model import resolve_transformer_config

    path = REPO / "configs" / "cogvideox1.5_5b_long_full.yaml"
    first = path.read_text().splitlines()[0]
    assert first.startswith("# accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 8 ")
    assert first.endswith("train.py --config configs/cogvideox1.5_5b_long_full.yaml")
    cfg = load_config(path, ["model.pretrained=null"])  # 161 frames pass the 1.5 rule; 8 divides 48 heads
    assert (cfg.data.frames, cfg.data.height, cfg.data.width, cfg.train.sequence_parallel) == (161, 768, 1360, 8)
    tc = resolve_transformer_config(cfg.model)[0]
    split, whole = estimate(cfg, transformer_config=tc), estimate(dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, sequence_parallel=1)), transformer_config=tc)
    assert split["tokens_per_gpu"] == 226 + 85_680 // 8 == 10_936
    # activations follow the tokens a GPU holds: all 226 text tokens and 1/8 of the video
    ratio = split["gb"]["activations_with_checkpointing"] / whole["gb"]["activations_with_checkpointing"]
    assert 1 / 8 < ratio < 1.05 * 10_936 / 85_906
    assert per_launcher(cfg, tc, 8)["fsdp"]["gpu_needs_gb"] < 40 < per_launcher(
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, sequence_parallel=1)), tc, 8)["fsdp"][
        "gpu_needs_gb"]


def test_config_load_checks_the_size(monkeypatch):
    from cogpipe.config import ConfigError, load_config

    tiny = REPO / "configs" / "tiny_lora.yaml"  # models/tiny-world: 4 heads
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert load_config(tiny, ["train.sequence_parallel=4"]).train.sequence_parallel == 4
    with pytest.raises(ConfigError, match=r"^train.sequence_parallel: 3 does not divide .* 4 attention heads.*"
                                          r"valid values: 1, 2, 4"):
        load_config(tiny, ["train.sequence_parallel=3"])
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(ConfigError, match=r"^train.sequence_parallel: 4 does not divide the 6 processes.*"
                                          r"valid values here: 1, 2$"):
        load_config(tiny, ["train.sequence_parallel=4"])
    with pytest.raises(ConfigError, match="train.sequence_parallel: must be >= 1"):
        load_config(tiny, ["train.sequence_parallel=0"])
