"""The README, run as a newcomer would: every fenced ```bash block of README.md and docs/*.md.

A block runs unless the line right above its opening fence is `<!-- readme: skip (REASON) -->` (it needs a GPU, the
hub, real weights, a long time, ...). Runnable blocks run in a fresh copy of the checkout (`git ls-files`: what a
clone holds, no outputs/), in order, one bash session per document, so `cd` and variables carry over as in a
reader's terminal; `python`, `accelerate` and `cogpipe` are this interpreter's. A failure names the document, the
command, its exit code and the last 40 lines of its output.

Every block, skipped or not, is also checked for its syntax: each `python X.py`, `cogpipe SUB ...` and
`accelerate launch ... X.py` names only flags its parser has (read from its `--help`), the scripts, configs and
other checkout files it names exist, and train.py's `key=value` overrides are keys of the recipe schema with values
of their type.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers import REPO

DOCUMENTS = ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))]
SKIP = re.compile(r"^\s*<!--\s*readme:\s*skip\s*\((?P<reason>.+)\)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>\S*)\s*$")
CLOSE = re.compile(r"^\s*```\s*$")
CHECKOUT = ("configs/", "models/", "data/", "bench/", "docs/", "tests/", "cogpipe/")
TAIL = 40


@dataclass
class Block:
    document: str
    line: int  # of the opening fence, 1-based
    text: str
    skip: str | None  # the reason, for a block that is only checked
    commands: list[str] = field(default_factory=list)  # logical lines: continuations joined, comments kept


def blocks(document: str, text: str | None = None) -> list[Block]:
    """The ```bash blocks of a document (or of `text`), each with its skip reason (or None) and its commands."""
    lines = ((REPO / document).read_text() if text is None else text).splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m and m["lang"] == "bash":
            above = SKIP.match(lines[i - 1]) if i else None
            body, j = [], i + 1
            while not CLOSE.match(lines[j]):
                body.append(lines[j][len(m["indent"]):] if lines[j].startswith(m["indent"]) else lines[j].lstrip())
                j += 1
            found.append(Block(document, i + 1, "\n".join(body), above["reason"] if above else None,
                               logical_lines(body)))
            i = j
        elif m and m["lang"]:  # another language's block: step over it whole
            i += 1
            while not CLOSE.match(lines[i]):
                i += 1
        i += 1
    return found


def logical_lines(body: list[str]) -> list[str]:
    out, current = [], ""
    for line in body:
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip() and not current.strip().startswith("#"):
            out.append(current.strip())
        current = ""
    return out


# ---- the syntax check ---------------------------------------------------------------------------------------------

def simple_commands(command: str) -> list[list[str]]:
    """A logical line as its simple commands (split at && || ; |), each as words, comments and env assignments off."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split, lexer.commenters = True, "#"
    words, out = [], []
    for token in lexer:
        if token and set(token) <= set(";&|"):
            out.append(words)
            words = []
        else:
            words.append(token)
    out.append(words)
    commands = []
    for ws in filter(None, out):
        while ws and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", ws[0]):  # VAR=value before the command
            ws = ws[1:]
        commands.append(ws)
    return [ws for ws in commands if ws]


_HELP: dict[tuple, set[str]] = {}


def flags_of(program: tuple[str, ...]) -> set[str]:
    """The --flags a program's --help lists: ("infer.py",), ("cogpipe", "world", "strip"), ("accelerate launch",)."""
    if program in _HELP:
        return _HELP[program]
    out = io.StringIO()
    if program[0].endswith(".py"):  # the script's own parser, in this process (its imports are this suite's)
        argv, sys.argv = sys.argv, [program[0], "--help"]
        path = list(sys.path)
        sys.path.insert(0, str((REPO / program[0]).parent))
        try:
            with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
                runpy.run_path(str(REPO / program[0]), run_name="__main__")
        finally:
            sys.argv, sys.path[:] = argv, path
    elif program[0] == "cogpipe":
        from cogpipe.cli import main

        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            main([*program[1:], "--help"])
    else:  # accelerate launch: its parser's options (its help shows only some, by what sys.argv holds)
        from accelerate.commands.launch import launch_command_parser

        out.write(" ".join(o for a in launch_command_parser()._actions for o in a.option_strings))
    _HELP[program] = set(re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*)", out.getvalue()))
    return _HELP[program]


# cogpipe commands with commands of their own: every word after them names one (None), or only these words do
NESTED = {"world": None, "data": None, "prepare": {"split", "filter", "caption", "write"}}


def problems(words: list[str]) -> list[str]:
    """What is wrong with one simple command: unknown flags, missing checkout files, bad recipe overrides."""
    words = [w for w in words if not re.search(r"[\[\]<>]|\.\.\.", w)]  # a template's placeholders: [opt], <x>
    if not words:
        return []
    found = []
    for w in words:  # files of the checkout (not placeholders, not what a run writes)
        path = w.split("=", 1)[-1]
        if path.startswith(CHECKOUT) and "*" not in path and not (REPO / path).exists():
            found.append(f"{path}: no such file in the checkout")
    program, args = None, []
    if words[0] in ("python", "python3") and len(words) > 1 and words[1].endswith(".py"):
        program, args = (words[1],), words[2:]
    elif words[0] == "cogpipe" and len(words) > 1:
        nested = NESTED.get(words[1], ())
        sub = words[1:3] if len(words) > 2 and (nested is None or words[2] in nested) else words[1:2]
        program, args = ("cogpipe", *sub), words[1 + len(sub):]
    elif words[:2] == ["accelerate", "launch"]:
        script = next((k for k, w in enumerate(words) if w.endswith(".py")), None)
        if script is None:
            return [*found, "accelerate launch without a script"]
        found += [f"accelerate launch {w}: no such flag" for w in _flags(words[2:script])
                  if w not in flags_of(("accelerate launch",))]
        program, args = (words[script],), words[script + 1:]
    if program is None:
        return found
    if program[0].endswith(".py") and not (REPO / program[0]).is_file():
        return [*found, f"{program[0]}: no such script in the checkout"]
    known = flags_of(program)
    found += [f"{' '.join(program)} {w}: no such flag" for w in _flags(args) if w not in known]
    if program == ("train.py",):
        found += _override_problems(args)
    return found


def _flags(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--") and len(a) > 2]


def _override_problems(args: list[str]) -> list[str]:
    from omegaconf import OmegaConf

    from cogpipe.config import Config

    found = []
    for a in args:
        if "=" in a and not a.startswith("-"):
            try:
                OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.from_dotlist([a]))
            except Exception as e:  # noqa: BLE001 (OmegaConf's errors: an unknown key, a value of another type)
                found.append(f"train.py {a}: {str(e).splitlines()[0]}")
    return found


ALL = [b for d in DOCUMENTS for b in blocks(d)]


@pytest.mark.parametrize("block", ALL, ids=[f"{b.document}:{b.line}" for b in ALL])
def test_every_command_names_flags_and_files_that_exist(block):
    found = [f"{c}\n    {p}" for c in block.commands for words in simple_commands(c) for p in problems(words)]
    assert not found, f"{block.document}, the block at line {block.line}:\n" + "\n".join(found)


def test_the_skip_marks_are_read():
    """A mark names its reason, and a mark that is not right above a fence would be silently ignored: refused."""
    assert any(b.skip for b in ALL) and any(not b.skip for b in ALL)
    for document in DOCUMENTS:
        lines = (REPO / document).read_text().splitlines()
        for i, line in enumerate(lines):
            if line.lstrip().startswith("<!--") and "readme:" in line:
                assert SKIP.match(line), f"{document}:{i + 1}: write it `<!-- readme: skip (REASON) -->`"
                assert i + 1 < len(lines) and FENCE.match(lines[i + 1]) and "bash" in lines[i + 1], \
                    f"{document}:{i + 1}: the skip mark must sit right above a ```bash fence"


def test_the_block_reader():
    text = ["x", "<!-- readme: skip (needs a GPU) -->", "```bash", "a --x 1 \\", "  --y 2   # why", "# a note", "```",
            "```python", "```bash", "```", "  ```bash", "  cd sub && b", "  ```"]  # the python block holds "```bash"
    got = blocks("case.md", "\n".join(text) + "\n")
    assert [(b.line, b.skip, b.commands) for b in got] == [(3, "needs a GPU", ["a --x 1    --y 2   # why"]),
                                                          (11, None, ["cd sub && b"])]
    assert simple_commands("A=1 B=2 cmd --f x=1 && cd y; z | w  # c") == [["cmd", "--f", "x=1"], ["cd", "y"], ["z"],
                                                                           ["w"]]
    assert problems(["python", "infer.py", "--nope"]) == ["infer.py --nope: no such flag"]
    assert problems(["accelerate", "launch", "--config_file", "configs/accelerate/none.yaml", "train.py", "--config",
                     "configs/tiny_lora.yaml", "train.max_stepz=5"])[0].startswith("configs/accelerate/none.yaml")
    assert any("max_stepz" in p for p in problems(["python", "train.py", "--config", "configs/tiny_lora.yaml",
                                                   "train.max_stepz=5"]))


# ---- running the runnable blocks ----------------------------------------------------------------------------------

def checkout_files() -> list[str]:
    """What a clone of this checkout holds: tracked files and new ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    return [name for name in listed if name and (REPO / name).is_file()]


def fresh_copy(dst: Path) -> Path:
    """The checkout's files copied (not linked: a command writing a file in place must not reach this checkout)."""
    for name in checkout_files():
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dst / name)
    return dst


def run_document(document: str, root: Path, logs: Path, commands: list[str] | None = None) -> list[dict]:
    """The runnable blocks of one document (or `commands`), in one bash session in `root`; stops at the first failing
    command. Returns each command run: its text, exit code, seconds and output file."""
    if commands is None:
        commands = [c for b in blocks(document) if not b.skip for c in b.commands]
    if not commands:
        return []
    script = ["set +e"]
    for k, c in enumerate(commands):
        log, status = logs / f"{k}.log", logs / f"{k}.status"
        script += ["__t=$(date +%s.%N)", "{", c, f"}} > {shlex.quote(str(log))} 2>&1 < /dev/null",
                   f"echo \"$? $__t $(date +%s.%N)\" > {shlex.quote(str(status))}",
                   f"[ \"$(cut -d' ' -f1 {shlex.quote(str(status))})\" = 0 ] || exit 0"]
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(root),
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    subprocess.run(["bash", "-c", "\n".join(script)], cwd=root, env=env, timeout=3000)
    ran = []
    for k, c in enumerate(commands):
        status = logs / f"{k}.status"
        if not status.exists():
            break
        code, start, end = status.read_text().split()
        ran.append({"command": c, "code": int(code), "seconds": float(end) - float(start), "log": logs / f"{k}.log"})
    return ran


def _report(document: str, ran: list[dict], total: int) -> str:
    last = ran[-1] if ran else None
    if last is None:
        return f"{document}: the session ran no command"
    out = last["log"].read_text(errors="replace").splitlines()[-TAIL:]
    return (f"{document}: command {len(ran)} of {total} failed with exit code {last['code']}:\n  $ {last['command']}\n"
            f"--- its last {TAIL} lines ---\n" + "\n".join(out))


@pytest.mark.slow
@pytest.mark.parametrize("document", [d for d in DOCUMENTS if any(not b.skip for b in blocks(d))])
def test_the_runnable_commands_work_as_written(document, tmp_path):
    root = fresh_copy(tmp_path / "checkout")
    logs = tmp_path / "logs"
    logs.mkdir()
    started = time.perf_counter()
    ran = run_document(document, root, logs)
    total = sum(len(b.commands) for b in blocks(document) if not b.skip)
    took = ", ".join(f"{r['seconds']:.0f} s {r['command'][:60]}" for r in ran)
    print(f"{document}: {len(ran)} commands in {time.perf_counter() - started:.0f} s ({took})")
    assert len(ran) == total and all(r["code"] == 0 for r in ran), _report(document, ran, total)
    changed = [n for n in checkout_files() if (root / n).read_bytes() != (REPO / n).read_bytes()]
    assert not changed, f"{document}: its commands rewrote files of the checkout: {changed}"


def test_a_session_carries_cd_and_variables_and_a_failure_names_its_command(tmp_path):
    (tmp_path / "sub").mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()
    commands = ["cd sub && X=7", "echo \"in $(basename $PWD) with $X\"", "ls nowhere  # fails", "echo never"]
    ran = run_document("case.md", tmp_path, logs, commands)
    assert [r["code"] for r in ran[:2]] == [0, 0] and ran[1]["log"].read_text() == "in sub with 7\n"
    assert len(ran) == 3 and ran[2]["code"] != 0  # the session stops at the first failure
    report = _report("case.md", ran, len(commands))
    assert "command 3 of 4 failed with exit code" in report and "$ ls nowhere  # fails" in report
    assert "nowhere" in report.split("---", 1)[1]  # ls's own message, from the command's output
