"""Soak test: kill a tiny training run with SIGKILL at random moments, resume it each time, and
check that the final weights equal those of a run never killed. Prints one JSON line.

    python bench/soak.py --kills 10 [--steps 12] [--seed 0]
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def launch(out: Path, cache: Path, steps: int, data: str) -> subprocess.Popen:
    args = [f"output_dir={out}", f"data.root={data}", f"data.cache_dir={cache}", "report_to=none",
            f"train.max_steps={steps}", "train.checkpoint_every=1", "train.log_every=1", "train.resume_from=latest",
            "validation.steps=2", "lora.rank=4", "lora.alpha=8"]
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/tiny_lora.yaml"),
                             *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})


def last_step(metrics: Path) -> int:
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def kill_at_random(proc, metrics: Path, steps: int, rng) -> bool:
    """SIGKILL once a random later step is logged, after a random delay of up to half a second:
    between steps, inside a step or inside a checkpoint save. False if the run finished first."""
    target = rng.randint(min(last_step(metrics) + 1, steps), steps)
    while last_step(metrics) < target:
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.5))
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def final_weights(out: Path, steps: int) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoints" / f"checkpoint-{steps:06d}" / "trainable.safetensors"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=str(REPO / "data" / "tiny"))
    a = p.parse_args()
    rng = random.Random(a.seed)
    work = Path(tempfile.mkdtemp(prefix="cogpipe-soak-"))
    cache = work / "cache"
    t0 = time.time()
    ref = launch(work / "ref", cache, a.steps, a.data)
    if ref.wait() != 0:
        print(json.dumps({"error": "the uninterrupted run failed"}))
        return 1
    out, kills, launches = work / "soak", 0, 0
    while True:
        proc = launch(out, cache, a.steps, a.data)
        launches += 1
        if kills < a.kills and kill_at_random(proc, out / "metrics.jsonl", a.steps, rng):
            kills += 1
            continue
        if proc.wait() != 0:
            print(json.dumps({"error": f"launch {launches} failed with exit code {proc.returncode}"}))
            return 1
        break
    expected, got = final_weights(work / "ref", a.steps), final_weights(out, a.steps)
    import torch

    match = set(expected) == set(got) and all(torch.equal(expected[k], got[k]) for k in expected)
    print(json.dumps({"kills": kills, "launches": launches, "steps": a.steps, "bit_identical": match,
                      "wall_s": round(time.time() - t0, 1)}))
    shutil.rmtree(work, ignore_errors=True)
    return 0 if match else 1


if __name__ == "__main__":
    sys.exit(main())
