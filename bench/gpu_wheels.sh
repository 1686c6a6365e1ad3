#!/usr/bin/env bash
# Fetch, here, the wheels the GPU machine's image lacks (Python 3.12, x86-64) into .whl/ (ignored by git), for
# bench/gpu_check.sh to install there. Versions: those this project is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux2010_x86_64 --platform manylinux1_x86_64 -d .whl \
  diffusers==0.42.1 omegaconf==2.4.0 decord==0.6.0 av==18.1.0
du -sh .whl
