"""Steady-state training speed of cogpipe against the diffusers example trainer; prints one JSON line.

    python bench/diffusers_example.py --example /path/to/train_cogvideox_lora.py \
        [--steps 1500] [--repeat 3] [--out bench/results/diffusers_example_cpu.json]

`--example` is a copy of diffusers' examples/cogvideo/train_cogvideox_lora.py that the user supplies (third-party
code: not shipped here). Both trainers run as separate processes under plain `accelerate launch` (no accelerate
config: one process, on the CPU, OMP_NUM_THREADS=1; cogpipe gets train.cpu_threads=1 to match), on:

  model     one tiny random CogVideoX pipeline (cogpipe's `tiny` preset: 2 layers, hidden 32, byte-level T5
            tokenizer), saved in Diffusers format once and loaded from that folder by both (cogpipe through
            model.pretrained). The example loads the transformer in fp16 (its rule for paths without "5b") and then
            casts it to fp32, so the saved transformer weights are rounded to fp16 first: both train the very same
            values. The folder's path holds no "5b" (the example would load bf16).
  data      24 synthetic world clips (17 frames, 64x64, 8 fps) from tests/helpers.py make_clips, in its `txt`
            layout: videos/*.mp4 with videos.txt and prompts.txt, which is what both read (the example through
            --instance_data_root/--video_column/--caption_column, cogpipe through data.root).
  settings  batch 1, LoRA rank 16 alpha 16, AdamW (betas 0.9/0.95, eps 1e-8, weight decay 1e-4: cogpipe's
            defaults, passed to the example with --optimizer adamw), lr 1e-4 constant, no warmup, no gradient
            accumulation, max grad norm 1.0, seed 42, fp32, no validation, no checkpoint before the end, no tracker.

Each trainer has setup costs outside its loop (loading, VAE encoding, caches) and after it (saving); only its loop
is timed, from the trainer's own progress bar: tqdm prints elapsed time in whole seconds, so both processes get
TQDM_BAR_FORMAT (tqdm's own environment override of its default, no code change) with the bar's position and
elapsed_s to the microsecond at every redraw (the example's "Steps" bar redraws every step, cogpipe's "train" bar
at tqdm's 0.1 s interval). After `--warmup` steps, the redraws are cut into windows of at least `--window`
seconds, and each window gives a time per step. A shared virtual machine's speed swings by 10% and more from
minute to minute, and the swings only ever add time, so each trainer stands for its `--quantile` (0.1) of all its
window times over `--repeat` runs (alternating example and cogpipe): its speed when undisturbed, the same
statistic as bench/loop_overhead.py. The speed over each whole timed stretch and the medians are reported beside.

torchvision cannot be installed here (a CPU-only torch; its wheels pull a CUDA torch), and the example imports it
only for video preprocessing, so its process finds a stand-in `torchvision` first on PYTHONPATH (STANDIN below):
transforms.InterpolationMode, transforms.functional.resize (tensor path: torch.nn.functional.interpolate,
antialias for bilinear/bicubic, align_corners False, input returned unchanged when the size is already right) and
transforms.functional.crop (slicing, zero padding outside the image), with torchvision's semantics on tensors.
On these 64x64 clips at 64x64 the resize returns its input and the crop is the whole frame. transformers takes any
importable torchvision for an installed one and then imports transforms.functional.pil_to_tensor, io and
transforms.v2.functional at import time, so the stand-in has those too, as names that are never called (pil_to_tensor
raises) and empty modules. The example file runs
unchanged unless its check_min_version asks for a newer diffusers than the installed one; then a copy with that
one line commented out runs instead. Every change is listed under "example_changes" in the output.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from common import at_quantile, emit, world_clips  # noqa: E402

# tqdm's default format shows elapsed time in whole seconds; this one (set through tqdm's TQDM_BAR_FORMAT environment
# override, for both trainers) prints the bar's description, position and elapsed seconds at full precision
BAR_FORMAT = "<<bar|{desc}|{n}|{total}|{elapsed_s:.6f}>>"
BAR_RE = re.compile(r"<<bar\|(.*?)\|(\d+)\|(\d+)\|([0-9.]+)>>")

STANDIN = {
    "torchvision/__init__.py": '''\
"""Stand-in for torchvision (written by cogpipe's bench/diffusers_example.py): only what the diffusers CogVideoX
LoRA example uses for its video preprocessing, with torchvision's semantics on tensors."""

from . import io, transforms  # noqa: F401

__version__ = "0.0.0+standin"
''',
    "torchvision/io.py": '''\
"""Empty: transformers' video_utils imports torchvision.io whenever a torchvision is importable; nothing of it is
used by the example."""
''',
    "torchvision/transforms/__init__.py": '''\
from . import functional, v2  # noqa: F401
from .functional import InterpolationMode  # noqa: F401
''',
    "torchvision/transforms/v2/__init__.py": '''\
"""Empty: transformers' image_processing_utils and image_processing_backends import transforms.v2.functional
whenever a torchvision is importable, and use it only inside image processors, which the example never runs."""

from . import functional  # noqa: F401
''',
    "torchvision/transforms/v2/functional.py": '''\
"""Empty (see transforms/v2/__init__.py)."""
''',
    "torchvision/transforms/functional.py": '''\
import enum

import torch
import torch.nn.functional as F


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def resize(img, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=True):
    """torchvision.transforms.functional.resize on a tensor [..., H, W]."""
    if not isinstance(img, torch.Tensor):
        raise TypeError("stand-in torchvision: resize takes tensors only")
    if max_size is not None:
        raise NotImplementedError("stand-in torchvision: max_size")
    h, w = img.shape[-2:]
    if isinstance(size, int):
        size = [size]
    if len(size) == 1:  # the shorter side to size[0], the aspect kept
        short, long = (h, w) if h <= w else (w, h)
        new_short, new_long = size[0], int(size[0] * long / short)
        size = [new_short, new_long] if h <= w else [new_long, new_short]
    size = [int(s) for s in size]
    if size == [h, w]:
        return img
    mode = interpolation.value
    if mode not in ("nearest", "nearest-exact", "bilinear", "bicubic"):
        raise NotImplementedError(f"stand-in torchvision: interpolation {mode}")
    smooth = mode in ("bilinear", "bicubic")
    shape, dtype = img.shape, img.dtype
    x = img.reshape(-1, *shape[-3:]) if img.ndim > 3 else img[None]
    if not x.is_floating_point():
        x = x.float()
    x = F.interpolate(x, size=size, mode=mode, align_corners=False if smooth else None,
                      antialias=antialias if smooth else False)
    if mode == "bicubic" and dtype == torch.uint8:
        x = x.clamp(0, 255)
    if not dtype.is_floating_point:
        x = x.round().to(dtype)
    return x.reshape(*shape[:-2], *size) if img.ndim > 3 else x[0]


def pil_to_tensor(pic):
    """Not used by the example: transformers' image_utils imports it whenever a torchvision is importable."""
    raise NotImplementedError("stand-in torchvision: pil_to_tensor")


def crop(img, top, left, height, width):
    """torchvision.transforms.functional.crop on a tensor [..., H, W]: zero padding where the box leaves it."""
    h, w = img.shape[-2:]
    right, bottom = left + width, top + height
    if left < 0 or top < 0 or right > w or bottom > h:
        pad = [max(-left, 0), max(right - w, 0), max(-top, 0), max(bottom - h, 0)]
        return F.pad(img[..., max(top, 0):bottom, max(left, 0):right], pad, value=0)
    return img[..., top:bottom, left:right]
''',
}
STANDIN_USES = {
    "torchvision.transforms (as TT)": "TT.functional.crop in VideoDataset._resize_for_rectangle_crop",
    "torchvision.transforms.InterpolationMode": "InterpolationMode.BICUBIC for resize",
    "torchvision.transforms.functional.resize": "bicubic resize in VideoDataset._resize_for_rectangle_crop",
}
# imported, never called: transformers treats any importable torchvision as installed and then imports these
STANDIN_IMPORT_ONLY = {
    "torchvision.transforms.functional.pil_to_tensor": "transformers.image_utils (raises NotImplementedError)",
    "torchvision.io": "transformers.video_utils (empty module)",
    "torchvision.transforms.v2.functional": "transformers.image_processing_utils and image_processing_backends "
                                            "(empty module)",
}
SETTINGS = dict(batch_size=1, lora_rank=16, lora_alpha=16, lora_dropout=0.0,
                lora_targets=["to_q", "to_k", "to_v", "to_out.0"], optimizer="AdamW", adam_betas=[0.9, 0.95],
                adam_eps=1e-8,
                weight_decay=1e-4, lr=1e-4, lr_scheduler="constant", warmup_steps=0, grad_accum=1, max_grad_norm=1.0,
                seed=42, precision="fp32", height=64, width=64, frames=17, fps=8, clips=24, validation=None,
                checkpoints="none before the end of the run", tracker=None, threads=1)


def make_model(folder: Path) -> Path:
    """cogpipe's tiny preset as a Diffusers pipeline folder, the transformer's weights rounded to fp16."""
    import torch

    from cogpipe import models
    from cogpipe.config import load_config

    cfg = load_config(REPO / "configs" / "tiny_lora.yaml", ["model.pretrained=null", "model.preset=tiny"])
    pipe = models.build_pipeline(cfg.model, torch.float32)
    with torch.no_grad():
        for p in pipe.transformer.parameters():
            p.copy_(p.half().float())
    pipe.save_pretrained(folder)
    return folder


def example_copy(example: Path, work: Path) -> tuple[Path, list[str]]:
    """The example to run, and the changes made to it: none unless its check_min_version asks for more than the
    installed diffusers."""
    import diffusers
    from packaging.version import Version

    text = example.read_text()
    found = re.search(r'^check_min_version\("([^"]+)"\)\s*$', text, flags=re.M)
    if found is None or Version(diffusers.__version__) >= Version(found.group(1)):
        return example, []
    line = found.group(0)
    (work / "example").mkdir()
    copy = work / "example" / example.name
    copy.write_text(text.replace(line, "# " + line, 1))
    return copy, [f"commented out `{line}` (installed diffusers {diffusers.__version__})"]


def write_standin(folder: Path) -> Path:
    for rel, source in STANDIN.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(source)
    return folder


def bar_displays(stderr: str, desc: str) -> list[tuple[int, float]]:
    """(position, elapsed seconds) of every redraw of the tqdm bar `desc`, in order."""
    shown = []
    for line in re.split(r"[\r\n]", stderr):
        for d, pos, _, elapsed in BAR_RE.findall(line):
            if d.strip().rstrip(":") == desc:
                shown.append((int(pos), float(elapsed)))
    if not shown:
        raise RuntimeError(f"no display of the tqdm bar {desc!r}")
    return shown


def timed(shown: list[tuple[int, float]], warmup: int, window: float) -> dict:
    """The redraws after `warmup` steps cut into windows of at least `window` seconds: each window's seconds per
    step, and the whole stretch's steps/s."""
    after = [(n, t) for n, t in shown if n >= warmup]
    per_step, (n0, t0) = [], after[0]
    for n, t in after[1:]:
        if t - t0 >= window and n > n0:
            per_step.append((t - t0) / (n - n0))
            n0, t0 = n, t
    (first_n, first_t), (last_n, last_t) = after[0], after[-1]
    return {"from_step": first_n, "to_step": last_n, "steps_per_s": (last_n - first_n) / (last_t - first_t),
            "window_s_per_step": per_step}


def launch(cmd: list[str], env: dict, cwd: Path, log: Path) -> tuple[float, str]:
    """Run one trainer; (whole-process wall seconds, its stderr). stdout and stderr are kept under `log`."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log.with_suffix(".stdout").write_text(proc.stdout)
    log.with_suffix(".stderr").write_text(proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return wall, proc.stderr


class Bench:
    def __init__(self, work: Path, example: Path, standin: Path, model: Path, clips: Path):
        self.work, self.example, self.model, self.clips = work, example, model, clips
        accelerate = str(Path(sys.executable).with_name("accelerate"))
        self.launch = [accelerate, "launch"]
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false",
                   TQDM_BAR_FORMAT=BAR_FORMAT)
        self.env = env
        self.example_env = dict(env, PYTHONPATH=os.pathsep.join(filter(None, [str(standin),
                                                                              env.get("PYTHONPATH")])))

    def example_cmd(self, steps: int, out: Path) -> list[str]:
        s = SETTINGS
        return [*self.launch, str(self.example),
                "--pretrained_model_name_or_path", str(self.model), "--instance_data_root", str(self.clips),
                "--caption_column", "prompts.txt", "--video_column", "videos.txt", "--height", str(s["height"]),
                "--width", str(s["width"]), "--fps", str(s["fps"]), "--max_num_frames", str(s["frames"]),
                "--train_batch_size", "1", "--rank", "16", "--lora_alpha", "16", "--optimizer", "adamw",
                "--adam_beta1", "0.9", "--adam_beta2", "0.95", "--adam_epsilon", "1e-8", "--adam_weight_decay", "1e-4",
                "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
                "--gradient_accumulation_steps", "1", "--max_grad_norm", "1.0", "--seed", "42",
                "--mixed_precision", "no", "--max_train_steps", str(steps), "--checkpointing_steps", str(10 * steps),
                "--output_dir", str(out)]

    def cogpipe_cmd(self, steps: int, out: Path) -> list[str]:
        return [*self.launch, str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny_lora.yaml"),
                f"model.pretrained={self.model}", f"data.root={self.clips}", f"data.cache_dir={out}/cache",
                f"output_dir={out}", "report_to=none", "train.batch_size=1", "lora.rank=16", "lora.alpha=16",
                "train.lr=1e-4", "train.lr_scheduler=constant", "train.warmup_steps=0", "train.checkpoint_every=0",
                "validation.prompts=[]", "train.cpu_threads=1", "train.seed=42", "train.grad_accum=1",
                "train.max_grad_norm=1.0", f"train.max_steps={steps}"]

    def run_example(self, steps: int, warmup: int, window: float, name: str) -> dict:
        out = self.work / "runs" / name
        wall, stderr = launch(self.example_cmd(steps, out), self.example_env, self.work, self.work / "logs" / name)
        return {"wall_s": wall, **timed(bar_displays(stderr, "Steps"), warmup, window)}

    def run_cogpipe(self, steps: int, warmup: int, window: float, name: str) -> dict:
        out = self.work / "runs" / name
        wall, stderr = launch(self.cogpipe_cmd(steps, out), self.env, REPO, self.work / "logs" / name)
        return {"wall_s": wall, **timed(bar_displays(stderr, "train"), warmup, window)}


def workdir() -> Path:
    """A new temporary folder whose path holds no "5b"."""
    while True:
        work = Path(tempfile.mkdtemp(prefix="cogpipe-bench-"))
        if "5b" not in str(work).lower():
            return work
        work.rmdir()


def machine() -> dict:
    import accelerate
    import diffusers
    import peft
    import torch
    import transformers

    return {"cpu_cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "peft": peft.__version__, "gpu": torch.cuda.is_available()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--example", type=Path, required=True, help="a copy of diffusers' train_cogvideox_lora.py")
    ap.add_argument("--steps", type=int, default=1500, help="optimizer steps of each run")
    ap.add_argument("--warmup", type=int, default=300, help="steps before the timed stretch")
    ap.add_argument("--window", type=float, default=0.25, help="seconds of loop a timed window spans at least")
    ap.add_argument("--quantile", type=float, default=0.1, help="of the window times that stand for each trainer")
    ap.add_argument("--repeat", type=int, default=3, help="runs per trainer, alternating")
    ap.add_argument("--out", type=Path, default=None, help="also write the result here, indented")
    ap.add_argument("--keep", type=Path, default=None, help="work in this (new) folder and keep it: logs, outputs")
    args = ap.parse_args(argv)
    example = args.example.resolve()
    if not example.is_file():
        ap.error(f"--example {example}: no such file")

    work = args.keep.resolve() if args.keep else workdir()
    if "5b" in str(work).lower():  # the example would load the transformer in bf16 (its rule for 5b paths)
        ap.error(f"--keep {work}: the path must not contain '5b'")
    try:
        (work / "logs").mkdir(parents=True, exist_ok=True)
        model = make_model(work / "tiny-cogvideox")
        clips = world_clips(work / "clips", SETTINGS["clips"], frames=SETTINGS["frames"], size=SETTINGS["height"])
        run_example, changes = example_copy(example, work)
        bench = Bench(work, run_example, write_standin(work / "standin"), model, clips)

        example_runs, cogpipe_runs = [], []
        for r in range(args.repeat):
            example_runs.append(bench.run_example(args.steps, args.warmup, args.window, f"example-{r}"))
            cogpipe_runs.append(bench.run_cogpipe(args.steps, args.warmup, args.window, f"cogpipe-{r}"))
        commands = {"example": bench.example_cmd(args.steps, work / "runs" / "example-R"),
                    "cogpipe": bench.cogpipe_cmd(args.steps, work / "runs" / "cogpipe-R")}
        commands = {k: [a.replace(str(work), "$WORK").replace(str(REPO) + "/", "") for a in v]
                    for k, v in commands.items()}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    def typical(runs):  # steps/s at the quantile of all window times of all runs
        return 1 / at_quantile((t for run in runs for t in run["window_s_per_step"]), args.quantile)

    ex, cp = typical(example_runs), typical(cogpipe_runs)
    for run in example_runs + cogpipe_runs:  # the windows' spread, not every window
        w = sorted(run.pop("window_s_per_step"))
        run["windows"] = len(w)
        run["window_steps_per_s"] = {"best": 1 / w[0], "median": 1 / w[len(w) // 2], "worst": 1 / w[-1]}
    result = {
        "bench": "diffusers_example",
        "example": {"file": example.name, "sha256": hashlib.sha256(example.read_bytes()).hexdigest()},
        "example_changes": changes,
        "example_standins": {"torchvision": {"why": "not installable here (its wheels pull a CUDA torch); the example "
                                                    "imports it only for video preprocessing",
                                             "uses": STANDIN_USES,
                                             "import_only": STANDIN_IMPORT_ONLY,
                                             "on_this_data": "64x64 clips at 64x64: resize returns its input, crop "
                                                             "keeps the whole frame"}},
        "model": "cogpipe's tiny preset (2 layers, hidden 32, byte-level T5 tokenizer) saved with save_pretrained; "
                 "transformer weights rounded to fp16 (the example loads it in fp16, then casts to fp32)",
        "settings": SETTINGS,
        "steps": args.steps, "warmup": args.warmup, "window_s": args.window, "quantile": args.quantile,
        "repeat": args.repeat,
        "method": "each trainer's progress bar (tqdm, TQDM_BAR_FORMAT with elapsed_s) after the warmup steps, cut "
                  "into windows of at least window_s; steps/s at the quantile of all window times of all runs; runs "
                  "alternate example, cogpipe",
        "launcher": "plain `accelerate launch` (no accelerate config file: 1 process, CPU, OMP_NUM_THREADS=1)",
        "env": {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
                "TOKENIZERS_PARALLELISM": "false", "TQDM_BAR_FORMAT": BAR_FORMAT,
                "PYTHONPATH (example only)": "$WORK/standin"},
        "commands": commands,
        "machine": machine(),
        "example_steps_per_s": ex,
        "cogpipe_steps_per_s": cp,
        "ratio": cp / ex,
        "ratio_of_whole_stretch_medians": statistics.median(r["steps_per_s"] for r in cogpipe_runs)
        / statistics.median(r["steps_per_s"] for r in example_runs),
        "runs": [{"example": e, "cogpipe": c} for e, c in zip(example_runs, cogpipe_runs)],
    }
    return emit(result, args.out)


if __name__ == "__main__":
    main()
