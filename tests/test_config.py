import subprocess
import sys

import pytest

from cogpipe.config import ConfigError, load_config

from helpers import REPO

RECIPE = REPO / "configs" / "tiny_lora.yaml"


def test_every_recipe_loads():
    recipes = sorted((REPO / "configs").glob("*.yaml"))
    assert recipes, "no recipes in configs/"
    for path in recipes:
        cfg = load_config(path)
        assert cfg.model.latent_input is True
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and "train.py --config configs/" in first, f"{path} must open with its command"


def test_overrides_merge_over_yaml():
    cfg = load_config(RECIPE, ["train.max_steps=7", "lora.rank=4", "data.root=/somewhere"])
    assert (cfg.train.max_steps, cfg.lora.rank, cfg.data.root) == (7, 4, "/somewhere")
    assert cfg.train.batch_size == 4  # from the YAML
    assert cfg.train.adam_eps == 1e-8  # from the schema defaults


@pytest.mark.parametrize("overrides, key", [
    (["model.latent_input=false"], "model.latent_input"),
    (["train.max_stepz=3"], "train.max_stepz"),
    (["train.max_steps=many"], "train.max_steps"),
    (["train.max_steps=0"], "train.max_steps"),
    (["train.mode=half"], "train.mode"),
    (["train.mixed_precision=fp64"], "train.mixed_precision"),
    (["train.lr_scheduler=wavy"], "train.lr_scheduler"),
    (["train.timestep_sampling=cosine"], "train.timestep_sampling"),
    (["train.timestep_logit_std=0"], "train.timestep_logit_std"),
    (["data.frames=20"], "data.frames"),
    (["data.frames=57"], "data.frames"),
    (["data.height=72"], "data.height"),
    (["data.width=100"], "data.width"),
    (["model.pretrained=null", "model.preset=7b"], "model.preset"),
    (["report_to=slack"], "report_to"),
])
def test_rule_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(RECIPE, overrides)
    assert key in str(e.value)


def test_latent_input_false_explains_why():
    with pytest.raises(ConfigError) as e:
        load_config(RECIPE, ["model.latent_input=false"])
    msg = str(e.value)
    assert "16-channel" in msg and "VAE" in msg and "RGB" in msg


def test_missing_required_values(tmp_path):
    path = tmp_path / "partial.yaml"
    path.write_text("model:\n  preset: tiny\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "output_dir" in str(e.value)
    with pytest.raises(ConfigError) as e:  # a dataset folder or a latent store: one of them
        load_config(path, ["output_dir=o"])
    assert "data.root" in str(e.value) and "data.store" in str(e.value)


def test_channel_rule(tmp_path):
    """A pretrained folder whose transformer does not take the VAE's latent channels is refused."""
    import json

    for sub, conf in {"transformer": {"in_channels": 16, "out_channels": 16},
                      "vae": {"latent_channels": 8}}.items():
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ConfigError) as e:
        load_config(RECIPE, [f"model.pretrained={tmp_path}"])
    assert "in_channels" in str(e.value) and "latent_channels" in str(e.value)


def test_version_frame_rules():
    from cogpipe.config import frame_rule, load_config

    assert frame_rule("1.0") == (8, 49) and frame_rule("1.5") == (16, 161)
    cfg = load_config(RECIPE, ["data.frames=49"])
    assert cfg.data.frames == 49


def test_train_py_refuses_latent_input_false_before_training(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(RECIPE), "model.latent_input=false",
                        f"output_dir={tmp_path / 'out'}"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode != 0
    assert "model.latent_input" in r.stderr
    assert not (tmp_path / "out").exists()


def test_mixed_precision_no_from_the_command_line():
    assert load_config(RECIPE, ["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_learned_positions_fix_the_shape():
    cfg = REPO / "configs" / "cogvideox_5b_i2v_lora.yaml"
    assert load_config(cfg, ["model.pretrained=null"]).data.frames == 49
    with pytest.raises(ConfigError, match="data.frames: this model's learned positional embeddings fit only 49"):
        load_config(cfg, ["model.pretrained=null", "data.frames=33"])
