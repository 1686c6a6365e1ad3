"""Resolve cogpipe's full dependency set (core + every extra, with torch==2.13.0 as the README installs it) for the
four platforms its users install on, with pip's dry run against the package index: wheel metadata only (HTTP range
requests, pip's fast-deps), nothing installed, nothing downloaded beyond the wheels' metadata (and one source
archive's metadata where a package ships no wheel: see SOURCE_ONLY). Exits non-zero naming the platform and the
package that does not resolve.

    python .ci/resolve_platforms.py                  # all four, in parallel; prints a line per platform
    python .ci/resolve_platforms.py --keep reports/  # also keep pip's JSON report per platform

pip's --platform chooses wheel tags, but pip evaluates environment markers (`; sys_platform == "linux"`) against the
machine it runs on; each platform's resolution therefore runs pip in a child process whose marker environment is the
target's (pip's vendored packaging.markers.default_environment, replaced before pip starts).
The resolution uses the package index alone: this machine's pip configuration files and find-links (local wheel
folders, constraints) are ignored, as a user's machine would not have them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
PYTHON = "3.11"
TORCH = "torch==2.13.0"  # the README's first install line


def _manylinux(arch: str) -> list[str]:
    # pip expands macosx_* and manylinux2014 tags to the older ones a machine also accepts, not manylinux_2_x: list
    # them (glibc 2.35: Ubuntu 22.04, the base of GH200/GB200 and most x86_64 GPU images; down to manylinux2014)
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(35, 16, -1)] + [f"manylinux2014_{arch}"]
    return tags + ([f"manylinux2010_{arch}", f"manylinux1_{arch}"] if arch == "x86_64" else [])


def _markers(sys_platform, system, machine, os_name):
    return {"sys_platform": sys_platform, "platform_system": system, "platform_machine": machine, "os_name": os_name,
            "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "python_version": PYTHON, "python_full_version": PYTHON + ".0", "implementation_version": PYTHON + ".0",
            "platform_release": "", "platform_version": ""}


PLATFORMS = {
    "linux-x86_64": (_manylinux("x86_64"), _markers("linux", "Linux", "x86_64", "posix")),
    "linux-aarch64": (_manylinux("aarch64"), _markers("linux", "Linux", "aarch64", "posix")),
    "macos-arm64": (["macosx_14_0_arm64"], _markers("darwin", "Darwin", "arm64", "posix")),
    "windows-x86_64": (["win_amd64"], _markers("win32", "Windows", "AMD64", "nt")),
}

# Packages that PyPI ships only as a source archive on some platforms: resolved by their own metadata (pip builds it
# from the sdist: a small download), their requirements then resolve with everything else, wheels only.
SOURCE_ONLY = {"deepspeed"}


def requirements() -> list[str]:
    """The project's core and every extra's requirements, as pyproject.toml declares them."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in sorted(project.get("optional-dependencies", {})):
        reqs += project["optional-dependencies"][extra]
    return reqs + [TORCH]


def _name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[(@]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


PIP = "pip>=25.1"  # pip 23.2 (Python 3.11's own) takes 5 minutes for the four, pip 26.3 one and a half
_PIP_HOME: list[str] = []  # where a recent enough pip was put (a temporary folder), when the running one is older


def _recent_pip() -> str | None:
    """A folder to put first on the children's PYTHONPATH for a recent pip; None when the running pip is recent."""
    import pip

    if int(pip.__version__.split(".")[0]) >= 25:
        return None
    if not _PIP_HOME:
        home = tempfile.mkdtemp(prefix="resolve-pip-")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "--root-user-action=ignore", "--target", home, PIP], check=True,
                       env={**_index_env(), "PYTHONPATH": ""})
        _PIP_HOME.append(home)
    return _PIP_HOME[0]


def _index_env() -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in ("PIP_CERT",
                                                                                        "PIP_DEFAULT_TIMEOUT")}
    environ.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return environ


CHILD = """
import json, sys
import pip._vendor.packaging.markers as markers
env = json.loads(sys.argv[1])
markers.default_environment = lambda: dict(env)
from pip._internal.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


def pip(platform: str, args: list[str]) -> subprocess.CompletedProcess:
    tags, env = PLATFORMS[platform]
    environ = _index_env()
    home = _recent_pip()
    if home:
        environ["PYTHONPATH"] = home
    with tempfile.TemporaryDirectory() as target:
        cmd = [sys.executable, "-c", CHILD, json.dumps(env), "install", "--dry-run", "--ignore-installed",
               "--target", target, "--python-version", PYTHON, "--implementation", "cp", "--use-feature=fast-deps",
               "--no-cache-dir", "--progress-bar", "off"]
        for tag in tags:
            cmd += ["--platform", tag]
        return subprocess.run(cmd + args, env=environ, capture_output=True, text=True)


def _failure(out: str) -> str:
    for pattern in (r"No matching distribution found for (\S+)", r"Could not find a version that satisfies the "
                    r"requirement (\S+)", r"Cannot install (.+?) because", r"(\S+ .*conflict.*)"):
        m = re.search(pattern, out)
        if m:
            return m.group(1)
    lines = [line for line in out.splitlines() if line.startswith("ERROR")]
    return (lines or out.strip().splitlines()[-1:] or ["(no output)"])[0]


def source_only_requirements(platform: str, req: str) -> tuple[str, list[str]]:
    """A source-only package's pinned name==version and its own requirements (markers kept; extras' dropped)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        r = pip(platform, ["--no-deps", "--report", str(report), req])
        if r.returncode != 0:
            raise SystemExit(f"{platform}: {req} does not resolve: {_failure(r.stdout + r.stderr)}")
        [item] = json.loads(report.read_text())["install"]
    meta = item["metadata"]
    return f"{meta['name']}=={meta['version']}", [d for d in meta.get("requires_dist", []) if "extra ==" not in d]


def resolve(platform: str, reqs: list[str], keep: Path | None) -> tuple[str, bool, str]:
    start = time.monotonic()
    reqs = list(reqs)
    pinned = []
    try:
        for req in [r for r in reqs if _name(r) in SOURCE_ONLY]:
            r = pip(platform, ["--no-deps", "--only-binary=:all:", "--report", os.devnull, req])
            if r.returncode == 0:
                continue  # a wheel exists here (or the marker leaves it out): resolved with the rest
            reqs.remove(req)
            pin, requires = source_only_requirements(platform, req)
            pinned.append(pin + " (sdist)")
            reqs += requires
    except SystemExit as e:
        return platform, False, str(e)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        r = pip(platform, ["--only-binary=:all:", "--report", str(report)] + reqs)
        took = time.monotonic() - start
        if r.returncode != 0:
            return platform, False, f"{platform}: does not resolve ({took:.0f} s): {_failure(r.stdout + r.stderr)}"
        installed = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())
                     ["install"]}
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            (keep / f"{platform}.json").write_text(report.read_text())
    shown = ", ".join(f"{n} {installed[n]}" for n in ("torch", "av", "decord", "deepspeed", "torchao", "gradio")
                      if n in installed)
    return platform, True, (f"{platform}: {len(installed)} packages resolve ({took:.0f} s): {shown}"
                            + (f"; built metadata of {', '.join(pinned)}" if pinned else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--platform", action="append", choices=sorted(PLATFORMS), help="default: all four")
    parser.add_argument("--keep", type=Path, help="folder for pip's JSON report of each platform")
    args = parser.parse_args(argv)
    platforms = args.platform or list(PLATFORMS)
    reqs = requirements()
    start = time.monotonic()
    _recent_pip()
    try:
        with ThreadPoolExecutor(len(platforms)) as pool:
            results = list(pool.map(lambda p: resolve(p, reqs, args.keep), platforms))
    finally:
        for home in _PIP_HOME:
            shutil.rmtree(home, ignore_errors=True)
    for _, ok, line in results:
        print(("ok    " if ok else "FAIL  ") + line, flush=True)
    failed = [p for p, ok, _ in results if not ok]
    if failed:
        print(f"resolve_platforms: {len(failed)} of {len(results)} platforms do not resolve: {', '.join(failed)} "
              f"({time.monotonic() - start:.0f} s)")
        return 1
    print(f"resolve_platforms: all {len(results)} platforms resolve ({time.monotonic() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
