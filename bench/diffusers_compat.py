"""Do cogpipe's outputs load in the oldest diffusers release that supports each model?

CogVideoX 1.0 (2B, 5B, 5B-I2V) arrived in the diffusers 0.30 series, CogVideoX 1.5 (patch_size_t, ofs) in 0.32;
both 0.30.0 and the last 0.30 patch release are tried, and the JSON records the oldest release that loads every
artefact (the shape right; the largest difference to the video the current diffusers makes is recorded, as is
whether the converted checkpoint gives exactly the pipeline's video in that release). This script
writes, with the diffusers installed here, for each of the five versions at toy size (tests/fixtures/hub.py):

    pipeline    a pipeline folder as save_pretrained writes it (what an export of a built preset or full fine-tune is)
    converted   the same transformer and VAE through SAT and back (cogpipe.model_sources: a SAT checkpoint converted
                into the checkpoint cache, the base's T5, tokenizer and scheduler linked beside it)
    lora        a LoRA as the export writes it (cogpipe.lora.save_lora: diffusers keys, rank 4 alpha 8 in metadata)

and generates a reference video from each (2 DDIM steps, seed 0, fp32, CPU). Then, in a throwaway virtual
environment per old release (pip from the registry; torch 2.13.0 from this machine's wheels, never torchvision),
a child process that imports only diffusers loads each artefact the plain diffusers way (from_pretrained,
load_lora_weights) and generates the same video; the result is the largest pixel difference to the reference.

    python bench/diffusers_compat.py --out bench/results/diffusers_compat_cpu.json [--work /tmp/compat]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from common import write_json  # noqa: E402

# oldest release per model version, and the pins that release was built against (newer ones dropped its imports)
PINS_030 = ["transformers==4.44.2", "huggingface_hub==0.24.6", "accelerate==0.34.2", "peft==0.12.0"]
RELEASES = {
    "0.30.0": dict(versions=("2b", "5b", "5b-i2v"), pins=PINS_030),
    "0.30.3": dict(versions=("2b", "5b", "5b-i2v"), pins=PINS_030),
    "0.31.0": dict(versions=("2b", "5b", "5b-i2v"),
                   pins=["transformers==4.46.3", "huggingface_hub==0.26.5", "accelerate==1.1.1", "peft==0.13.2"]),
    "0.32.0": dict(versions=("1.5-5b", "1.5-5b-i2v"),
                   pins=["transformers==4.46.3", "huggingface_hub==0.26.5", "accelerate==1.1.1", "peft==0.13.2"]),
}
COMMON = ["torch==2.13.0", "sentencepiece", "protobuf", "safetensors", "numpy<2.3", "pillow", "imageio"]
PROMPT = "a purple square moving left"

CHILD = r'''
import json, sys, traceback
import numpy as np, torch
import diffusers
from PIL import Image

jobs = json.loads(open(sys.argv[1]).read())
out = []
for job in jobs:
    row = {k: job[k] for k in ("version", "artefact")}
    try:
        cls = getattr(diffusers, "CogVideoXImageToVideoPipeline" if job["i2v"] else "CogVideoXPipeline")
        pipe = cls.from_pretrained(job["folder"], torch_dtype=torch.float32)
        if job.get("lora"):
            pipe.load_lora_weights(job["lora"], weight_name="pytorch_lora_weights.safetensors", adapter_name="x")
            pipe.set_adapters(["x"], [1.0])
        pipe.set_progress_bar_config(disable=True)
        kw = dict(prompt=job["prompt"], num_frames=17, height=64, width=64, num_inference_steps=2, guidance_scale=6.0,
                  generator=torch.Generator("cpu").manual_seed(0), output_type="np",
                  max_sequence_length=pipe.transformer.config.max_text_seq_length)
        if job["i2v"]:
            kw["image"] = Image.open(job["image"]).convert("RGB")
        frames = pipe(**kw).frames[0]
        ref = np.load(job["reference"])
        row.update(loaded=True, max_abs_diff=float(np.abs(frames - ref).max()), shape=list(frames.shape))
        np.save(job["reference"].replace(".npy", f"-{diffusers.__version__}.npy"), frames)
    except Exception as e:
        row.update(loaded=False, error=f"{type(e).__name__}: {e}"[:400], trace=traceback.format_exc()[-800:])
    out.append(row)
print(json.dumps({"diffusers": diffusers.__version__, "torch": torch.__version__, "rows": out}))
'''


def make_artefacts(work: Path) -> list[dict]:
    """Write every artefact and its reference video with the diffusers of this environment; returns the jobs."""
    import shutil

    import numpy as np
    import torch
    from PIL import Image

    from cogpipe import model_sources
    from cogpipe.config import LoraConfig
    from cogpipe.convert import convert
    from cogpipe.inference import generate, load_pipeline
    from cogpipe.lora import add_lora, save_lora

    from fixtures.hub import VERSIONS, write_hub_pipeline

    for stale in ("pipeline", "sat", "lora", "reference", "cache"):  # a fresh set; the virtual environments stay
        shutil.rmtree(work / stale, ignore_errors=True)
    os.environ["COGPIPE_MODEL_CACHE"] = str(work / "cache")
    image = work / "first.png"
    Image.fromarray((np.indices((64, 64)).sum(0) % 255).astype(np.uint8)).convert("RGB").save(image)
    jobs = []
    for v in VERSIONS:
        folder = write_hub_pipeline(work / "pipeline" / v, v)
        sat = work / "sat" / v
        convert(folder / "transformer", sat / "transformer")
        convert(folder / "vae", sat / "vae")
        converted = Path(model_sources.resolve(sat, base=str(folder)).folder)
        pipe = load_pipeline(folder, scheduler="keep", device="cpu")
        transformer = pipe.transformer
        add_lora(transformer, LoraConfig(rank=4, alpha=8.0))
        g = torch.Generator().manual_seed(1)
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.data = torch.randn(p.shape, generator=g) * 0.3
        trainable = {n: p.detach() for n, p in transformer.named_parameters() if "lora_" in n}
        save_lora(work / "lora" / v, trainable, LoraConfig(rank=4, alpha=8.0))
        i2v = v.endswith("i2v")
        for artefact, model, lora in (("pipeline", folder, None), ("converted", converted, None),
                                      ("lora", folder, work / "lora" / v)):
            p = load_pipeline(model, lora, scheduler="keep", device="cpu")
            frames = generate(p, PROMPT, 17, 64, 64, 2, 6.0, 0, image=Image.open(image).convert("RGB") if i2v else None)
            reference = work / "reference" / f"{v}-{artefact}.npy"
            reference.parent.mkdir(parents=True, exist_ok=True)
            np.save(reference, frames.astype(np.float32) / 255.0)
            jobs.append(dict(version=v, artefact=artefact, folder=str(model), lora=str(lora) if lora else None,
                             i2v=i2v, image=str(image), prompt=PROMPT, reference=str(reference)))
    return jobs


def _same_as_pipeline(work: Path, version: str, release: str | None) -> bool | None:
    """Whether the converted checkpoint generated exactly the pipeline's video under `release` (None: not run)."""
    import numpy as np

    files = [work / "reference" / f"{version}-{a}-{release}.npy" for a in ("pipeline", "converted")]
    if release is None or not all(f.is_file() for f in files):
        return None
    return bool(np.array_equal(np.load(files[0]), np.load(files[1])))


def venv(work: Path, release: str) -> Path:
    env = work / f"venv-{release}"
    python = env / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"diffusers=={release}", *RELEASES[release]["pins"],
                        *COMMON], check=True)
    return python


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "diffusers_compat_cpu.json"))
    p.add_argument("--work", default="/tmp/cogpipe-compat")
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import diffusers
    import torch

    start = time.time()
    jobs = make_artefacts(work)
    result = {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpus": os.cpu_count(), "python": platform.python_version()},
              "written_with": {"diffusers": diffusers.__version__, "torch": torch.__version__},
              "settings": "toy-size hub-layout fixtures, 17 frames 64x64, 2 DDIM steps, seed 0, fp32, CPU",
              "releases": {}}
    for release, spec in RELEASES.items():
        python = venv(work, release)
        mine = [j for j in jobs if j["version"] in spec["versions"]]
        (work / f"jobs-{release}.json").write_text(json.dumps(mine))
        (work / "child.py").write_text(CHILD)
        r = subprocess.run([str(python), str(work / "child.py"), str(work / f"jobs-{release}.json")],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
        if r.returncode != 0:
            result["releases"][release] = {"error": r.stderr[-2000:]}
            continue
        result["releases"][release] = json.loads(r.stdout.strip().splitlines()[-1])
    oldest = {}
    for release, rel in result["releases"].items():  # in release order: the first where every artefact loads
        for v in RELEASES[release]["versions"]:
            rows = [r for r in rel.get("rows", []) if r["version"] == v]
            for artefact in ("pipeline", "converted", "lora"):
                if (v, artefact) not in oldest and any(r["artefact"] == artefact and r["loaded"] and
                                                       r["shape"] == [17, 64, 64, 3] for r in rows):
                    oldest[(v, artefact)] = release
            same = _same_as_pipeline(work, v, rel.get("diffusers"))
            if same is not None:
                rel.setdefault("converted_equals_pipeline", {})[v] = same
    result["oldest_release_loading"] = {f"{v} {a}": r for (v, a), r in oldest.items()}
    want = {(v, a) for spec in RELEASES.values() for v in spec["versions"] for a in ("pipeline", "converted", "lora")}
    result["all_loaded"] = set(oldest) == want
    result["seconds"] = round(time.time() - start, 1)
    write_json(Path(a.out), result)
    print(json.dumps({k: result[k] for k in ("oldest_release_loading", "all_loaded", "seconds")}))
    return 0 if result["all_loaded"] else 1


if __name__ == "__main__":
    sys.exit(main())
