"""Every launch config in configs/accelerate/ on 2 CPU processes, launched as docs/multi_gpu.md launches it; the
process count, a free port and the CPU switch are the only differences. DDP runs on gloo (ACCELERATE_USE_CPU=1);
DeepSpeed ZeRO-2/3 on DeepSpeed's CPU accelerator and FSDP2 through accelerate's fully_shard path on gloo, both
with DS_ACCELERATOR=cpu, under which cogpipe.sharding.allow_cpu_sharding lets accelerate run them on CPUs.

Each run logs what it really is (sharding.describe, read from the prepared objects): the test fails when the launch
fell back to another path (FSDP that is DDP, ZeRO-3 whose parameters are whole, another backend or dtype).

The matrix: each launcher trains LoRA and a full fine-tune, is SIGKILLed in step 3, resumes to the end and exports;
its final weights (and EMA) equal one process's with the same global batch. Each launcher runs once on the bf16
hub-layout pretrained fixture (tests/fixtures/hub.py: a frozen bf16 base for LoRA, the partitioned build and the
encoders under ZeRO-3) with the EMA on, and once on the random preset:

    launcher  LoRA                                          full fine-tune
    ddp       random  (tests/test_multiprocess.py)           hub + EMA
    zero2     hub (loaded in fp32) + EMA                      random
    zero3     random, + validation on 3 prompts              hub + EMA (zero.Init build, encoders unpartitioned)
    fsdp      hub, kept in bf16 beside fp32 adapters + EMA   random

(DeepSpeed runs a bf16 base only under train.mixed_precision=bf16, whose engine-side casts one process does not
reproduce; FSDP2 keeps the bf16 base beside fp32 adapters in one unit, the case FSDP1 refuses.) Five one-process
references serve all cells: conftest's `trained` (random LoRA), random full, hub LoRA fp32 and bf16, hub full; the
hub ones with the EMA (it does not change the trained weights, so one reference serves with and without it).

Two cells, zero3 LoRA and fsdp full, train from a latent store (data.store, no data.root: cogpipe/data/reader.py)
instead of the clip folder: one store a module, holding the folder cache's examples of the same clips in the
folder's order and the validation prompts, so the folder's one-process reference is still the run to equal. They
check that each process read its data-parallel rank's part of every global batch from the store (tests/
store_reads.py) and that no clip cache was made; tests/test_sequence_parallel.py does the same for SP x DP, and
tests/test_store.py for DDP (one process, and two machines reading from S3)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from cogpipe import checkpoint

from helpers import assert_store_reads, launch, run_tiny, store_from_folder

pytest.importorskip("deepspeed")  # the [deepspeed] extra, which CI installs

# A full fine-tune compared across launchers runs Adam with eps 1e-5 (about the median gradient here): with the default
# 1e-8 Adam's update is about lr * sign(g) for any |g| >> eps, so an element whose gradient is a near-cancelling sum
# (|g| ~ 1e-7, where the fp32 sum order of 1 vs 2 processes moves g by ~5%) moves by a few % of lr (~3e-4) in one
# launch and not the other. With eps 1e-5 an update follows g itself there (rounding in g moves it by ~lr * 1e-9 /
# 1e-5), and the comparison also sees a wrong gradient scale (sum for mean over processes), which sign-like Adam hides.
FULL = {"train.mode": "full", "train.adam_eps": 1e-5}
EMA = {"train.ema_decay": 0.9}
CELLS = {  # (launcher, mode): base ("random" | "hub": with the EMA on | "hub-bf16": a LoRA's frozen base in bf16)
    ("ddp", "full"): "hub", ("zero2", "lora"): "hub", ("zero2", "full"): "random",
    ("zero3", "lora"): "random", ("zero3", "full"): "hub", ("fsdp", "lora"): "hub-bf16", ("fsdp", "full"): "random"}
FROM_STORE = {("zero3", "lora"), ("fsdp", "full")}  # cells that read a latent store, not the clip folder
ZERO3_PROMPTS = ["a purple square moving left", "a purple circle moving up", "a purple triangle moving down"]


def _file(out, name=checkpoint.TRAINABLE, step=4):
    return load_file(str(out / "checkpoints" / f"checkpoint-{step:06d}" / name))


def _overrides(base: str, mode: str, hub_folder) -> dict:
    extra = dict(FULL) if mode == "full" else {}
    if base.startswith("hub"):  # the pretrained fixture (bf16 files)
        extra.update({"model.pretrained": hub_folder, **EMA})
    if base == "hub-bf16":  # the frozen base kept in bf16
        extra["model.weight_dtype"] = "bf16"
    return extra


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    from fixtures.hub import write_hub_pipeline

    return write_hub_pipeline(tmp_path_factory.mktemp("hub") / "5b", "5b")


@pytest.fixture(scope="module")
def reference(trained, clips, hub, tmp_path_factory):
    """One process, batch 2, per (base, mode): {"weights": ..., "ema": ... or None}."""
    refs = {("random", "lora"): {"weights": _file(trained[0]), "ema": None}}
    for base, mode in (("random", "full"), ("hub", "lora"), ("hub-bf16", "lora"), ("hub", "full")):
        out, _ = run_tiny(clips, tmp_path_factory.mktemp(f"one-{base}-{mode}") / "out", trained[2],
                          **_overrides(base, mode, hub))
        refs[base, mode] = {"weights": _file(out), "ema": _file(out, checkpoint.EMA) if base != "random" else None}
    return refs


@pytest.fixture(scope="module")
def store(trained, tmp_path_factory):
    """The random preset's store of the clips `trained` read (its folder cache's examples, in its order), with the
    zero3 cell's validation prompts and "" in its prompt table (as `cogpipe data encode` writes that recipe's)."""
    return store_from_folder(trained[1], tmp_path_factory.mktemp("store") / "s", prompts=[*ZERO3_PROMPTS, ""])


def described(r) -> dict:
    """The launch as the run logged it (sharding.describe)."""
    lines = [line for line in r.stdout.splitlines() if line.startswith("sharding: ")]
    assert lines, r.stdout[-2000:]
    return json.loads(lines[0][len("sharding: "):])


def assert_launch(launcher: str, mode: str, base: str, d: dict) -> None:
    """The path that ran is the one the launcher names: no silent fallback."""
    assert d["world"] == 2 and d["backend"] == "gloo", d
    assert d["trainable_dtypes"] == ["torch.float32"], d
    if launcher == "fsdp":  # FSDP2: every parameter a DTensor sharded on dim 0 over the 2 processes
        assert d["distributed_type"] == "FSDP" and d["launcher"] == "fsdp2", d
        assert d["dtensor_params"] == d["params"] > 0 and d["placements"] == ["(Shard(dim=0),)"], d
    elif launcher == "zero3":  # every parameter a partition with no local data
        assert d["distributed_type"] == "DEEPSPEED" and d["launcher"] == "zero3", d
        assert d["partitioned_params"] == d["params"] > 0 and d["dtensor_params"] == 0, d
    else:
        assert d["launcher"] == launcher and d["dtensor_params"] == d["partitioned_params"] == 0, d
        assert d["distributed_type"] == ("DEEPSPEED" if launcher == "zero2" else "MULTI_CPU"), d
    if mode == "lora":  # the frozen base as built
        assert d["frozen_dtypes"] == ["torch.bfloat16" if base == "hub-bf16" else "torch.float32"], d


@pytest.mark.slow
@pytest.mark.parametrize("launcher,mode", list(CELLS), ids=[f"{k[0]}-{k[1]}-{v}" for k, v in CELLS.items()])
def test_killed_then_resumed_equals_one_process(launcher, mode, reference, clips, trained, hub, request, tmp_path):
    base = CELLS[launcher, mode]
    extra = _overrides(base, mode, hub)
    validation = launcher == "zero3" and mode == "lora"
    if validation:  # 3 prompts on 2 processes: the prompt list is padded so both run the same sharded forwards
        extra.update({"validation.every": 2, "validation.prompts": f"[{','.join(ZERO3_PROMPTS)}]"})
    data, cache, reads = clips, trained[2], {}
    if (launcher, mode) in FROM_STORE:  # no clip folder; a cache folder of its own, which must stay unmade
        store = request.getfixturevalue("store")
        data, cache, extra["data.store"] = "null", tmp_path / "cache", store.url
        reads = {"killed": tmp_path / "reads-killed", "resumed": tmp_path / "reads-resumed"}
    out = tmp_path / "out"
    killed = launch(launcher, data, out, cache, "train-step:3", check=False, reads=reads.get("killed"), **extra)
    assert killed.returncode != 0 and (out / "checkpoints" / "latest").read_text().strip() == "checkpoint-000002"
    assert_launch(launcher, mode, base, described(killed))
    r = launch(launcher, data, out, cache, reads=reads.get("resumed"), **{"train.resume_from": "latest", **extra})
    assert "resumed from" in r.stdout + r.stderr
    assert_launch(launcher, mode, base, described(r))
    if reads:  # each process read its part of every global batch from the store: micro-steps 1-3, then 3-4
        for run in (killed, r):
            assert f"data.store {store.url}: 4 rows in 1 shards, buckets [[17, 64, 64]], 2 batches an epoch" in (
                run.stdout), run.stdout[-2000:]
        assert_store_reads(reads["killed"], store, trained[1].train.seed, range(3), 2, killed=True)
        assert_store_reads(reads["resumed"], store, trained[1].train.seed, range(2, 4), 2)
        assert not cache.exists()  # nothing encoded: no clip, and the validation prompts came from the store
    ref = reference[base, mode]
    final = _file(out)
    assert set(final) == set(ref["weights"])
    # full: fp32 sums in another order over 2 processes (~1e-6 with FULL's Adam eps); LoRA: only the adapters move;
    # a bf16 base: its activations round to bf16 (2^-8) per kernel, and batch 1 a process blocks the matmuls otherwise
    tolerance = (dict(rtol=1e-4, atol=2e-5) if mode == "full" else dict(rtol=1e-3, atol=2e-4) if base == "hub-bf16"
                 else dict(rtol=1e-5, atol=1e-6))
    for k, v in ref["weights"].items():
        torch.testing.assert_close(final[k], v, **tolerance)
    if ref["ema"] is not None:  # gathered from one fp32 part a process, equal to one process's EMA
        ema = _file(out, checkpoint.EMA)
        assert set(ema) == set(ref["ema"])
        for k, v in ref["ema"].items():
            torch.testing.assert_close(ema[k], v, **tolerance)
        assert max((ema[k] - final[k]).abs().max().item() for k in ema) > 0  # an EMA, not the weights
    ckpt = out / "checkpoints" / "checkpoint-000004"
    if launcher == "fsdp":  # trainable weights once, the optimizer state as one shard a process, no model file
        assert sorted(p.name for p in (ckpt / "optimizer_0").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
        assert not list(ckpt.glob("pytorch_model*")), sorted(p.name for p in ckpt.iterdir())
    if validation:
        assert sorted(p.name for p in (out / "validation").glob("step-000002-*.mp4")) == [
            "step-000002-0.mp4", "step-000002-1.mp4", "step-000002-2.mp4"]
    _check_export(out, mode, final, ema if ref["ema"] is not None else None, launcher)


def _check_export(out, mode, final, ema, launcher):
    from diffusers import CogVideoXTransformer3DModel

    assert (out / "export" / "model_index.json").is_file()
    exported = CogVideoXTransformer3DModel.from_pretrained(out / "export" / "transformer")
    if mode == "full":  # the export holds the EMA where there is one
        for k, v in (ema or final).items():
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
    ref, got, clean = _file(one), _file(out), _file(trained[0])
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)
    assert max((ref[k] - clean[k]).abs().max().item() for k in ref) > 1e-4  # the skip changed the outcome
