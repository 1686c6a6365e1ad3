"""cogpipe ui without a browser: the host/auth rule, the path guard, the run states read from a run's files, the
job queue (one at a time, stop = SIGTERM to the trainer processes), the Train tab's checks and the Generate tab's
arguments, which are infer.py's own."""

import json
import os
import sys
import time

import pytest

from cogpipe.config import ConfigError
from cogpipe.ui import generate as gen
from cogpipe.ui import recipes, runs
from cogpipe.ui.launcher import Job, JobQueue, train_command
from cogpipe.ui.safety import PathGuard, UnsafePath, host_problem, is_local, parse_auth

from helpers import REPO


def test_host_needs_auth_beyond_this_machine(capsys):
    assert is_local("127.0.0.1") and is_local("localhost") and is_local("::1") and is_local("127.0.0.5")
    assert not is_local("0.0.0.0") and not is_local("192.168.1.4") and not is_local("example.org")
    assert host_problem("127.0.0.1", None) is None and host_problem("0.0.0.0", "u:p") is None
    assert "--auth" in host_problem("0.0.0.0", None)
    assert parse_auth("me:secret") == ("me", "secret")
    with pytest.raises(ValueError, match="--auth"):
        parse_auth("me")
    from cogpipe.cli import main

    assert main(["ui", "--host", "0.0.0.0"]) == 2  # refused before anything is served
    assert "needs a login: set COGPIPE_UI_AUTH=USER:PASSWORD or give --auth-file" in capsys.readouterr().err


def test_the_login_comes_from_the_environment_or_a_file(tmp_path, capsys):
    from cogpipe.ui.safety import login

    warned = []
    assert login(environ={"COGPIPE_UI_AUTH": "me:secret"}, warn=warned.append) == ("me", "secret")
    (tmp_path / "auth").write_text("you:pass word\n")
    assert login(auth_file=tmp_path / "auth", environ={}, warn=warned.append) == ("you", "pass word")
    assert login(environ={}, warn=warned.append) is None and not warned
    assert login("me:cli", environ={}, warn=warned.append) == ("me", "cli")  # works, with a warning
    assert len(warned) == 1 and "every user of this machine" in warned[0] and "COGPIPE_UI_AUTH" in warned[0]
    with pytest.raises(ValueError, match="COGPIPE_UI_AUTH must be USER:PASSWORD"):
        login(environ={"COGPIPE_UI_AUTH": "nopassword"})
    from cogpipe.cli import main

    assert main(["ui", "--host", "0.0.0.0", "--auth-file", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert f"--auth-file {tmp_path / 'missing'}: cannot read it" in err


def test_path_guard(tmp_path):
    allowed, other = tmp_path / "outputs", tmp_path / "private"
    (allowed / "run").mkdir(parents=True)
    other.mkdir()
    (other / "secret.txt").write_text("x")
    (allowed / "link").symlink_to(other)
    guard = PathGuard([allowed])
    assert guard.check(allowed / "run", "run") == (allowed / "run").resolve()
    for bad in (other / "secret.txt", allowed / ".." / "private" / "secret.txt", allowed / "link" / "secret.txt",
                "/etc/passwd"):
        with pytest.raises(UnsafePath, match="outside the folders"):
            guard.check(bad, "model")
    assert guard.model("THUDM/CogVideoX-5b") == "THUDM/CogVideoX-5b"  # a hub id, no local path
    with pytest.raises(UnsafePath):
        guard.model(str(other))


def _job_file(run_dir, **record):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / runs.JOB).write_text(json.dumps(record))


def test_run_states_from_files(tmp_path):
    out = tmp_path / "outputs"
    _job_file(out / "ok", returncode=0, pid=None, state="finished")
    _job_file(out / "stopped", returncode=1, pid=None, stop_requested=True)
    _job_file(out / "broken", returncode=2, pid=None)
    _job_file(out / "live", returncode=None, pid=os.getpid())
    _job_file(out / "signalled", returncode=1, pid=None)
    (out / "signalled" / runs.LOG).write_text("...\ninterrupted: stopped by signal 15 after saving x\n")
    states = {r.name: r.state for r in runs.discover(out)}
    assert states == {"ok": "finished", "stopped": "interrupted", "broken": "failed", "live": "running",
                      "signalled": "interrupted"}

    # a run started elsewhere: read from its metrics, checkpoints and exports
    ext = out / "external"
    (ext / "checkpoints" / "checkpoint-000020").mkdir(parents=True)
    (ext / "checkpoints" / "checkpoint-000020" / "trainer_state.json").write_text('{"step": 20}')
    (ext / "checkpoints" / "checkpoint-000010").mkdir()  # no trainer_state.json: incomplete, not listed
    (ext / "checkpoints" / "latest").write_text("checkpoint-000020")
    (ext / "config.yaml").write_text("train:\n  max_steps: 20\n")
    (ext / "metrics.jsonl").write_text('{"step": 10, "loss": 0.5, "lr": 0.1, "grad_norm": NaN}\n'
                                       '{"step": 20, "loss": 0.25, "lr": 0.05, "grad_norm": 1.5}\n{"step": 3')
    run = runs.load_run(ext)
    assert (run.state, run.step, run.max_steps) == ("running", 20, 20)  # metrics written just now
    assert runs.state_of(ext, {}, 20, 20, now=time.time() + 3600) == "interrupted"  # went quiet, not exported
    (ext / "lora").mkdir()
    (ext / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert runs.load_run(ext).state == "finished"
    assert runs.curves(ext) == {"loss": [(10, 0.5), (20, 0.25)], "lr": [(10, 0.1), (20, 0.05)],
                                "grad_norm": [(20, 1.5)]}  # the NaN (a skipped step) and the torn line left out
    assert [(c["name"], c["step"], c["latest"]) for c in runs.checkpoints(ext)] == [("checkpoint-000020", 20, True)]
    (ext / "validation").mkdir()
    for step in (20, 5):
        (ext / "validation" / f"step-{step:06d}-0.mp4").write_bytes(b"")
        (ext / "validation" / f"step-{step:06d}-0.txt").write_text(f"prompt {step}\n")
    assert [(v["step"], v["prompt"]) for v in runs.validation_videos(ext)] == [(5, "prompt 5"), (20, "prompt 20")]
    assert runs.readable("start\ntrain: 1/3\rtrain: 2/3\rtrain: 3/3\ndone\n", lines=3) == "train: 3/3\ndone\n"


CHILD = """
import signal, sys, time
from pathlib import Path
def stop(signum, frame):
    Path(sys.argv[1]).write_text("checkpoint")
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
Path(sys.argv[2]).write_text("ready")
time.sleep(60)
"""


def test_queue_runs_one_at_a_time_and_stop_reaches_the_trainer(tmp_path):
    """A launcher process with a trainer child (as `accelerate launch` has): stop signals the child, which saves
    and exits; the job that waited in the queue runs after it."""
    launcher = ("import subprocess, sys; sys.exit(subprocess.call([sys.executable, '-c', sys.argv[1], sys.argv[2], "
                "sys.argv[3]]))")
    saved, ready = tmp_path / "saved", tmp_path / "ready"
    queue = JobQueue(cwd=tmp_path)
    first = queue.submit(Job("first", [sys.executable, "-c", launcher, CHILD, str(saved), str(ready)],
                             tmp_path / "a" / runs.LOG, run_dir=tmp_path / "a"))
    second = queue.submit(Job("second", [sys.executable, "-c", "print('second ran')"], tmp_path / "b" / runs.LOG,
                              run_dir=tmp_path / "b"))
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.state == "running" and second.state == "queued"
    assert runs.load_run(tmp_path / "b").state == "queued" and runs.load_run(tmp_path / "a").state == "running"
    assert "SIGTERM sent to 1 process" in queue.stop(first)
    assert queue.wait(second, timeout=30) == "finished"
    assert first.state == "interrupted" and saved.read_text() == "checkpoint"
    assert runs.load_run(tmp_path / "a").state == "interrupted"
    assert (tmp_path / "b" / runs.LOG).read_text().strip() == "second ran"
    third = queue.submit(Job("third", [sys.executable, "-c", "import sys; sys.exit(3)"], tmp_path / "c" / runs.LOG,
                             run_dir=tmp_path / "c"))
    assert queue.wait(third, timeout=30) == "failed" and runs.load_run(tmp_path / "c").state == "failed"


def test_train_tab_checks_before_launch(tmp_path):
    out = tmp_path / "outputs"
    guard = PathGuard([out, REPO / "configs", REPO / "models", REPO / "data"])
    recipe = REPO / "configs" / "tiny_lora.yaml"

    def job(text, name="r"):
        return recipes.training_job(recipe, text, name, out, guard, REPO / "train.py", REPO / "configs")

    with pytest.raises(ConfigError, match="train.max_stepz"):
        job("train.max_stepz=3")
    with pytest.raises(ConfigError, match="train.lr"):
        job("train.lr=-1")
    with pytest.raises(ConfigError, match="data.frames"):  # the model's frame rule (8N+1), before launch
        job("data.frames=10")
    with pytest.raises(ConfigError, match="key=value"):
        job("train.max_steps")
    with pytest.raises(ConfigError, match="output_dir"):
        job(f"output_dir={tmp_path / 'elsewhere'}")
    with pytest.raises(ConfigError, match="data.root .*outside"):
        job("data.root=/etc")
    with pytest.raises(ConfigError, match="validation.images /etc/passwd: outside"):  # a list of paths: each one
        job("'validation.images=[/etc/passwd]'")
    with pytest.raises(ConfigError, match="validation.images .*outside"):  # the section set as a whole
        job("'validation={images: [models/tiny-world, /etc/passwd]}'")
    with pytest.raises(ConfigError, match="train.resume_from .*outside"):
        job("train.resume_from=/etc")
    with pytest.raises(ConfigError, match="model.base .*outside"):
        job("model.base=/etc")
    with pytest.raises(ConfigError, match="run name"):
        job("", name="../up")
    ok = job("train.max_steps=20 'validation.prompts=[a purple square moving left]'")
    assert ok.command[1:3] == ["-m", "accelerate.commands.launch"] and str(REPO / "train.py") in ok.command
    assert f"output_dir={out.resolve() / 'r'}" in ok.command and ok.run_dir == out.resolve() / "r"
    assert ok.max_steps == 20 and ok.log == ok.run_dir / runs.LOG
    cmd, env = train_command("train.py", "r.yaml", [], "zero2", 2, REPO / "configs", port=1234)
    assert cmd[3:9] == ["--config_file", str(REPO / "configs" / "accelerate" / "zero2.yaml"), "--num_processes", "2",
                        "--main_process_port", "1234"]
    import torch

    assert env == ({} if torch.cuda.is_available() else {"DS_ACCELERATOR": "cpu"})


def test_the_guard_walks_the_schema_so_a_new_path_field_is_guarded(tmp_path):
    """Every field marked {"path": True} in cogpipe/config.py is guarded, found from the schema: a path field added
    later (here a new section of a grown schema) is guarded with no change to the page."""
    from dataclasses import dataclass, field
    from typing import Optional

    from cogpipe.config import Config
    from cogpipe.ui.safety import path_fields

    assert set(path_fields(Config)) == {"output_dir", "model.pretrained", "model.base", "data.root", "data.cache_dir",
                                        "data.store", "data.store_cache_dir", "train.resume_from", "validation.images",
                                        "validation.teacache_coefficients"}

    @dataclass
    class Adapter:
        weights: Optional[str] = field(default=None, metadata={"path": True})
        name: str = "x"

    @dataclass
    class Grown(Config):
        adapter: Adapter = field(default_factory=Adapter)

    outputs = tmp_path / "outputs"
    guard = PathGuard([outputs, REPO / "models"])
    assert "adapter.weights" in path_fields(Grown) and "adapter.name" not in path_fields(Grown)
    with pytest.raises(ConfigError, match="adapter.weights /etc/passwd: outside"):
        recipes.check_override_paths(["adapter.weights=/etc/passwd"], guard, outputs, schema=Grown)
    recipes.check_override_paths([f"adapter.weights={REPO / 'models'}", "adapter.name=/etc/passwd"], guard, outputs,
                                 schema=Grown)
    # hub ids pass where the loaders take one (model.pretrained), as the loaders tell them from paths
    recipes.check_override_paths(["model.pretrained=THUDM/CogVideoX-5b", "train.resume_from=latest"], guard, outputs)
    with pytest.raises(ConfigError, match="model.pretrained"):
        recipes.check_override_paths(["model.pretrained=/etc"], guard, outputs)


def test_generate_tab_uses_infer_arguments_and_checks(tmp_path):
    out = tmp_path / "outputs"
    (out / "run" / "lora").mkdir(parents=True)
    (out / "run" / "lora" / gen.LORA_WEIGHTS).write_bytes(b"")
    guard = PathGuard([out, REPO / "models"])
    model = str(REPO / "models" / "tiny-world")
    argv = gen.infer_argv(guard, model, "a blue circle moving up", loras=[str(out / "run" / "lora")],
                          lora_scales="0.5", frames=9, height=None, steps=3, seed=7)
    a = gen.parse(argv)
    assert (a.model, a.lora, a.lora_scale, a.num_frames, a.height, a.steps, a.seed) == \
        (model, [str((out / "run" / "lora").resolve())], [0.5], 9, None, 3, 7)
    assert gen.found_loras(out) == [str(out / "run" / "lora")]
    with pytest.raises(UnsafePath):
        gen.infer_argv(guard, model, "x", loras=["/etc"])
    with pytest.raises(ValueError, match="2 scales for 1 LoRAs"):
        gen.infer_argv(guard, model, "x", loras=[str(out / "run" / "lora")], lora_scales="1, 2")
    with pytest.raises(ValueError, match="--scheduler"):
        gen.parse(gen.infer_argv(guard, model, "x", scheduler="euler"))
    assert gen.model_defaults(guard, model) == {"frames": 17, "height": 64, "width": 64, "fps": 8}
    generator = gen.Generator(out, guard)
    with pytest.raises(ValueError, match="--num-frames"):  # infer.py's rule check, before any weights load
        generator.generate(model=model, prompt="x", frames=10)
    assert generator._pipe is None
