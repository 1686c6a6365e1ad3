"""A non-editable install (`pip install .`, which copies only the package) finds the shipped model and recipes
from a checkout, or says exactly what to pass."""

import os
import subprocess
import sys
import zipfile

import pytest

from helpers import REPO


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The package as `pip install .` lays it out: the wheel's files, unpacked into a folder of their own."""
    root = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(root / "dist"), str(REPO)], check=True, capture_output=True)
    [wheel] = (root / "dist").glob("cogpipe-*.whl")
    zipfile.ZipFile(wheel).extractall(root / "lib")
    assert not (root / "lib" / "models").exists() and (root / "lib" / "cogpipe" / "world" / "score.py").is_file()
    return root / "lib"


def _python(site, cwd, code, **env):
    environ = {k: v for k, v in os.environ.items() if k != "COGPIPE_HOME"}
    environ.update(PYTHONPATH=str(site), **env)
    # -P: the current folder is not put on sys.path, so a run from the checkout still imports the installed copy
    return subprocess.run([sys.executable, "-P", "-c", code], cwd=cwd, env=environ, capture_output=True, text=True)


LOAD = ("import cogpipe; from cogpipe.inference import load_pipeline; "
        "assert cogpipe.__file__.startswith(%r), cogpipe.__file__; "  # the installed copy, not the checkout
        "p = load_pipeline(); print(type(p).__name__, p.transformer.config.num_layers)")


def test_outside_a_checkout_the_error_says_what_to_pass(site, tmp_path):
    r = _python(site, tmp_path, LOAD % str(site))
    assert r.returncode != 0
    assert "models/tiny-world not found" in r.stderr and "pass --model" in r.stderr and "COGPIPE_HOME" in r.stderr


def test_from_a_checkout_or_with_cogpipe_home_the_shipped_model_loads(site, tmp_path):
    for cwd, env in ((REPO, {}), (tmp_path, {"COGPIPE_HOME": str(REPO)})):
        r = _python(site, cwd, LOAD % str(site), **env)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.split()[-2:] == ["CogVideoXPipeline", "4"]


def test_the_tiny_recipe_loads_from_another_folder(site, tmp_path):
    code = ("from cogpipe.config import load_config; import sys; "
            "cfg = load_config(sys.argv[1]); print(cfg.model.pretrained); print(cfg.data.root)")
    r = subprocess.run([sys.executable, "-c", code, str(REPO / "configs" / "tiny_lora.yaml")], cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == [str(REPO / "models" / "tiny-world"), str(REPO / "data" / "tiny")]
