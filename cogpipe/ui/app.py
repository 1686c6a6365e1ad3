"""The page: Generate, Runs, Train and Data tabs over cogpipe.ui's plain modules (the only module importing gradio)."""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr
import pandas as pd

from cogpipe.atomic import failpoint
from cogpipe.attention import KERNELS
from cogpipe.config import ConfigError
from cogpipe.inference.pipeline import SCHEDULERS
from cogpipe.inference.speed import CACHES
from cogpipe.paths import repo_path
from cogpipe.ui import dataset, recipes, runs
from cogpipe.ui import generate as gen
from cogpipe.ui.launcher import LAUNCHERS, JobQueue
from cogpipe.ui.safety import PathGuard

REFRESH_S = 2.0  # how often the Runs and Train tabs re-read the files of runs that go on
HISTORY_COLUMNS = ["prompt", "model", "loras", "frames", "height", "width", "fps", "steps", "guidance", "seed",
                   "scheduler", "cache", "cache_threshold", "blocks_skipped", "seconds", "file"]


class Context:
    """The folders the page works in and the objects it shares between requests."""

    def __init__(self, outputs):
        self.outputs = Path(outputs).resolve()
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.configs = repo_path("configs", "a checkout of cogpipe (the page lists its recipes)")
        self.train_py = repo_path("train.py", "a checkout of cogpipe (the page launches its train.py)")
        self.root = self.train_py.parent
        readable = [self.outputs] + [self.root / d for d in ("configs", "models", "data")]
        self.guard = PathGuard(readable)
        self.queue = JobQueue(cwd=self.root)
        self.generator = gen.Generator(self.outputs, self.guard)


def _plot(points, name: str) -> pd.DataFrame:
    return pd.DataFrame(points or [], columns=["step", name])


def _run_choices(ctx: Context) -> list[tuple[str, str]]:
    return [(r.label, r.name) for r in runs.discover(ctx.outputs)]


def _runs_table(ctx: Context) -> pd.DataFrame:
    rows = [(r.name, r.state, r.step, r.max_steps) for r in runs.discover(ctx.outputs)]
    return pd.DataFrame(rows, columns=["run", "state", "step", "max_steps"])


def _summary(run: runs.Run, curves: dict) -> str:
    lines = [f"**{run.name}**: {run.state}, step {run.step if run.step is not None else 0} of "
             f"{run.max_steps if run.max_steps is not None else '?'}"]
    for key in ("loss", "lr", "grad_norm"):
        if curves[key]:
            step, value = curves[key][-1]
            lines.append(f"last {key}: {value:.6g} at step {step} ({len(curves[key])} points)")
    return "  \n".join(lines)


def build(ctx: Context) -> gr.Blocks:
    with gr.Blocks(title="cogpipe") as page:
        gr.Markdown("# cogpipe")
        timer = gr.Timer(REFRESH_S)
        with gr.Tabs():
            _generate_tab(ctx)
            _runs_tab(ctx, timer)
            _train_tab(ctx, timer)
            _data_tab(ctx, timer)
    return page


def _generate_tab(ctx: Context) -> None:
    models = gen.shipped_models() + gen.exported_models(ctx.outputs)
    try:
        own = gen.model_defaults(ctx.guard, models[0]) if models else {}
    except (ValueError, FileNotFoundError, OSError):
        own = {}
    with gr.Tab("Generate", id="generate"):
        with gr.Row():
            with gr.Column():
                model = gr.Dropdown(models, value=models[0] if models else None, allow_custom_value=True,
                                    label="Model: the shipped one, an export under outputs/, a path or a hub id",
                                    elem_id="gen-model")
                loras = gr.Dropdown(gen.found_loras(ctx.outputs), multiselect=True, allow_custom_value=True,
                                    label="LoRAs (outputs/*/lora, any format)", elem_id="gen-loras")
                scales = gr.Textbox("1.0", label="LoRA scales (one, or one per LoRA)", elem_id="gen-scales")
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="gen-prompt")
                negative = gr.Textbox(label="Negative prompt", elem_id="gen-negative")
                with gr.Accordion("Image-to-video, video-to-video", open=False):
                    image = gr.Image(type="filepath", label="First frame (image-to-video models)")
                    video_in = gr.Video(label="Clip to transform (video-to-video)", sources=["upload"])
                    strength = gr.Slider(0.0, 1.0, 0.8, step=0.05, label="Strength (video-to-video)")
                with gr.Row():
                    frames = gr.Number(own.get("frames"), precision=0, label="Frames", elem_id="gen-frames")
                    height = gr.Number(own.get("height"), precision=0, label="Height", elem_id="gen-height")
                    width = gr.Number(own.get("width"), precision=0, label="Width", elem_id="gen-width")
                    fps = gr.Number(own.get("fps"), precision=0, label="FPS", elem_id="gen-fps")
                with gr.Row():
                    steps = gr.Number(50, precision=0, label="Steps", elem_id="gen-steps")
                    guidance = gr.Number(6.0, label="Guidance", elem_id="gen-guidance")
                    seed = gr.Number(0, precision=0, label="Seed", elem_id="gen-seed")
                    scheduler = gr.Dropdown(list(SCHEDULERS), value="auto", label="Scheduler")
                with gr.Accordion("Speed: step cache, compilation, attention kernel (docs/inference.md)", open=False):
                    with gr.Row():
                        cache = gr.Dropdown(list(CACHES), value="none", label="Step cache", elem_id="gen-cache")
                        threshold = gr.Number(None, label="Cache threshold (empty: the method's recommended)",
                                              elem_id="gen-cache-threshold")
                        attention = gr.Dropdown(list(KERNELS), value="sdpa", label="Attention kernel",
                                                elem_id="gen-attention")
                        compiled = gr.Checkbox(False, label="Compile the blocks", elem_id="gen-compile")
                button = gr.Button("Generate", variant="primary", elem_id="gen-button")
            with gr.Column():
                result = gr.Video(label="Video", autoplay=True, loop=True, interactive=False, height=320,
                                  elem_id="gen-video")
                status = gr.Markdown(elem_id="gen-status")
                gallery = gr.Gallery(label="History", columns=4, height=220, elem_id="gen-history")
                table = gr.Dataframe(pd.DataFrame(columns=HISTORY_COLUMNS), label="History settings",
                                     interactive=False, elem_id="gen-history-table")
                refresh = gr.Button("Refresh models and LoRAs", size="sm")
        history = gr.State([])

        def defaults(spec):
            try:
                d = gen.model_defaults(ctx.guard, spec)
            except (ValueError, FileNotFoundError, OSError) as e:
                return gr.update(), gr.update(), gr.update(), gr.update(), f"model: {e}"
            return d["frames"], d["height"], d["width"], d["fps"], \
                f"{spec}: {d['frames']} frames at {d['height']}x{d['width']}, {d['fps']} fps (the model's own)"

        def run(spec, lora_list, lora_scales, text, neg, img, vid, strn, n_frames, h, w, rate, n_steps, cfg, sd,
                sched, method, thresh, kernel, comp, past, progress=gr.Progress(track_tqdm=True)):
            progress(0, desc="checking")
            try:
                path, settings = ctx.generator.generate(
                    model=spec, prompt=text, negative_prompt=neg, loras=lora_list, lora_scales=lora_scales,
                    image=img, video=vid, strength=strn, frames=n_frames, height=h, width=w, fps=rate,
                    steps=n_steps, guidance=cfg, seed=sd, scheduler=sched, cache=method, cache_threshold=thresh,
                    attention=kernel, compile=comp)
            except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
                gr.Warning(str(e))
                return gr.update(), f"**error**: {e}", gr.update(), gr.update(), past
            past = [settings] + list(past)
            caption = f"{settings['prompt']} (seed {settings['seed']}, {settings['steps']} steps)"
            shown = [(p["file"], f"{p['prompt']} (seed {p['seed']}, {p['steps']} steps)") for p in past]
            message = f"wrote {path.name}: {caption}, {settings['frames']} frames at {settings['height']}x" \
                      f"{settings['width']}, {settings['scheduler']} scheduler, {settings['seconds']} s; " \
                      f"{settings['speed_line']}"
            return str(path), message, shown, pd.DataFrame(past, columns=HISTORY_COLUMNS), past

        model.change(defaults, model, [frames, height, width, fps, status])
        refresh.click(lambda: (gr.update(choices=gen.shipped_models() + gen.exported_models(ctx.outputs)),
                               gr.update(choices=gen.found_loras(ctx.outputs))), None, [model, loras])
        button.click(run, [model, loras, scales, prompt, negative, image, video_in, strength, frames, height, width,
                           fps, steps, guidance, seed, scheduler, cache, threshold, attention, compiled, history],
                     [result, status, gallery, table, history])


def _runs_tab(ctx: Context, timer: gr.Timer) -> None:
    with gr.Tab("Runs", id="runs") as tab:
        with gr.Row():
            choice = gr.Dropdown(_run_choices(ctx), label="Run", elem_id="runs-choice", scale=4)
            refresh = gr.Button("Refresh", size="sm", scale=1)
        table = gr.Dataframe(_runs_table(ctx), label="Runs under outputs/", interactive=False, elem_id="runs-table")
        summary = gr.Markdown(elem_id="runs-summary")
        with gr.Row():
            stop = gr.Button("Stop (checkpoint, then exit)", variant="stop", elem_id="runs-stop")
            resume = gr.Button("Resume from the latest checkpoint", elem_id="runs-resume")
            export = gr.Button("Export", elem_id="runs-export")
        action = gr.Markdown(elem_id="runs-action")
        with gr.Row():
            loss = gr.LinePlot(_plot([], "loss"), x="step", y="loss", title="loss", elem_id="runs-loss")
            lr = gr.LinePlot(_plot([], "lr"), x="step", y="lr", title="learning rate", elem_id="runs-lr")
            grad = gr.LinePlot(_plot([], "grad_norm"), x="step", y="grad_norm", title="grad norm",
                               elem_id="runs-grad")
        with gr.Row():
            with gr.Column():
                videos = gr.Dropdown([], label="Validation video (by step)", elem_id="runs-videos")
                video = gr.Video(label="Validation", interactive=False, height=320, elem_id="runs-video")
            with gr.Column():
                checkpoints = gr.Dataframe(pd.DataFrame(columns=["checkpoint", "step", "latest"]),
                                           label="Checkpoints", interactive=False, elem_id="runs-checkpoints")
        with gr.Accordion("Resolved config", open=False):
            config = gr.Code(language="yaml", label="config.yaml", elem_id="runs-config")
        with gr.Accordion("Log", open=False):
            log = gr.Textbox(lines=12, max_lines=12, label="log", autoscroll=True, elem_id="runs-log")

        def run_dir(name):
            if not name:
                return None
            return PathGuard([ctx.outputs]).check(ctx.outputs / name, "run")

        def view(name):
            """Everything shown about one run."""
            if not name or not (folder := run_dir(name)).is_dir():
                empty = _plot([], "loss")
                return ("", empty, _plot([], "lr"), _plot([], "grad_norm"), gr.update(choices=[], value=None),
                        pd.DataFrame(columns=["checkpoint", "step", "latest"]), "", "")
            run = runs.load_run(folder)
            curves = runs.curves(folder)
            vids = [(f"step {v['step']}: {v['prompt'] or v['index']}", v["path"])
                    for v in runs.validation_videos(folder)]
            ckpts = pd.DataFrame([(c["name"], c["step"], "latest" if c["latest"] else "")
                                  for c in runs.checkpoints(folder)], columns=["checkpoint", "step", "latest"])
            log_text = runs.readable(runs.log_tail(folder) or runs.log_tail(folder, name="ui_export.log"))
            return (_summary(run, curves), _plot(curves["loss"], "loss"), _plot(curves["lr"], "lr"),
                    _plot(curves["grad_norm"], "grad_norm"),
                    gr.update(choices=vids, value=vids[-1][1] if vids else None), ckpts,
                    runs.resolved_config(folder), log_text)

        def live(name, shown, drawn):
            """What changes while a run goes: the list, the state, the curves, the checkpoints, the log. The list
            is sent only when a run came or changed state (an open list is left alone otherwise), and only its
            choices: a tick that read the chosen run before the user chose another must not choose the old one
            again. `drawn` is the run whose panels the page shows (the last writer's): a tick computed for the run
            chosen before, landing after the new choice's view, is redrawn by the next tick."""
            failpoint("ui-runs-tick")  # the page's test: a slow tick (a loaded machine), the user choosing meanwhile
            now = _run_choices(ctx)
            listed = gr.update(choices=now) if now != shown else gr.update()
            state = dict((n, label) for label, n in now).get(name)
            if name and (state is None  # not a run (the list's filter text being typed): its panels are left alone
                         or name == drawn and not state.endswith((": running", ": queued")) and now == shown):
                return (listed, now, _runs_table(ctx)) + (gr.update(),) * 6 + (drawn,)  # nothing of this run moves
            summary_, loss_, lr_, grad_, _, ckpts, _, log_ = view(name)
            return listed, now, _runs_table(ctx), summary_, loss_, lr_, grad_, ckpts, log_, name

        def stop_run(name):
            if not name:
                return "choose a run"
            job = ctx.queue.find(run_dir(name))
            if job is None or not job.active:
                return f"{name}: not started from this page, or not running"
            return ctx.queue.stop(job)

        def resume_run(name):
            if not name:
                return "choose a run"
            try:
                job = recipes.resume_job(run_dir(name), "", ctx.outputs, ctx.guard, ctx.train_py, ctx.configs,
                                         jobs=list(ctx.queue.jobs))
            except (ConfigError, ValueError, FileNotFoundError) as e:
                return f"resume: {e}"
            ctx.queue.submit(job)
            return f"{name}: resuming from its latest checkpoint (queued behind {len(ctx.queue.queued()) - 1})"

        def export_run(name):
            if not name:
                return "choose a run"
            ctx.queue.submit(recipes.export_job(run_dir(name), ctx.outputs))
            return f"{name}: export queued (log: ui_export.log in the run folder)"

        listed = gr.State([])  # the run list this page shows
        drawn = gr.State(None)  # the run its panels show
        outputs = [summary, loss, lr, grad, videos, checkpoints, config, log]
        choice.change(lambda name: (*view(name), name), choice, [*outputs, drawn])
        videos.change(lambda v: v, videos, video)
        refresh.click(lambda: (gr.update(choices=_run_choices(ctx)), _runs_table(ctx)), None, [choice, table])
        tab.select(lambda: (gr.update(choices=_run_choices(ctx)), _runs_table(ctx)), None, [choice, table])
        timer.tick(live, [choice, listed, drawn],
                   [choice, listed, table, summary, loss, lr, grad, checkpoints, log, drawn])
        stop.click(stop_run, choice, action)
        resume.click(resume_run, choice, action)
        export.click(export_run, choice, action)


def _train_tab(ctx: Context, timer: gr.Timer) -> None:
    names = recipes.list_recipes(ctx.configs)
    with gr.Tab("Train", id="train"):
        with gr.Row():
            with gr.Column():
                recipe = gr.Dropdown(names, value="tiny_lora.yaml" if "tiny_lora.yaml" in names else None,
                                     label="Recipe (configs/)", elem_id="train-recipe")
                name = gr.Textbox("tiny_lora", label="Run name (the folder under outputs/)", elem_id="train-name")
                overrides = gr.Textbox(label="Overrides: key=value, one a line or space-separated", lines=4,
                                       placeholder="train.max_steps=20\nlora.rank=8", elem_id="train-overrides")
                with gr.Row():
                    launcher = gr.Dropdown(list(LAUNCHERS), value="default",
                                           label="Launcher (configs/accelerate/)", elem_id="train-launcher")
                    processes = gr.Number(1, precision=0, minimum=1, label="Processes", elem_id="train-processes")
                start = gr.Button("Start", variant="primary", elem_id="train-start")
                message = gr.Markdown(elem_id="train-message")
            with gr.Column():
                jobs = gr.Dataframe(pd.DataFrame(columns=["job", "state", "started"]), label="Queue",
                                    interactive=False, elem_id="train-jobs")
                log = gr.Textbox(lines=18, max_lines=18, label="Log of the running (or last) job", autoscroll=True,
                                 elem_id="train-log")

        def recipe_name(chosen):
            import yaml

            try:
                out = yaml.safe_load((ctx.configs / chosen).read_text()).get("output_dir")
            except (OSError, AttributeError, yaml.YAMLError):
                out = None
            return Path(out).name if out else Path(chosen).stem

        def launch(chosen, run_name, text, which, count):
            if not chosen:
                return "choose a recipe"
            try:
                job = recipes.training_job(ctx.configs / chosen, text, run_name, ctx.outputs, ctx.guard,
                                           ctx.train_py, ctx.configs, which, int(count or 1), jobs=list(ctx.queue.jobs))
            except (ConfigError, ValueError, FileNotFoundError) as e:
                return f"**not started**: {e}"
            return ctx.queue.start(job)

        def live():
            rows = [(j.name, j.state, time.strftime("%H:%M:%S", time.localtime(j.started)) if j.started else "")
                    for j in ctx.queue.jobs]
            shown = ctx.queue.current() or (ctx.queue.jobs[-1] if ctx.queue.jobs else None)
            text = ""
            if shown is not None and shown.log.is_file():
                text = runs.readable(runs.log_tail(shown.log.parent, name=shown.log.name), lines=20)
            return pd.DataFrame(rows, columns=["job", "state", "started"]), text

        recipe.change(recipe_name, recipe, name)
        start.click(launch, [recipe, name, overrides, launcher, processes], message)
        timer.tick(live, None, [jobs, log])


def _data_tab(ctx: Context, timer: gr.Timer) -> None:
    names = recipes.list_recipes(ctx.configs)
    with gr.Tab("Data", id="data") as tab:
        with gr.Row():
            with gr.Column():
                source = gr.Textbox(str(ctx.root / "data" / "tiny"), label="Source folder (videos; under data/, "
                                    "models/, configs/ or outputs/)", elem_id="data-source")
                name = gr.Textbox("prepared", label="Dataset name (the folder under outputs/data/)",
                                  elem_id="data-name")
                recipe = gr.Dropdown(names, value="tiny_lora.yaml" if "tiny_lora.yaml" in names else None,
                                     label="Recipe the clips are for (configs/)", elem_id="data-recipe")
                model = gr.Textbox("source", label="Caption model: a Qwen2.5-VL id or folder, or `source` (the "
                                   "source folder's own captions)", elem_id="data-model")
                extra = gr.Textbox(label="Other flags of cogpipe prepare (e.g. --min-motion 0.2 --trigger zq)",
                                   elem_id="data-extra")
                start = gr.Button("Prepare", variant="primary", elem_id="data-start")
                message = gr.Markdown(elem_id="data-message")
                log = gr.Textbox(lines=8, max_lines=8, label="Log of the last prepare job", autoscroll=True,
                                 elem_id="data-log")
            with gr.Column():
                with gr.Row():
                    chosen = gr.Dropdown(dataset.list_prepared(ctx.outputs), label="Prepared dataset (outputs/data/)",
                                         elem_id="data-chosen", scale=4)
                    refresh = gr.Button("Refresh", size="sm", scale=1, elem_id="data-refresh")
                table = gr.Dataframe(pd.DataFrame(columns=dataset.COLUMNS), label="Clips (clips.jsonl)",
                                     interactive=False, wrap=True, elem_id="data-table")
                clip = gr.Dropdown([], label="Clip", elem_id="data-clip")
                video = gr.Video(label="Clip", interactive=False, height=200, elem_id="data-video")
                caption = gr.Textbox(lines=3, label="Caption", elem_id="data-caption")
                save = gr.Button("Save caption", elem_id="data-save")
                saved = gr.Markdown(elem_id="data-saved")

        def folder(which):
            return dataset.prepared_folder(ctx.outputs, which)

        def launch(src, ds_name, chosen_recipe, caption_model, flags):
            if not chosen_recipe:
                return "choose a recipe"
            try:
                job = dataset.prepare_job(src, ds_name, ctx.configs / chosen_recipe, ctx.outputs, ctx.guard,
                                          caption_model, flags, jobs=list(ctx.queue.jobs))
            except (ConfigError, ValueError, FileNotFoundError) as e:
                return f"**not started**: {e}"
            return ctx.queue.start(job)

        def show(which):
            if not which:
                return pd.DataFrame(columns=dataset.COLUMNS), gr.update(choices=[], value=None)
            try:
                rows = dataset.clip_rows(folder(which))
            except (ValueError, FileNotFoundError) as e:
                gr.Warning(str(e))
                return pd.DataFrame(columns=dataset.COLUMNS), gr.update(choices=[], value=None)
            clips = [r[0] for r in rows]
            return pd.DataFrame(rows, columns=dataset.COLUMNS), gr.update(choices=clips,
                                                                          value=clips[0] if clips else None)

        def pick(which, name_):
            if not which or not name_:
                return None, ""
            rows = {r[0]: r for r in dataset.clip_rows(folder(which))}
            path = folder(which) / "clips" / name_
            return (str(path) if path.is_file() else None), (rows.get(name_) or [None, ""])[1]

        def store(which, name_, text, chosen_recipe):
            if not which or not name_:
                return "choose a dataset and a clip", gr.update()
            if not chosen_recipe:
                return "choose the recipe the dataset was prepared for", gr.update()
            try:
                rec = dataset.edit_caption(folder(which), name_, text, ctx.configs / chosen_recipe,
                                           jobs=list(ctx.queue.jobs))
            except (ConfigError, ValueError, FileNotFoundError) as e:
                return f"**not saved**: {e}", gr.update()
            return (f"saved: {name_} ({rec['tokens']} T5 tokens) in manifest.parquet, prompts.txt, metadata.jsonl, "
                    f"clips.jsonl and work/captions/"), pd.DataFrame(dataset.clip_rows(folder(which)),
                                                                     columns=dataset.COLUMNS)

        def live():
            job = next((j for j in reversed(ctx.queue.jobs) if j.name.startswith("prepare ")), None)
            if job is None or not job.log.is_file():
                return gr.update()
            return f"[{job.state}] " + runs.readable(runs.log_tail(job.log.parent, name=job.log.name), lines=20)

        def choices():
            return gr.update(choices=dataset.list_prepared(ctx.outputs))

        start.click(launch, [source, name, recipe, model, extra], message)
        chosen.change(show, chosen, [table, clip])
        clip.change(pick, [chosen, clip], [video, caption])
        save.click(store, [chosen, clip, caption, recipe], [saved, table])
        refresh.click(choices, None, chosen).then(show, chosen, [table, clip])
        tab.select(choices, None, chosen)
        timer.tick(live, None, log)


def serve(outputs, host: str = "127.0.0.1", port: int = 7860, auth=None, block: bool = True):
    """Build and serve the page; files under the outputs folder may be served (the videos), nothing else of ours."""
    ctx = Context(outputs)
    page = build(ctx)
    page.queue(default_concurrency_limit=4)
    page.launch(server_name=host, server_port=port, auth=auth, allowed_paths=[str(ctx.outputs)],
                prevent_thread_lock=not block, show_error=True, quiet=False, footer_links=[], inbrowser=False)
    return page, ctx

