"""Every shipped CogVideoX recipe loads, validates against its model and builds it on the meta device;
the accelerate launch configs are what accelerate's launcher reads."""

import functools
import re

import pytest
import torch
import yaml

from cogpipe.config import ConfigError, load_config
from cogpipe.models import build_on_meta

from helpers import REPO  # noqa: E402

# recipe -> (preset, hub id, version, image-to-video, mixed precision)
RECIPES = {
    "cogvideox_2b": ("2b", "THUDM/CogVideoX-2b", "1.0", False, "fp16"),
    "cogvideox_5b": ("5b", "THUDM/CogVideoX-5b", "1.0", False, "bf16"),
    "cogvideox_5b_i2v": ("5b-i2v", "THUDM/CogVideoX-5b-I2V", "1.0", True, "bf16"),
    "cogvideox1.5_5b": ("1.5-5b", "THUDM/CogVideoX1.5-5B", "1.5", False, "bf16"),
    "cogvideox1.5_5b_i2v": ("1.5-5b-i2v", "THUDM/CogVideoX1.5-5B-I2V", "1.5", True, "bf16"),
}
FILES = [f"{name}_{mode}" for name in RECIPES for mode in ("lora", "full")]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The position tables of the meta builds are computed fastest on one thread here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# Transformer parameters as diffusers' CogVideoXTransformer3DModel reports them on the meta device.
# 2B and 5B equal the SAT counts after the drops (docs/design.md, "SAT checkpoints"): the 2B sincos position
# table and the 5B-I2V learned position table are buffers in diffusers, not parameters. The others differ from 5B
# only in their input/output layers:
P_2B, P_5B = 1_693_783_872, 5_570_283_072
PATCH_1_0 = 3072 * 16 * 2 * 2  # Conv2d patch embedding weight per 16 input channels
PARAMS = {
    "2b": P_2B,
    "5b": P_5B,
    "5b-i2v": P_5B + PATCH_1_0,  # 32 input channels instead of 16
    # 1.5: the patch embedding is a Linear over 16 x 2 x 2 x 2 (patch_t 2) inputs, proj_out emits 2x the values
    "1.5-5b": P_5B + 3072 * 16 * 8 - PATCH_1_0 + (3072 + 1) * 64,
    # 1.5-I2V: 32 input channels, plus the ofs embedding (512 -> 512 -> 512)
    "1.5-5b-i2v": P_5B + 3072 * 32 * 8 - PATCH_1_0 + (3072 + 1) * 64 + 2 * (512 * 512 + 512),
}


@functools.lru_cache(maxsize=None)
def meta_model(preset):
    cfg = load_config(None, ["output_dir=x", "data.root=x", f"model.preset={preset}"], validate_model=False)
    return build_on_meta(cfg.model)


def recipe(name):
    return REPO / "configs" / f"{name}.yaml"


def test_the_ten_recipes_exist():
    shipped = {p.stem for p in (REPO / "configs").glob("cogvideox*.yaml")}
    assert shipped - {"cogvideox1.5_5b_long_full"} == set(FILES)  # the long-video recipe: test_sequence_parallel


@pytest.mark.parametrize("name", FILES)
def test_recipe_opens_with_its_launch_command(name):
    first = recipe(name).read_text().splitlines()[0]
    assert first.startswith("# ") and f"train.py --config configs/{name}.yaml" in first
    m = re.search(r"--config_file (\S+)", first)
    if m:  # a launch config it names must exist
        assert (REPO / m.group(1)).is_file(), m.group(1)


@pytest.mark.parametrize("name", FILES)
def test_recipe_loads_and_builds_on_meta(name):
    family, mode = name.rsplit("_", 1)
    preset, hub, version, i2v, precision = RECIPES[family]
    # model.pretrained names the hub model; offline, the loader would try to read its config: null falls back
    # to the preset of the same shapes
    assert yaml.safe_load(recipe(name).read_text())["model"]["pretrained"] == hub
    cfg = load_config(recipe(name), ["model.pretrained=null"])  # validates channels, frames and size
    assert cfg.model.preset == preset and cfg.model.latent_input
    model = meta_model(preset)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[preset]
    assert model.config.in_channels == (32 if i2v else 16)
    assert model.config.patch_size_t == (2 if version == "1.5" else None)
    assert model.config.max_text_seq_length == 226 and model.config.text_embed_dim == 4096
    frames, h, w = cfg.data.frames, cfg.data.height, cfg.data.width
    if version == "1.0":
        assert (frames, h, w) == (49, 480, 720)
    else:
        assert (frames - 1) % 16 == 0 and frames <= 161 and (frames, h, w) == (81, 768, 1360)
        if i2v:
            assert min(h, w) == 768 and max(h, w) <= 1360
    assert cfg.train.mode == mode and cfg.train.gradient_checkpointing
    assert cfg.model.vae_slicing and cfg.model.vae_tiling  # the official enable_slicing / enable_tiling
    assert cfg.train.mixed_precision == precision and cfg.train.batch_size == 1
    if mode == "lora":
        assert (cfg.lora.rank, cfg.lora.alpha) == (128, 64)
        assert sorted(cfg.lora.target_modules) == ["to_k", "to_out.0", "to_q", "to_v"]
        assert cfg.model.weight_dtype == precision and cfg.train.lr == 1e-3
    else:
        assert cfg.model.weight_dtype == "fp32" and cfg.train.lr == 2e-5


@pytest.mark.parametrize("family", list(RECIPES))
def test_frame_rule_follows_the_recipe_version(family):
    # 41 = 8*5 + 1 is a CogVideoX 1.0 length but not 16N+1: the loader enforces the version's rule.
    # 5B-I2V's learned positional table fits only 49 frames at 480x720, so it refuses 41 too.
    version = RECIPES[family][2]
    overrides = ["model.pretrained=null", "data.frames=41"]
    if version == "1.0" and family != "cogvideox_5b_i2v":
        assert load_config(recipe(f"{family}_lora"), overrides).data.frames == 41
    else:
        with pytest.raises(ConfigError, match="data.frames"):
            load_config(recipe(f"{family}_lora"), overrides)


# --- accelerate launch configs ---------------------------------------------------------------------------

ACCEL = ["ddp", "fsdp", "zero2", "zero3"]


def launch_args(name):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = f"configs/accelerate/{name}.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(REPO / path), "train.py", "--config",
                                               "configs/cogvideox_5b_lora.yaml"])
    return _validate_launch_command(args)


@pytest.mark.parametrize("name", ACCEL)
def test_accelerate_config_opens_with_its_launch_command(name):
    first = (REPO / "configs" / "accelerate" / f"{name}.yaml").read_text().splitlines()[0]
    m = re.fullmatch(rf"# accelerate launch --config_file configs/accelerate/{name}\.yaml train\.py --config (\S+)",
                     first)
    assert m and (REPO / m.group(1)).is_file(), first


def test_ddp_config():
    args, _, _ = launch_args("ddp")
    assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed


def test_fsdp_config_full_shard_wraps_cogvideox_blocks():
    from accelerate.utils.dataclasses import get_module_class_from_name  # what accelerate resolves the name with
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _, _ = launch_args("fsdp")
    assert args.use_fsdp
    env = prepare_multi_gpu_env(args)
    assert env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["FSDP_USE_ORIG_PARAMS"] == "true"  # LoRA: frozen and trainable weights in one unit
    # the class name accelerate looks up in the model must be the real block class
    cls = get_module_class_from_name(meta_model("5b"), env["FSDP_TRANSFORMER_CLS_TO_WRAP"])
    assert cls is not None and cls.__name__ == "CogVideoXBlock"


@pytest.mark.parametrize("name,stage,gather", [("zero2", 2, False), ("zero3", 3, True)])
def test_deepspeed_configs(name, stage, gather, monkeypatch):
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args, defaults, _ = launch_args(name)
    assert args.use_deepspeed
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    _, env = prepare_deepspeed_cmd_env(args)
    for k, v in env.items():  # what the launched processes see, turned into DeepSpeed's config
        if k.startswith("ACCELERATE_"):
            monkeypatch.setenv(k, v)
    zero = DeepSpeedPlugin().deepspeed_config["zero_optimization"]
    assert zero["stage"] == stage
    assert zero["stage3_gather_16bit_weights_on_model_save"] is gather
    assert zero["offload_optimizer"]["device"] == "none"


def test_multi_gpu_doc_names_the_multi_node_settings_and_existing_files():
    text = (REPO / "docs" / "multi_gpu.md").read_text()
    for key in ("--num_machines", "--machine_rank", "--main_process_ip", "--main_process_port"):
        assert key in text
    paths = set(re.findall(r"configs/[\w./-]+\.yaml", text))
    assert {f"configs/accelerate/{n}.yaml" for n in ACCEL} <= paths
    for p in paths:
        if "<" not in p:
            assert (REPO / p).is_file(), p
