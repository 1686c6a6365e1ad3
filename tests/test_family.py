"""cogpipe.family: the one table of CogVideoX variants, its rules, and that every consumer reads from it."""

import inspect
import subprocess
import sys
import warnings

import pytest
import yaml

from cogpipe import family
from cogpipe.family import VARIANTS

from helpers import REPO, child_env  # noqa: E402


def test_import_is_light():
    """The converter starts with cogpipe.family: importing it must not pull in diffusers or transformers."""
    code = ("import sys, cogpipe.family, cogpipe.convert.detect; "
            "print([m for m in ('diffusers', 'transformers') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                       env=child_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_transformer_defaults_are_diffusers():
    from diffusers import CogVideoXTransformer3DModel

    params = inspect.signature(CogVideoXTransformer3DModel.__init__).parameters
    assert {k: params[k].default for k in family._TRANSFORMER_DEFAULTS} == family._TRANSFORMER_DEFAULTS


@pytest.mark.parametrize("name,hidden,layers,in_ch,rope,scaling,shift,version,rule,clip,dtype", [
    ("2b", 1920, 30, 16, False, 1.15258426, 3.0, "1.0", (8, 49), (49, 480, 720, 8), "fp16"),
    ("5b", 3072, 42, 16, True, 0.7, 1.0, "1.0", (8, 49), (49, 480, 720, 8), "bf16"),
    ("5b-i2v", 3072, 42, 32, True, 0.7, 1.0, "1.0", (8, 49), (49, 480, 720, 8), "bf16"),
    ("1.5-5b", 3072, 42, 16, True, 0.7, 1.0, "1.5", (16, 161), (81, 768, 1360, 16), "bf16"),
    ("1.5-5b-i2v", 3072, 42, 32, True, 0.7, 1.0, "1.5", (16, 161), (81, 768, 1360, 16), "bf16"),
    ("tiny-world", 128, 4, 16, True, 1.0, 1.0, "1.0", (8, 49), (17, 64, 64, 8), "fp32"),
])
def test_the_table(name, hidden, layers, in_ch, rope, scaling, shift, version, rule, clip, dtype):
    v = VARIANTS[name]
    t = {**family._TRANSFORMER_DEFAULTS, "num_layers": 30, **v.transformer}
    assert (v.hidden, t["num_layers"], t["in_channels"]) == (hidden, layers, in_ch)
    assert bool(t.get("use_rotary_positional_embeddings")) == rope
    assert (v.scaling_factor, v.snr_shift_scale, v.version, v.i2v) == (scaling, shift, version, in_ch == 32)
    assert (v.frame_multiple, v.max_frames) == rule == family.frame_rule(version)
    assert (v.frames, v.height, v.width, v.fps, v.dtype) == (*clip, dtype)
    assert v.vae.get("invert_scale_latents", False) == (version == "1.5")
    assert not family.shape_problems(v.transformer, v.frames, v.height, v.width)  # the default clip fits
    assert v.transformer.get("ofs_embed_dim") == (512 if name == "1.5-5b-i2v" else None)


def test_table_entries_are_read_only():
    with pytest.raises(TypeError):
        VARIANTS["5b"].transformer["num_layers"] = 1


def test_hub_ids():
    for v in VARIANTS.values():
        if v.released:
            assert family.preset_for_hub_id(v.hub_id) == v.name and family.hub_id(v.name) == v.hub_id
    assert family.preset_for_hub_id("thudm/cogvideox1.5-5b-i2v") == "1.5-5b-i2v"  # any case
    assert family.preset_for_hub_id("/models/CogVideoX-2b/") == "2b"  # the last path part
    assert family.preset_for_hub_id("someone/CogVideoX-7b") is None and family.preset_for_hub_id(None) is None
    assert family.hub_id("tiny") is None


def test_released_variants_have_recipes_that_agree():
    """Adding a variant means one table entry plus a recipe: each recipe's model, clip, fps and precision are
    the table's."""
    recipes = [(p, yaml.safe_load(p.read_text())) for p in sorted((REPO / "configs").glob("cogvideox*.yaml"))]
    for v in VARIANTS.values():
        if not v.released:
            continue
        mine = [(p, r) for p, r in recipes if r["model"].get("preset") == v.name]
        assert mine, f"no recipe in configs/ for {v.name}"
        for path, r in mine:
            assert r["model"]["pretrained"] == v.hub_id, path.name
            frames = v.frames if r["train"].get("sequence_parallel", 1) == 1 else v.max_frames  # a long-video recipe
            assert (r["data"]["frames"], r["data"]["height"], r["data"]["width"]) == (frames, v.height, v.width)
            assert r["validation"]["fps"] == v.fps and r["train"]["mixed_precision"] == v.dtype, path.name


def test_tiny_world_clip_is_what_the_world_renders():
    from cogpipe.world import clips, score

    make = inspect.signature(clips.make_world).parameters
    v = VARIANTS["tiny-world"]
    assert (make["frames"].default, make["size"].default, make["size"].default, make["fps"].default) == \
        (v.frames, v.height, v.width, v.fps)
    scored = inspect.signature(score.score_model).parameters
    assert (scored["frames"].default, scored["height"].default, scored["width"].default) == \
        (v.frames, v.height, v.width)


def test_one_rule_for_version_and_image_to_video():
    assert family.is_i2v({"in_channels": 32}) and not family.is_i2v({})  # missing keys: diffusers' defaults
    assert family.is_i2v({"in_channels": 32, "out_channels": None})  # None: the constructor's 16
    assert not family.is_i2v({"in_channels": 32, "out_channels": 32})
    assert family.version({}) == "1.0" and family.version({"patch_size_t": 2}) == "1.5"


def test_shape_rules():
    i2v15, i2v10 = VARIANTS["1.5-5b-i2v"].transformer, VARIANTS["5b-i2v"].transformer
    t2v = VARIANTS["5b"].transformer
    assert family.shape_problems(i2v15, 81, 768, 1360) == [] and family.shape_problems(i2v15, 81, 1360, 768) == []
    (part, message), = family.shape_problems(i2v15, 81, 480, 720)
    assert part == "size" and "shorter side >= 768" in message
    (part, message), = family.shape_problems(t2v, 41 + 1, 480, 720)
    assert part == "frames" and "8N+1" in message and "nearest valid: 41" in message
    parts = [p for p, _ in family.shape_problems(i2v10, 33, 480, 720)]
    assert parts == ["frames"]  # 33 = 8*4+1 passes the frame rule; the learned table fixes 49 frames
    assert family.fixed_shape(i2v10) == (49, 480, 720) and family.side_limits(i2v15) == (768, 1360)
    assert family.shape_problems(t2v, 49, 472, 720)[0][0] == "size"  # not a multiple of 16
    with pytest.raises(ValueError, match="16N\\+1"):
        family.check_shape(VARIANTS["1.5-5b"].transformer, 41, 768, 1360)


def test_sat_values_by_hidden_size():
    two = dict(num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16)
    assert family.family_values(two) == dict(scaling_factor=1.15258426, snr_shift_scale=3.0,
                                             invert_scale_latents=False)
    v15 = dict(num_attention_heads=48, attention_head_dim=64, in_channels=32, out_channels=16, patch_size_t=2)
    assert family.variant_for_hidden(3072, "1.5", True).name == "1.5-5b-i2v"
    assert family.family_values(v15) == dict(scaling_factor=0.7, snr_shift_scale=1.0, invert_scale_latents=True)
    custom = dict(num_attention_heads=8, attention_head_dim=64)
    assert family.variant_for_hidden(512) is None and family.family_values(custom)["scaling_factor"] == 0.7
    assert family.variant_for_hidden(32) is None  # the tiny presets are not sizes SAT files come in


def test_scheduler_config_from_a_shift_a_variant_or_a_config():
    two = VARIANTS["2b"]
    same = [family.scheduler_config(3.0), family.scheduler_config("2b"), family.scheduler_config(two),
            family.scheduler_config(dict(num_attention_heads=30, attention_head_dim=64))]
    assert all(s == same[0] for s in same) and same[0]["snr_shift_scale"] == 3.0
    assert same[0]["prediction_type"] == "v_prediction" and same[0]["rescale_betas_zero_snr"]


def test_consumers_read_the_table():
    from cogpipe import lora, models
    from cogpipe.convert import core, detect

    assert models.DTYPES is family.DTYPES and core.DTYPES is family.DTYPES
    assert lora.LORA_FILE == core.LORA_FILE == family.LORA_FILE
    assert models.PRESETS is family.PRESETS and list(models.PRESETS) == list(VARIANTS)
    assert detect.family_values is family.family_values and detect.scheduler_config is family.scheduler_config


def test_stand_in_is_reported_not_matched_from_a_warning():
    """An unreachable hub id: models.resolve_configs says which preset stood in; plan uses that, not the
    warning text component_configs shows a user."""
    from cogpipe import plan
    from cogpipe.config import ModelConfig
    from cogpipe.models import component_configs, resolve_configs

    cfg = ModelConfig(pretrained="THUDM/CogVideoX-5b", preset="5b")  # offline in the tests
    resolved = resolve_configs(cfg)
    assert resolved.stand_in == "5b" and resolved.transformer["num_layers"] == 42
    with pytest.warns(UserWarning, match="not reachable"):
        component_configs(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # plan must not need (or show) the warning
        transformer_config, preset = plan.resolve_model(ModelConfig(pretrained="THUDM/CogVideoX1.5-5B-I2V"))
    # preset tiny: the hub id names the variant
    assert preset == "1.5-5b-i2v" and transformer_config["ofs_embed_dim"] == 512
