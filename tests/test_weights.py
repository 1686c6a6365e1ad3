"""cogpipe.weights: safe loading of every checkpoint format, verification, DeepSpeed consolidation, diagnosis."""

import collections
import hashlib
import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import save_file

from cogpipe import weights as W  # noqa: E402
from cogpipe.weights import (  # noqa: E402
    ChecksumError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    WeightsMismatchError,
    expand_patch_embed_for_i2v,
    load_into,
    load_state_dict,
    open_state_dict,
    verify_sha256,
)

from fixtures import sat as F  # noqa: E402


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_safetensors_and_sha256(tmp_path):
    sd = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "c": torch.randn(2).bfloat16(),
          "s": torch.tensor(1.5)}
    f = tmp_path / "m.safetensors"
    save_file(sd, f)
    assert same(load_state_dict(f), sd)
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    assert same(load_state_dict(f, sha256=digest), sd)
    with pytest.raises(ChecksumError, match=r"m\.safetensors: sha256 mismatch"):
        load_state_dict(f, sha256="0" * 64)
    with pytest.raises(ChecksumError, match=r"no m\.safetensors\.sha256 beside it"):
        load_state_dict(f, sha256=True)
    (tmp_path / "m.safetensors.sha256").write_text(f"{digest}  m.safetensors\n")
    assert same(load_state_dict(f, sha256=True), sd)
    (tmp_path / "m.safetensors.sha256").write_text("f" * 64)
    with pytest.raises(ChecksumError, match="expected f{64}"):
        verify_sha256(f)


def test_torch_pickles_views_and_nesting(tmp_path):
    base = torch.randn(6, 4)
    sd = collections.OrderedDict(
        weight=torch.nn.Parameter(torch.randn(3, 3)), view=base[2:4], transposed=base.t(), whole=base,
        half=torch.randn(5).half(), flag=torch.tensor([True, False]), scalar=torch.tensor(7))
    torch.save(sd, tmp_path / "plain.pt")
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "lightning.ckpt")
    torch.save({"module": sd, "np_rng_state": __import__("numpy").random.get_state()}, tmp_path / "ds.bin")
    ref = {k: v.detach() for k, v in sd.items()}
    for name in ("plain.pt", "lightning.ckpt", "ds.bin"):
        got = load_state_dict(tmp_path / name)
        assert same(got, {k: v.contiguous() for k, v in ref.items()}), name
    lazy = open_state_dict(tmp_path / "plain.pt")
    assert isinstance(lazy["whole"], W.LazyTensor) and lazy["view"].elem_offset == 8  # nothing read yet
    assert torch.equal(lazy["whole"].narrow0(2, 2).load(), base[2:4])
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # old format: torch.load path
    assert same(load_state_dict(tmp_path / "legacy.pt"), {k: v.contiguous() for k, v in ref.items()})


class _Evil:
    """A pickle that would run code when loaded."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


class _EvilEval:
    def __reduce__(self):
        return eval, ("__import__('pathlib').Path('MARKER').touch()",)


@pytest.mark.parametrize("legacy", [False, True])
def test_code_carrying_pickles_are_refused_and_never_run(tmp_path, legacy):
    marker = tmp_path / "pwned"
    for i, evil in enumerate([_Evil(f"touch {marker}"), _EvilEval()]):
        f = tmp_path / f"evil{i}.pt"
        torch.save({"weight": torch.zeros(2), "payload": evil}, f, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(UnsafeCheckpointError, match=f"evil{i}.pt: refused"):
            load_state_dict(f)
        if not legacy:
            with pytest.raises(UnsafeCheckpointError, match="system|eval"):
                W.read_pickle(f)
    assert not marker.exists() and not Path("MARKER").exists()
    # a SAT folder with a code-carrying object is refused too, by the converter as well
    module = {"model.diffusion_model.x": torch.zeros(1)}
    (tmp_path / "sat" / "1").mkdir(parents=True)
    torch.save({"module": module, "hook": _Evil(f"touch {marker}")},
               tmp_path / "sat" / "1" / "mp_rank_00_model_states.pt")
    (tmp_path / "sat" / "latest").write_text("1")
    with pytest.raises(UnsafeCheckpointError, match="mp_rank_00_model_states.pt"):
        load_state_dict(tmp_path / "sat")
    assert not marker.exists()


def test_metadata_objects_load_as_inert_records(tmp_path):
    sat = F.sat_transformer("5b", dims={**F.TINY, "layers": 1})
    F.save_sat_folder(tmp_path / "sat", sat, extras=F.finetune_extras(sat))
    obj = W.read_pickle(tmp_path / "sat" / "1000" / "mp_rank_00_model_states.pt")
    assert isinstance(obj["ds_config"], W.Inert) and obj["ds_config"].qualname.startswith("deepspeed.")
    assert int(obj["zero_stage"]) == 2 and isinstance(obj["np_rng_state"][1], W.Inert)
    assert obj["args"].state == {"lr": 1e-4, "mode": "finetune"}  # argparse.Namespace, never constructed
    assert same(load_state_dict(tmp_path / "sat"), sat)


def test_corrupt_and_truncated_files_name_the_file(tmp_path):
    sd = {"a": torch.randn(100, 10)}
    save_file(sd, tmp_path / "t.safetensors")
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[:-50])
    with pytest.raises(CorruptCheckpointError, match=r"short\.safetensors: truncated"):
        load_state_dict(tmp_path / "short.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}")
    with pytest.raises(CorruptCheckpointError, match=r"garbage\.safetensors"):
        load_state_dict(tmp_path / "garbage.safetensors")
    torch.save(sd, tmp_path / "t.pt")
    data = (tmp_path / "t.pt").read_bytes()
    for cut in (100, len(data) // 2, len(data) - 10):
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        with pytest.raises(CorruptCheckpointError, match=r"cut\.pt"):
            load_state_dict(tmp_path / "cut.pt")
    (tmp_path / "noise.bin").write_bytes(os.urandom(1000))
    with pytest.raises(CorruptCheckpointError, match=r"noise\.bin"):
        load_state_dict(tmp_path / "noise.bin")


def test_sharded_folder_with_index(tmp_path):
    a, b = {"x.weight": torch.randn(4, 4)}, {"y.weight": torch.randn(2), "y.bias": torch.randn(2)}
    save_file(a, tmp_path / "model-00001-of-00002.safetensors")
    save_file(b, tmp_path / "model-00002-of-00002.safetensors")
    wm = {"x.weight": "model-00001-of-00002.safetensors", "y.weight": "model-00002-of-00002.safetensors",
          "y.bias": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    assert same(load_state_dict(tmp_path), {**a, **b})
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(W.CheckpointError, match="model-00002-of-00002.safetensors, which is missing"):
        load_state_dict(tmp_path)


# --- DeepSpeed ZeRO folders, written as DeepSpeed writes them (deepspeed itself is not needed) --------------------


def _trained_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3),
                                torch.nn.BatchNorm1d(3))
    model[1].bias.requires_grad_(False)  # a frozen parameter
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 5)).pow(2).mean().backward()
        opt.step()
    return model


def _write_zero(folder: Path, model, stage: int, world: int = 2) -> Path:
    """latest + global_step3/{model states, zero_pp_rank_R_mp_rank_00_optim_states.pt} for ZeRO-2 or 3."""
    tag = folder / "global_step3"
    tag.mkdir(parents=True)
    (folder / "latest").write_text("global_step3")
    named = dict(model.named_parameters())
    train = collections.OrderedDict((k, p.detach().float()) for k, p in named.items() if p.requires_grad)
    frozen = collections.OrderedDict((k, p.detach().float()) for k, p in named.items() if not p.requires_grad)
    buffers = {k: b for k, b in model.named_buffers()}
    common = dict(buffer_names=list(buffers), param_shapes=[collections.OrderedDict((k, v.shape) for k, v in
                                                                                    train.items())],
                  frozen_param_shapes=collections.OrderedDict((k, v.shape) for k, v in frozen.items()),
                  shared_params={"alias.weight": "0.weight"}, ds_config=F.DeepSpeedConfig(), ds_version="0.19.8",
                  global_steps=3, optimizer=None, lr_scheduler=None)
    with F.fake_deepspeed():
        if stage == 2:  # one flat fp32 vector per group, padded to 2*world, split in equal parts; pad dropped on save
            flat = torch.cat([v.flatten() for v in train.values()])
            pad = (-flat.numel()) % (2 * world)
            parts = torch.cat([flat, torch.zeros(pad)]).chunk(world)
            module = {**{k: v.bfloat16() for k, v in named.items()}, **buffers}
            torch.save({"module": module, "frozen_param_fragments": dict(frozen), **common},
                       tag / "mp_rank_00_model_states.pt")
            for r, part in enumerate(parts):
                lean = part[: part.numel() - (pad if r == world - 1 else 0)]
                osd = {"zero_stage": F.ZeroStageEnum.gradients, "partition_count": [world], "loss_scaler":
                       F.LossScaler(), "single_partition_of_fp32_groups": [lean.clone()],
                       "group_paddings": [pad if r == world - 1 else 0], "base_optimizer_state": {"state": {}}}
                torch.save({"optimizer_state_dict": osd, "ds_version": "0.19.8"},
                           tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        else:  # every parameter split over the ranks on its own, padded to a multiple of world
            def split(v):
                part = math.ceil(v.numel() / world)
                return torch.cat([v.flatten(), torch.zeros(part * world - v.numel())]).chunk(world)
            per_rank = list(zip(*[split(v) for v in train.values()]))
            for r in range(world):
                module = {**{k: torch.empty(0) for k in named}, **buffers}
                frags = {k: split(v)[r].clone() for k, v in frozen.items()}
                torch.save({"module": module, "frozen_param_fragments": frags, **common},
                           tag / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
                osd = {"zero_stage": F.ZeroStageEnum.weights, "partition_count": world,
                       "fp32_flat_groups": [torch.cat(per_rank[r])], "loss_scaler": F.LossScaler()}
                torch.save({"optimizer_state_dict": osd}, tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    return folder


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_folder_consolidates_to_the_trained_weights(tmp_path, stage):
    model = _trained_model()
    _write_zero(tmp_path / "ckpt", model, stage)
    got = load_state_dict(tmp_path / "ckpt")
    want = {**{k: v.detach() for k, v in model.state_dict().items()}, "alias.weight": model[0].weight.detach()}
    assert same(got, want)
    fresh = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3),
                                torch.nn.BatchNorm1d(3))
    load_into(fresh, {k: v for k, v in got.items() if k != "alias.weight"})
    assert torch.equal(fresh[2].weight, model[2].weight)
    if stage == 2:  # the module weights as saved (bf16), when asked
        assert load_state_dict(tmp_path / "ckpt", master_weights=False)["0.weight"].dtype == torch.bfloat16
    else:  # ZeRO-3 module weights are placeholders: without optimizer states there is nothing to load
        for f in (tmp_path / "ckpt" / "global_step3").glob("*optim_states.pt"):
            f.unlink()
        with pytest.raises(W.CheckpointError, match="partitioned"):
            load_state_dict(tmp_path / "ckpt")


def test_deepspeed_missing_rank_is_an_error(tmp_path):
    _write_zero(tmp_path / "ckpt", _trained_model(), 2)
    (tmp_path / "ckpt" / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(W.CheckpointError, match="partition_count is 2 but there are 1"):
        load_state_dict(tmp_path / "ckpt")


# --- fitting weights to models ---------------------------------------------------------------------------------


def _tiny(in_channels=16, patch_size_t=None, hidden_heads=2):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(num_attention_heads=hidden_heads, attention_head_dim=16, in_channels=in_channels,
                                       out_channels=16, num_layers=1, time_embed_dim=16, text_embed_dim=24,
                                       patch_size_t=patch_size_t, use_rotary_positional_embeddings=True,
                                       sample_height=8, sample_width=8, sample_frames=9)


def test_mismatch_diagnosis_names_key_shapes_cause_and_fix():
    t2v, i2v = _tiny(16), _tiny(32)
    with pytest.raises(WeightsMismatchError) as e:
        load_into(t2v, i2v.state_dict())
    msg = str(e.value)
    assert "patch_embed.proj.weight: the file has shape (32, 32, 2, 2), the model expects (32, 16, 2, 2)" in msg
    assert "image-to-video weights" in msg and "I2V model" in msg
    with pytest.raises(WeightsMismatchError, match="text-to-video weights.*expand_patch_embed_for_i2v"):
        load_into(i2v, t2v.state_dict())
    with pytest.raises(WeightsMismatchError, match="1.0 vs 1.5 patch embedding.*patch_size_t"):
        load_into(_tiny(16, patch_size_t=2), t2v.state_dict())
    wide = {k: v for k, v in t2v.state_dict().items()}
    wide["proj_out.weight"] = torch.zeros(64, 3072)
    rule = r"wrong model size: the file has hidden 3072 \(CogVideoX-5B\), the model 32"
    with pytest.raises(WeightsMismatchError, match=rule):
        load_into(t2v, wide)
    sat_keys = {F.PREFIX + "transformer.layers.0.attention.dense.weight": torch.zeros(1)}
    with pytest.raises(WeightsMismatchError, match="SAT keys.*cogpipe convert"):
        load_into(t2v, sat_keys)
    prefixed = {"transformer." + k: v for k, v in t2v.state_dict().items()}
    with pytest.raises(WeightsMismatchError, match="prefix 'transformer.'"):
        load_into(t2v, prefixed)


@pytest.mark.parametrize("patch_size_t", [None, 2])
def test_t2v_weights_initialise_i2v_with_zero_image_channels(tmp_path, patch_size_t):
    t2v = _tiny(16, patch_size_t)
    save_file(t2v.state_dict(), tmp_path / "t2v.safetensors")
    i2v = _tiny(32, patch_size_t)
    load_into(i2v, tmp_path / "t2v.safetensors", init_i2v=True)
    w = i2v.patch_embed.proj.weight
    image_cols = w[:, 16:] if w.dim() == 4 else w[:, 16 * 8:]
    assert not image_cols.any() and torch.equal(w[:, :16] if w.dim() == 4 else w[:, :128],
                                                t2v.patch_embed.proj.weight)
    g = torch.Generator().manual_seed(1)
    x, img = torch.randn(1, 2, 16, 4, 4, generator=g), torch.randn(1, 2, 16, 4, 4, generator=g)
    text = torch.randn(1, 3, 24, generator=g)
    with torch.no_grad():
        a = t2v(x, text, torch.tensor([500]), return_dict=False)[0]
        b = i2v(torch.cat([x, img], dim=2), text, torch.tensor([500]), return_dict=False)[0]
    torch.testing.assert_close(a, b)  # the image channels start at zero: same output as text-to-video
    assert expand_patch_embed_for_i2v({"patch_embed.proj.weight": torch.ones(4, 16, 2, 2)})[
        "patch_embed.proj.weight"].shape == (4, 32, 2, 2)
