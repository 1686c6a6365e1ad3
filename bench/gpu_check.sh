#!/usr/bin/env bash
# The GPU check on a machine with one CUDA GPU and PyTorch (e.g. the lent H200, whose image lacks diffusers,
# omegaconf, decord and av): installs the wheels carried in .whl/ (bench/gpu_wheels.sh fetches them),
# then runs bench/gpu_check.py. Results: bench/results/gpu_check_<device>.json, or $OUT/ when set.
#
#   bash bench/gpu_wheels.sh                                   # first, here, once: .whl/ (about 56 MB)
#   bash bench/gpu_check.sh                                    # there (device tool: carry .whl); 5 min by default
#                                                              # (BUDGET_MIN=N), JSON rewritten after every stage
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
name=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower() if torch.cuda.is_available() else 'cpu')")
out="${OUT:-bench/results}/gpu_check_${name}.json"
python3 bench/gpu_check.py --out "$out" --budget-min "${BUDGET_MIN:-5}" "$@"
