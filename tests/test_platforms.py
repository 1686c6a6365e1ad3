"""What pyproject.toml declares for each platform (.ci/resolve_platforms.py's marker environments): decord only where
it has wheels, PyAV everywhere, no DeepSpeed on macOS; and the resolver's failure line names the package. The
resolution itself needs the package index: CI runs it (.ci/run), not this offline suite."""

import importlib.util

import pytest
from packaging.requirements import Requirement

from helpers import REPO

spec = importlib.util.spec_from_file_location("resolve_platforms", REPO / ".ci" / "resolve_platforms.py")
resolve_platforms = importlib.util.module_from_spec(spec)
spec.loader.exec_module(resolve_platforms)


def _installed_on(platform: str) -> set[str]:
    env = resolve_platforms.PLATFORMS[platform][1]
    return {Requirement(r).name for r in resolve_platforms.requirements()
            if Requirement(r).marker is None or Requirement(r).marker.evaluate(env)}


@pytest.mark.parametrize("platform,decord,deepspeed", [("linux-x86_64", True, True), ("windows-x86_64", True, True),
                                                       ("linux-aarch64", False, True), ("macos-arm64", False, False)])
def test_each_platform_gets_decord_only_where_it_has_wheels_and_pyav_everywhere(platform, decord, deepspeed):
    names = _installed_on(platform)
    assert {"av", "torch", "diffusers", "gradio", "torchao", "pytest"} <= names
    assert ("decord" in names) == decord and ("deepspeed" in names) == deepspeed
    assert "imageio-ffmpeg" not in names  # PyAV writes the mp4s
    assert "torch==2.13.0" in resolve_platforms.requirements()


def test_the_wheel_tags_and_markers_describe_each_platform():
    tags, env = resolve_platforms.PLATFORMS["linux-aarch64"]
    assert tags[0] == "manylinux_2_35_aarch64" and "manylinux2014_aarch64" in tags and "manylinux_2_28_aarch64" in tags
    assert (env["sys_platform"], env["platform_machine"]) == ("linux", "aarch64")
    assert resolve_platforms.PLATFORMS["windows-x86_64"][1]["platform_machine"] == "AMD64"
    assert resolve_platforms.PLATFORMS["macos-arm64"][0] == ["macosx_14_0_arm64"]


def test_a_failure_names_the_package():
    out = ("ERROR: Could not find a version that satisfies the requirement decord>=0.6 (from versions: none)\n"
           "ERROR: No matching distribution found for decord>=0.6\n")
    assert resolve_platforms._failure(out) == "decord>=0.6"
    assert resolve_platforms._name("decord>=0.6; sys_platform == 'linux'") == "decord"
    assert resolve_platforms._name("Pytest-Xdist>=3.6") == "pytest-xdist"
