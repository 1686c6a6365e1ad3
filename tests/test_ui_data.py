"""The page's Data tab without a browser (cogpipe/ui/dataset.py): `cogpipe prepare` as a job of the page's queue with
its paths guarded, the clips listed from clips.jsonl, a caption edited in every written file and kept by a rerun."""

import json
import shutil

import pytest

from cogpipe.config import ConfigError
from cogpipe.ui import dataset
from cogpipe.ui.launcher import JobQueue
from cogpipe.ui.safety import PathGuard, UnsafePath

from helpers import NEEDS_DATA, NEEDS_PREPARE, REPO

pytestmark = NEEDS_DATA + NEEDS_PREPARE  # the extras these tests need: skipped, named, where missing

RECIPE = REPO / "configs" / "tiny_lora.yaml"
NAMES = ["purple_circle_left", "purple_square_up"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A two-video source folder (data/tiny's layout) prepared by a page job into OUTPUTS/data/set."""
    root = tmp_path_factory.mktemp("data_tab")
    src = root / "src"
    (src / "videos").mkdir(parents=True)
    for n in NAMES:
        shutil.copy(REPO / "data" / "tiny" / "videos" / f"{n}.mp4", src / "videos")
    (src / "videos.txt").write_text("".join(f"videos/{n}.mp4\n" for n in NAMES))
    (src / "prompts.txt").write_text("".join(f"{n.replace('_', ' ')} source\n" for n in NAMES))
    outputs = root / "outputs"
    guard = PathGuard([outputs, src, REPO / "configs"])
    queue = JobQueue(cwd=REPO)
    job = dataset.prepare_job(src, "set", RECIPE, outputs, guard, caption_model="source")
    queue.submit(job)
    assert queue.wait(job, timeout=240) == "finished", job.log.read_text()[-3000:]
    return dict(src=src, outputs=outputs, guard=guard, folder=outputs / "data" / "set", job=job)


def test_prepare_job_is_guarded(prepared, tmp_path):
    outputs, guard, src = prepared["outputs"], prepared["guard"], prepared["src"]
    job = dataset.prepare_job(src, "other", RECIPE, outputs, guard)
    assert job.command[1:5] == ["-m", "cogpipe.cli", "prepare", str(src.resolve())]
    assert job.command[job.command.index("--out") + 1] == str((outputs / "data" / "other").resolve())
    assert job.command[job.command.index("--caption-model") + 1] == "source"
    with pytest.raises(UnsafePath, match="source folder"):
        dataset.prepare_job(tmp_path, "x", RECIPE, outputs, guard)  # outside the readable folders
    with pytest.raises(UnsafePath, match="caption model"):
        dataset.prepare_job(src, "x", RECIPE, outputs, guard, caption_model=str(tmp_path))
    with pytest.raises(ConfigError, match="dataset name"):
        dataset.prepare_job(src, "../up", RECIPE, outputs, guard)
    with pytest.raises(ConfigError, match="set by the page"):
        dataset.prepare_job(src, "x", RECIPE, outputs, guard, extra="--out /tmp/elsewhere")
    running = dataset.prepare_job(src, "busy", RECIPE, outputs, guard)
    running.state = "running"
    with pytest.raises(ConfigError, match="already running"):
        dataset.prepare_job(src, "busy", RECIPE, outputs, guard, jobs=[running])


def test_clips_listed_with_captions_and_scores(prepared):
    assert prepared["job"].returncode == 0 and "write " in prepared["job"].log.read_text()
    assert dataset.list_prepared(prepared["outputs"]) == ["set"]
    rows = dataset.clip_rows(prepared["folder"])
    assert len(rows) == 2
    by_caption = {r[1]: r for r in rows}
    assert set(by_caption) == {f"{n.replace('_', ' ')} source" for n in NAMES}
    for r in rows:
        assert r[0].endswith(".mp4") and (prepared["folder"] / "clips" / r[0]).is_file()
        assert r[2] > 0 and r[3] is not None and r[4] is not None and r[7] == ""  # tokens, motion, sharpness, kept


def test_edited_caption_reaches_every_file_and_survives_a_rerun(prepared, capsys):
    from cogpipe.data.index import read_manifest

    folder = prepared["folder"]
    clip = dataset.clip_rows(folder)[0][0]
    with pytest.raises(ValueError, match="cannot be empty"):
        dataset.edit_caption(folder, clip, "  \n ", RECIPE)
    busy = dataset.prepare_job(prepared["src"], "set", RECIPE, prepared["outputs"], prepared["guard"])
    busy.state = "running"
    with pytest.raises(ValueError, match="a prepare job is running on this folder"):
        dataset.edit_caption(folder, clip, "text", RECIPE, jobs=[busy])
    with pytest.raises(ValueError, match="no clip"):
        dataset.edit_caption(folder, "missing.mp4", "x", RECIPE)
    with pytest.raises(ValueError, match=r"T5 tokens, more than the recipe's 48 \(max_text_seq_length\)"):
        dataset.edit_caption(folder, clip, "word " * 400, RECIPE)
    other = {p.name: p.read_text() for p in (folder / "work" / "captions").glob("*.json") if p.name != f"{clip}.json"}

    text = "an edited caption:\n a violet shape glides"
    rec = dataset.edit_caption(folder, clip, text, RECIPE)
    flat = "an edited caption: a violet shape glides"  # one line: prompts.txt holds one caption a line
    assert rec["caption"] == flat and rec["model"] == "edit" and rec["tokens"] > 0

    def check():
        assert json.loads((folder / "work" / "captions" / f"{clip}.json").read_text())["caption"] == flat
        manifest = {r["uri"].split("/")[-1]: r for r in read_manifest(folder)}
        assert manifest[clip]["caption"] == flat and manifest[clip]["problem"] is None
        videos = (folder / "videos.txt").read_text().splitlines()
        prompts = (folder / "prompts.txt").read_text().splitlines()
        assert len(videos) == len(prompts) == 2 and prompts[videos.index(f"clips/{clip}")] == flat
        meta = {m["file_name"]: m["caption"] for m in map(json.loads, (folder / "metadata.jsonl").open())}
        assert meta[f"clips/{clip}"] == flat
        clips = {r["clip"]: r for r in dataset.read_clips(folder)}
        assert clips[f"clips/{clip}"]["caption"] == flat and clips[f"clips/{clip}"]["tokens"] == rec["tokens"]
        assert {p.name: p.read_text() for p in (folder / "work" / "captions").glob("*.json")
                if p.name != f"{clip}.json"} == other  # the other clip untouched
        assert not list(folder.rglob("*.tmp*"))  # no temporaries left behind

    check()
    # a rerun of prepare (--caption-model source would take the source's caption again) keeps the edit
    # (in this process: nothing is left to split or score, so no Ray work starts)
    from cogpipe.cli import main

    argv = ["prepare", str(prepared["src"]), "--for", str(RECIPE), "--out", str(folder), "--caption-model", "source"]
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "0 to split" in out and "0 to score" in out
    check()
    # --recaption takes the source's caption again
    assert main(argv + ["--recaption"]) == 0
    manifest = {r["uri"].split("/")[-1]: r for r in read_manifest(folder)}
    assert manifest[clip]["caption"].endswith(" source")
