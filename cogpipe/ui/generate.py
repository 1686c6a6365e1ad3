"""The Generate tab's work, on infer.py's own code: the page's fields become infer.py arguments, parsed by its
parser (cogpipe.inference.cli), checked by its `prepare` before any weights load, loaded by its `load` and sampled
by its `sample`. The last pipeline stays loaded while the model, LoRAs and loading switches stay the same."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from cogpipe import model_sources
from cogpipe.inference import cli as infer
from cogpipe.inference import resolve_clip, speed
from cogpipe.inference.pipeline import shipped_model
from cogpipe.ui.safety import PathGuard
from cogpipe.video import write_mp4

GENERATED = "ui_generate"  # under the outputs folder: the page's videos (not a run)
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def shipped_models() -> list[str]:
    try:
        return [str(shipped_model())]
    except FileNotFoundError:
        return []


def exported_models(outputs) -> list[str]:
    """outputs/*/export folders that are Diffusers pipelines."""
    return sorted(str(p.parent) for p in Path(outputs).glob("*/export/model_index.json"))


def found_loras(outputs) -> list[str]:
    """LoRAs under outputs/*/lora in each format a run writes: the diffusers folder, lora/sat/, lora/comfyui/*."""
    found = []
    for lora in sorted(Path(outputs).glob("*/lora")):
        if (lora / LORA_WEIGHTS).is_file():
            found.append(str(lora))
        if (lora / "sat").is_dir() and any((lora / "sat").iterdir()):
            found.append(str(lora / "sat"))
        found += [str(p) for p in sorted((lora / "comfyui").glob("*.safetensors"))]
    return found


def parse_scales(text, count: int) -> list[float]:
    """One scale for every LoRA, or one each; ValueError naming the field otherwise."""
    parts = [p for p in str(text or "").replace(",", " ").split() if p]
    try:
        scales = [float(p) for p in parts] or [1.0]
    except ValueError:
        raise ValueError(f"LoRA scales {text!r}: numbers separated by commas") from None
    if count and len(scales) not in (1, count):
        raise ValueError(f"LoRA scales: {len(scales)} scales for {count} LoRAs (give one, or one per LoRA)")
    return scales


def infer_argv(guard: PathGuard, model, prompt, negative_prompt="", loras=(), lora_scales="1", image=None,
               video=None, strength=0.8, frames=None, height=None, width=None, fps=None, steps=50, guidance=6.0,
               seed=0, scheduler="auto", cache="none", cache_threshold=None, attention="sdpa",
               compile=False) -> list[str]:
    """The infer.py arguments for the page's fields; typed paths (model, LoRAs) checked by `guard`."""
    if not str(prompt or "").strip():
        raise ValueError("--prompt: write a prompt")
    argv = ["--prompt", str(prompt), "--model", guard.model(model, "model"), "--scheduler", str(scheduler),
            "--steps", str(int(steps)), "--guidance", str(float(guidance)), "--seed", str(int(seed))]
    if negative_prompt:
        argv += ["--negative-prompt", str(negative_prompt)]
    loras = list(loras or [])
    for lora in loras:
        argv += ["--lora", str(guard.check(lora, "LoRA"))]
    if loras:
        for scale in parse_scales(lora_scales, len(loras)):
            argv += ["--lora-scale", str(scale)]
    if image:
        argv += ["--image", str(image)]
    if video:
        argv += ["--video", str(video), "--strength", str(float(strength))]
    for flag, value in (("--num-frames", frames), ("--height", height), ("--width", width), ("--fps", fps)):
        if value not in (None, ""):
            argv += [flag, str(int(value))]
    argv += ["--cache", str(cache or "none"), "--attention", str(attention or "sdpa")]
    if cache_threshold not in (None, ""):
        argv += ["--cache-threshold", str(float(cache_threshold))]
    if compile:
        argv.append("--compile")
    return argv


def parse(argv: list[str]):
    """infer.py's parser on `argv`; its complaint as a ValueError instead of an exit."""
    import contextlib
    import io

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return infer.parser().parse_args(argv)
    except SystemExit:
        raise ValueError(err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "bad arguments") \
            from None


def model_defaults(guard: PathGuard, model) -> dict:
    """The model's own clip {frames, height, width, fps} from its configs alone (no weights)."""
    source = model_sources.resolve(guard.model(model, "model"))
    clip = resolve_clip(source.transformer_config, source.vae_config,
                        folder=source.folder if source.kind == "diffusers" else None)
    return {"frames": clip.frames, "height": clip.height, "width": clip.width, "fps": clip.fps}


class Generator:
    """Generates as infer.py does, keeping the last pipeline loaded; one generation at a time."""

    def __init__(self, outputs, guard: PathGuard):
        self.outputs, self.guard = Path(outputs), guard
        self._lock = threading.Lock()
        self._key, self._pipe = None, None

    def generate(self, **fields) -> tuple[Path, dict]:
        """One video for the page's fields: (the mp4 under outputs/ui_generate/, its settings)."""
        a = parse(infer_argv(self.guard, **fields))
        prepared = infer.prepare(a)  # every rule, before any weights load
        key = (prepared.source.spec, tuple(a.lora or ()), tuple(a.lora_scale or ()), a.scheduler, a.dtype,
               str(prepared.device), a.offload, a.quantize, a.vae_tiling)
        with self._lock:
            start = time.perf_counter()
            if key != self._key:
                self._pipe, self._key = None, None
                self._pipe, self._key = infer.load(a, prepared), key
            else:  # the same weights: only the speed settings are installed anew
                speed.apply(self._pipe, speed.from_args(a), a.steps)
            video = infer.sample(a, prepared, self._pipe)[0]
            report = speed.report_of(self._pipe).as_dict()
            folder = self.outputs / GENERATED
            path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{len(list(folder.glob('*.mp4'))):04d}.mp4"
            write_mp4(video, path, fps=prepared.clip.fps)
            took = time.perf_counter() - start
        clip = prepared.clip
        settings = {"prompt": a.prompt, "negative_prompt": a.negative_prompt or "", "model": prepared.source.spec,
                    "loras": ", ".join(a.lora or []), "lora_scales": ", ".join(str(s) for s in a.lora_scale or []),
                    "frames": clip.frames, "height": clip.height, "width": clip.width, "fps": clip.fps,
                    "steps": a.steps, "guidance": a.guidance, "seed": a.seed, "scheduler": self._pipe.cogpipe_scheduler,
                    "image": a.image or "", "video": a.video or "", "strength": a.strength if a.video else "",
                    "cache": a.cache, "cache_threshold": report["threshold"], "attention": a.attention,
                    "compile": a.compile, "blocks_skipped": f"{report['block_evaluations_skipped']}/"
                                                            f"{report['block_evaluations']}",
                    "steps_skipped": report["steps_skipped"], "speed": report,
                    "speed_line": speed.report_of(self._pipe).line(),
                    "seconds": round(took, 1), "file": str(path)}
        return path, settings
