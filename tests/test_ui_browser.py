"""The page in a real browser (headless Chromium from the system's packages, driven by Playwright): generate a video
with models/tiny-world and see it play, start a 20-step tiny run from the Train tab and see it finish, read its loss
plot in the Runs tab, stop a running run and see its checkpoint. One server (`cogpipe ui`, as a user starts it) and
one browser serve every test; the finished run is shared. COGPIPE_UI_SCREENSHOTS=1 also writes docs/ui_*.png."""

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import REPO, SPECS, free_port, make_clips

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
STOP_STEPS = 100_000  # a run that cannot finish before the page, under load, has shown it running and stopped it
SERVER_LOG = [None]  # where the page's server writes (the `server` fixture's)
TICK_S = 2.5  # longer than the page's refresh period (2 s)
FAST = ("data.root={outputs}/clips data.cache_dir={outputs}/.cache train.batch_size=1 lora.rank=4 lora.alpha=4 "
        "train.checkpoint_every=0 validation.steps=2 report_to=none train.warmup_steps=0")


def _need(ok: bool, what: str) -> None:
    if not ok:  # CI installs both (.ci/run): missing there is a failure, not a skip
        (pytest.fail if os.environ.get("CI") else pytest.skip)(what)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _need(CHROMIUM is not None, "no chromium (apt-get install chromium)")
    _need(importlib.util.find_spec("gradio") is not None, "no gradio (pip install -e '.[ui]')")
    outputs = tmp_path_factory.mktemp("ui") / "outputs"
    make_clips(outputs / "clips", SPECS)  # 4 clips (data/tiny has 12): less to encode; inside the page's folders
    port = free_port()
    # every Runs-tab tick takes TICK_S (a loaded machine): a tick is in flight whenever the user chooses a run
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "GRADIO_ANALYTICS_ENABLED": "False", "COGPIPE_FAILPOINT": f"ui-runs-tick=SLEEP{TICK_S}"}
    server_log = SERVER_LOG[0] = outputs.parent / "server.log"  # a file, not a pipe: a pipe nobody reads would
    with open(server_log, "wb") as log:  # stop the server once it had written 64 KiB
        proc = subprocess.Popen([sys.executable, "-m", "cogpipe.cli", "ui", "--outputs", str(outputs), "--port",
                                 str(port)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    import urllib.request

    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"cogpipe ui did not start: {server_log.read_text()[-3000:]}")
            time.sleep(0.5)
    yield url, outputs
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    _need(importlib.util.find_spec("playwright") is not None, "no playwright (pip install -e '.[ui,test]')")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])  # the system's browser
        yield b
        b.close()


@pytest.fixture
def page(server, browser):
    url, _ = server
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    pg.set_default_timeout(60_000)
    pg.goto(url, wait_until="domcontentloaded")
    pg.wait_for_selector("#gen-button")
    yield pg
    pg.close()


def _shot(pg, name):
    if os.environ.get("COGPIPE_UI_SCREENSHOTS"):
        pg.screenshot(path=str(REPO / "docs" / f"ui_{name}.png"), full_page=True)


def _text(pg, selector, pattern, timeout_s, log: Path | None = None):
    """Wait until the element's text matches `pattern`; returns the text."""
    from playwright.sync_api import TimeoutError as PageTimeout

    try:
        pg.wait_for_function("([s, p]) => { const e = document.querySelector(s); return e && new RegExp(p).test("
                             "e.innerText) }", arg=[selector, pattern], timeout=timeout_s * 1000)
    except PageTimeout:
        shown = pg.inner_text(selector) if pg.query_selector(selector) else "(no such element)"
        _timed_out(f"{selector} did not match {pattern!r} in {timeout_s} s; it shows {shown!r}", log)
    return pg.inner_text(selector)


def _timed_out(what: str, log: Path | None):
    """Fail with what the page showed, the end of a job's log (a training job's trainers first write there where
    each thread of theirs is: SIGUSR1) and the machine's busiest processes."""
    if log is not None and log.name == "ui_train.log":
        _stacks_to_log(log.parent)
    tail = log.read_text()[-4000:] if log is not None and log.is_file() else "(no log)"
    busy = subprocess.run(["ps", "-eo", "pid,ppid,pcpu,etimes,args", "--sort=-pcpu"], capture_output=True,
                          text=True).stdout.splitlines()[:15]
    server = SERVER_LOG[0].read_text(errors="replace")[-3000:] if SERVER_LOG[0] else ""
    pytest.fail(f"{what}\n--- {log}:\n{tail}\n--- the page's server:\n{server}\n--- busiest processes:\n"
                + "\n".join(b[:200] for b in busy))


def _stacks_to_log(run_dir: Path) -> None:
    from cogpipe.ui.launcher import signal_workers

    try:
        pid = json.loads((run_dir / "ui_job.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return
    if pid and signal_workers(pid, signal.SIGUSR1, or_itself=False):  # accelerate's launcher has no handler
        time.sleep(3)  # the stacks written


def _end_job(run_dir: Path) -> None:
    """Kill what a page job of `run_dir` left running (its own session: the launcher and the trainers), so that a
    failed test does not hold the page's one-job queue for the tests after it."""
    try:
        job = json.loads((run_dir / "ui_job.json").read_text())
    except (OSError, ValueError):
        return
    if job.get("pid") and job.get("returncode") is None:
        try:
            os.killpg(job["pid"], signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _start(pg, name, overrides):
    pg.get_by_role("tab", name="Train").click()
    pg.locator("#train-name").get_by_role("textbox").fill(name)
    pg.locator("#train-overrides").get_by_role("textbox").fill(overrides)
    pg.click("#train-start")
    return _text(pg, "#train-message", name, 30)


def _open_run(pg, name):
    pg.get_by_role("tab", name="Runs").click()
    pg.locator("#runs-choice").get_by_role("combobox").click()
    pg.get_by_role("option", name=re.compile(f"^{name}:")).click()


def test_generate_plays(page, server):
    page.locator("#gen-prompt").get_by_role("textbox").fill("a blue circle moving up")
    page.fill("#gen-steps input", "2")
    page.click("#gen-button")
    status = _text(page, "#gen-status", "wrote|error", 300)
    assert "17 frames at 64x64" in status, status  # the model's own clip, filled in from its configs
    duration = page.wait_for_function("() => { const v = document.querySelector('#gen-video video'); "
                                      "return v && v.duration > 0 ? v.duration : null }").json_value()
    assert duration == pytest.approx(17 / 8, abs=0.2)  # 17 frames at the model's 8 fps, as the browser decodes it
    assert len(list((server[1] / "ui_generate").glob("*.mp4"))) == 1
    assert page.locator("#gen-history-table").inner_text().count("a blue circle moving up") == 1
    _shot(page, "generate")


@pytest.fixture(scope="module")
def finished_run(server, browser):
    """A 20-step tiny run started from the Train tab, seen to finish there."""
    url, outputs = server
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    pg.goto(url, wait_until="domcontentloaded")
    message = _start(pg, "page_run", "train.max_steps=20 train.log_every=5 " + FAST.format(outputs=outputs))
    assert "started" in message, message
    jobs = _text(pg, "#train-jobs", r"page_run\s+(finished|failed)", 600, log=outputs / "page_run" / "ui_train.log")
    assert re.search(r"page_run\s+finished", jobs), (outputs / "page_run" / "ui_train.log").read_text()[-3000:]
    _shot(pg, "train")
    pg.close()
    return outputs / "page_run"


def test_train_from_page_finishes(finished_run):
    from cogpipe.ui import runs

    run = runs.load_run(finished_run)
    assert (run.state, run.step, run.max_steps) == ("finished", 20, 20)
    assert (finished_run / "checkpoints" / "checkpoint-000020" / "trainer_state.json").is_file()
    assert (finished_run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert "accelerate.commands.launch" in json.loads((finished_run / runs.JOB).read_text())["command"]


def test_runs_tab_shows_the_loss_plot(page, finished_run):
    from cogpipe.ui import runs

    _open_run(page, "page_run")
    summary = _text(page, "#runs-summary", "last loss", 60)
    assert "finished, step 20 of 20" in summary
    loss = runs.curves(finished_run)["loss"]
    assert [s for s, _ in loss] == [5, 10, 15, 20]
    assert f"last loss: {loss[-1][1]:.6g} at step 20 (4 points)" in summary
    # the plot itself: Vega's SVG line through one vertex per logged step, its axis titled "loss"
    page.wait_for_selector("#runs-loss svg path[aria-roledescription='line mark']")
    d = page.get_attribute("#runs-loss svg path[aria-roledescription='line mark']", "d")
    assert len(re.findall(r"[ML]", d)) == len(loss)
    assert "loss" in page.inner_text("#runs-loss")
    assert "checkpoint-000020" in page.inner_text("#runs-checkpoints")
    page.wait_for_function("() => { const v = document.querySelector('#runs-video video'); "
                           "return v && v.duration > 0 }")  # the validation video of step 20 plays
    _shot(page, "runs")


def test_a_run_chosen_while_the_list_changes_stays_chosen(page, server, finished_run):
    """The Runs tab's tick re-sends the run list when a run comes or changes state. A tick that read the chosen run
    before the user chose (here every tick is slow, and the list changes on each) must not put the old choice back,
    nor leave the old run's panels under the new choice."""
    outputs = server[1]
    stop = threading.Event()

    def new_runs():  # a run folder appears every 0.5 s: the list the tick sends differs each time
        k = 0
        while not stop.wait(0.5):
            (outputs / f"listed_{k}").mkdir()
            (outputs / f"listed_{k}" / "config.yaml").write_text("{}\n")
            k += 1

    page.get_by_role("tab", name="Runs").click()
    time.sleep(TICK_S)  # the page's first ticks have drawn the list
    thread = threading.Thread(target=new_runs, daemon=True)
    thread.start()
    box = page.locator("#runs-choice").get_by_role("combobox")
    try:
        for name, first in [("page_run", "page_run: finished, step 20 of 20"),
                            ("listed_0", "listed_0: failed, step 0 of ?")]:
            box.click()
            box.fill(f"{name}:")  # the list filtered to the one run (its options move as runs come)
            page.get_by_role("option", name=re.compile(f"^{name}:")).click()
            # a tick in flight at the choice may draw what it read before it; the next one draws the choice again
            for _ in range(2):  # and so on, tick after tick, while the list changes; the choice itself never moves
                _text(page, "#runs-summary", re.escape(first), 3 * TICK_S + 5)
                assert box.input_value().startswith(f"{name}:"), box.input_value()
                time.sleep(TICK_S)
    finally:
        stop.set()
        thread.join()
        for folder in outputs.glob("listed_*"):
            shutil.rmtree(folder)


def test_stop_a_running_run(page, server, finished_run, request):
    outputs = server[1]
    overrides = f"train.max_steps={STOP_STEPS} train.log_every=1 " + FAST.format(outputs=outputs)
    request.addfinalizer(lambda: _end_job(outputs / "stop_run"))
    message = _start(page, "stop_run", overrides)
    assert "stop_run" in message
    _open_run(page, "stop_run")
    _text(page, "#runs-summary", r"running, step [1-9]", 300, log=outputs / "stop_run" / "ui_train.log")
    page.click("#runs-stop")
    assert "SIGTERM sent" in _text(page, "#runs-action", "SIGTERM|not", 30)
    summary = _text(page, "#runs-summary", "interrupted|failed", 120)
    assert "interrupted" in summary, (outputs / "stop_run" / "ui_train.log").read_text()[-3000:]
    shown = _text(page, "#runs-checkpoints", "checkpoint-", 30)
    saved = sorted((outputs / "stop_run" / "checkpoints").glob("checkpoint-*"))
    assert len(saved) == 1 and saved[0].name in shown
    step = json.loads((saved[0] / "trainer_state.json").read_text())["step"]
    assert 1 <= step < STOP_STEPS and f"{saved[0].name}\n{step}" in shown.replace("\t", "\n")


def test_data_tab_prepares_a_folder_and_edits_a_caption(page, server):
    """Prepare the page's clips folder (its own captions: --caption-model source), edit a clip's caption, see it in
    the written files."""
    from cogpipe.data.index import read_manifest

    outputs = server[1]
    page.get_by_role("tab", name="Data").click()
    page.locator("#data-source").get_by_role("textbox").fill(str(outputs / "clips"))
    page.locator("#data-name").get_by_role("textbox").fill("page_set")
    page.click("#data-start")
    assert "page_set" in _text(page, "#data-message", "prepare page_set|not started", 30)
    folder = outputs / "data" / "page_set"
    from playwright.sync_api import TimeoutError as PageTimeout

    try:
        log = page.wait_for_function(
            "() => { const t = document.querySelector('#data-log textarea'); "
            "return t && /\\[(finished|failed|interrupted)\\]/.test(t.value) ? t.value : null }",
            timeout=240_000).json_value()
    except PageTimeout:
        _timed_out(f"prepare did not end in 240 s; the Train tab's jobs: {page.inner_text('#train-jobs')!r}",
                   folder / "ui_prepare.log")
    assert "[finished]" in log, (folder / "ui_prepare.log").read_text()[-3000:]
    page.click("#data-refresh")
    page.locator("#data-chosen").get_by_role("combobox").click()
    page.get_by_role("option", name="page_set").click()
    _text(page, "#data-table", r"\.mp4", 30)
    clip = page.locator("#data-clip").get_by_role("combobox").input_value()
    box = page.locator("#data-caption").get_by_role("textbox")
    page.wait_for_function("() => document.querySelector('#data-caption textarea').value.length > 0")
    assert box.input_value() == json.loads((folder / "work" / "captions" / f"{clip}.json").read_text())["caption"]
    edited = "a caption edited on the page"
    box.fill(edited)
    page.click("#data-save")
    assert "saved" in _text(page, "#data-saved", "saved|not saved", 60)
    assert edited in page.inner_text("#data-table")
    videos = (folder / "videos.txt").read_text().splitlines()
    assert (folder / "prompts.txt").read_text().splitlines()[videos.index(f"clips/{clip}")] == edited
    assert {r["uri"].split("/")[-1]: r["caption"] for r in read_manifest(folder)}[clip] == edited
    assert json.loads([m for m in (folder / "metadata.jsonl").read_text().splitlines() if clip in m][0])[
        "caption"] == edited
    _shot(page, "data")
