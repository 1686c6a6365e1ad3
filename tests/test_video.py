"""cogpipe.video: the backend choice (decord where installed, PyAV otherwise, COGPIPE_VIDEO_BACKEND forces), PyAV's
frame-accurate access by index, the two backends giving the same frames, sources (path, bytes, file-like), the mp4
writer, and errors that name the clip. docs/video.md records what was measured."""

import io
import subprocess
import sys

import numpy as np
import pytest

from cogpipe import video
from cogpipe.video import VideoBackendError, VideoError, open_video, probe, read_video, write_mp4

from helpers import REPO, child_env

NO_DECORD = REPO / "tests" / "no_decord"


def _decord_importable() -> bool:
    try:
        import decord  # noqa: F401
        return True
    except ImportError:
        return False


HAS_DECORD = _decord_importable()
needs_decord = pytest.mark.skipif(not HAS_DECORD, reason="decord is not installed (or hidden) here")


def _frames(n, h, w, seed=0):
    """A gradient background with a square that moves and changes colour: smooth and sharp edges, motion."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    out = np.empty((n, h, w, 3), np.uint8)
    for t in range(n):
        out[t] = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, 40 + 5 * t)], -1)
        top, left = (t * 3) % max(h - h // 3, 1), (t * 5) % max(w - w // 3, 1)
        out[t, top:top + h // 3, left:left + w // 3] = rng.integers(0, 256, 3)
    return out


def _encode(path, frames, pix_fmt="yuv420p", fps=8, codec="libx264", **options):
    """A clip write_mp4 does not make: 4:4:4 for odd sizes, short GOPs with B-frames, other codecs and containers
    (the container from the file's suffix)."""
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height = frames.shape[2], frames.shape[1]
        s.pix_fmt, s.options = pix_fmt, {k: str(v) for k, v in options.items()}
        if codec == "libx264":
            s.options = {"crf": "10", **s.options}
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode(None))
    return path


def _sequential(path) -> np.ndarray:
    """Every frame by plain sequential decoding with PyAV, no seeking: the reference for access by index."""
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    made = {}
    for name, (n, h, w) in {"64x64": (17, 64, 64), "64x96": (9, 64, 96), "30x46": (9, 30, 46),
                            "18x18": (5, 18, 18), "16x16": (5, 16, 16), "48x48": (5, 48, 48)}.items():
        made[name] = write_mp4(_frames(n, h, w), root / f"{name}.mp4")
    made["33x47-444"] = _encode(root / "odd.mp4", _frames(7, 33, 47), pix_fmt="yuv444p")
    # keyframes every 6 frames, 3 B-frames: decode order differs from display order, seeks land mid-clip
    made["gop"] = _encode(root / "gop.mp4", _frames(40, 32, 64, seed=1), fps=24, g=6, keyint_min=6, bf=3,
                          sc_threshold=0)
    # AVI keeps no presentation timestamps: with B-frames the decoded frames' differ from the packets'
    made["avi"] = _encode(root / "bframes.avi", _frames(20, 48, 64, seed=2), codec="mpeg4", g=5, bf=2)
    return made


# --- the backend choice ---------------------------------------------------------------------------------------

def test_backend_is_decord_where_installed_else_pyav_and_the_variable_forces_one(monkeypatch):
    monkeypatch.delenv(video.ENV, raising=False)
    assert video.backend_name() == ("decord" if HAS_DECORD else "pyav")
    monkeypatch.setitem(sys.modules, "decord", None)  # `import decord` now raises ImportError
    assert video.backend_name() == "pyav"
    monkeypatch.setenv(video.ENV, "PyAV ")
    assert video.backend_name() == "pyav"
    monkeypatch.setenv(video.ENV, "decord")
    with pytest.raises(VideoBackendError, match=rf"{video.ENV}=decord, but decord is not installed"):
        video.backend_name()
    monkeypatch.setenv(video.ENV, "ffmpeg")
    with pytest.raises(VideoBackendError, match=rf"{video.ENV}='ffmpeg': unknown video backend; use one of "
                                                r"decord, pyav"):
        video.backend_name()
    with pytest.raises(VideoBackendError, match="backend='opencv': unknown video backend"):
        open_video(b"", backend="opencv")


def test_the_no_decord_folder_hides_decord_from_subprocesses_too():
    env = child_env(NO_DECORD)
    env.pop(video.ENV, None)
    code = ("import cogpipe.video as v; print(v.backend_name())\n"
            "try:\n import decord\nexcept ImportError as e: print('hidden:', e)")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "pyav" and "hidden: decord is hidden for this run" in r.stdout


def test_a_forced_backend_reaches_the_data_loader(clips, monkeypatch):
    from cogpipe.data import folders as data

    monkeypatch.setenv(video.ENV, "pyav")
    monkeypatch.setitem(sys.modules, "decord", None)
    assert data.probe_clip(clips["64x64"]) == (17, 64, 64)
    with data.open_clip(clips["64x64"], 9, 32, 32) as reader:
        assert reader.backend == "pyav"
    x = data.load_clip(clips["64x64"], 9, 32, 32)
    assert x.shape == (9, 3, 32, 32) and -1.0 <= x.min() < x.max() <= 1.0


# --- PyAV: frames by index ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gop", "64x64", "33x47-444", "avi"])
def test_pyav_access_by_index_gives_the_frames_of_sequential_decoding(clips, name):
    whole = _sequential(clips[name])
    rng = np.random.default_rng(0)
    with open_video(clips[name], backend="pyav") as r:
        assert (r.backend, r.num_frames, r.height, r.width) == ("pyav", len(whole), *whole.shape[1:3])
        assert np.array_equal(r.frames(range(r.num_frames)), whole)
        for _ in range(12):  # random subsets in random order, repeats included
            idx = rng.integers(0, r.num_frames, size=int(rng.integers(1, 8)))
            assert np.array_equal(r.frames(idx), whole[idx]), idx.tolist()
        n = r.num_frames
        for i in [n - 1, 0, n // 2, n // 2 - 1, n // 2 + 1, 6 % n, 5 % n, 12 % n]:
            assert np.array_equal(r.frames([i])[0], whole[i]), i  # backwards, across and at keyframes
        assert r.frames([]).shape == (0, r.height, r.width, 3)
        with pytest.raises(IndexError, match=rf"frame index {r.num_frames} out of range for a clip of"):
            r.frames([0, r.num_frames])
        with pytest.raises(IndexError, match="frame index -1"):
            r.frames([-1])
    if name == "gop":
        with open_video(clips[name], backend="pyav") as r:
            assert r.keyframes == list(range(0, 40, 6)) and r.fps == 24.0  # the seeks above landed mid-clip


# --- the two backends give the same frames --------------------------------------------------------------------

@needs_decord
@pytest.mark.parametrize("name", ["64x64", "64x96", "30x46", "18x18", "33x47-444", "gop", "avi"])
def test_decord_and_pyav_decode_the_same_frames_exactly(clips, name):
    with open_video(clips[name], backend="decord") as d, open_video(clips[name], backend="pyav") as a:
        assert (d.num_frames, d.fps, d.height, d.width) == (a.num_frames, a.fps, a.height, a.width)
        idx = np.r_[np.arange(a.num_frames), [a.num_frames - 1, 0, 3]]
        assert np.array_equal(d.frames(idx), a.frames(idx))


@needs_decord
@pytest.mark.parametrize("name", ["16x16", "48x48"])
def test_widths_decord_cannot_batch_are_an_error_that_names_the_way_out(clips, name, monkeypatch):
    from cogpipe.data.folders import DataError, probe_clip

    monkeypatch.setenv(video.ENV, "decord")
    with pytest.raises(VideoError, match=rf"{name}.mp4: decord cannot decode frames .*{video.ENV}=pyav"):
        open_video(clips[name], backend="decord")  # at open, so the dataset check names the clip
    with pytest.raises(DataError, match=rf"{name}.mp4: cannot decode video \(decord cannot decode frames"):
        probe_clip(clips[name])
    with open_video(clips[name], backend="pyav") as a:  # PyAV reads them
        assert np.array_equal(a.frames(range(a.num_frames)), _sequential(clips[name]))


# --- sources, probe, read_video -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [pytest.param("decord", marks=needs_decord), "pyav"])
def test_a_path_bytes_or_a_file_object_give_the_same_clip(clips, backend, tmp_path):
    path = clips["64x96"]
    expected = read_video(path)
    data = path.read_bytes()
    with open(path, "rb") as f:
        sources = [str(path), path, data, bytearray(data), io.BytesIO(data), f]
        for src in sources:
            with open_video(src, backend=backend) as r:
                assert r.backend == backend and np.array_equal(r.frames(range(r.num_frames)), expected), src
    assert probe(data) == video.VideoInfo(num_frames=9, fps=8.0, height=64, width=96)
    with pytest.raises(TypeError, match="open_video expects a path, bytes or a binary file-like"):
        open_video(123, backend=backend)


@pytest.mark.parametrize("backend", [pytest.param("decord", marks=needs_decord), "pyav"])
def test_what_is_not_a_video_is_an_error_naming_it_and_the_backend(backend, tmp_path):
    bad = tmp_path / "notes.mp4"
    bad.write_text("not a video")
    with pytest.raises(VideoError, match=rf"{bad}: cannot decode video with {backend} \("):
        open_video(bad, backend=backend)
    with pytest.raises(VideoError, match=rf"<11 bytes>: cannot decode video with {backend}"):
        open_video(b"not a video", backend=backend)


# --- writing --------------------------------------------------------------------------------------------------

def test_write_mp4_is_h264_yuv420p_in_mp4_and_reads_back_close(tmp_path):
    import av

    frames = _frames(9, 64, 96)
    path = write_mp4(frames, tmp_path / "sub" / "out.mp4", fps=8)
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        assert "mp4" in c.format.name and s.codec_context.name == "h264" and s.codec_context.pix_fmt == "yuv420p"
        assert (s.average_rate, s.frames) == (8, 9)
    back = read_video(path).astype(int)
    assert back.shape == frames.shape and np.abs(back - frames).mean() < 2.0  # crf 10: close to the frames given
    floats = write_mp4(frames / 255.0, tmp_path / "floats.mp4")  # floats in [0, 1] are scaled
    assert np.abs(read_video(floats).astype(int) - back).mean() < 0.5
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["floats.mp4", "out.mp4", "sub"]  # no temporaries left


def test_write_mp4_refuses_what_h264_cannot_hold_and_leaves_no_file(tmp_path):
    for bad, match in [(np.zeros((3, 33, 64, 3), np.uint8), "needs an even height and width, got 33x64"),
                       (np.zeros((3, 64, 64), np.uint8), r"expects frames \[F, H, W, 3\]"),
                       (np.zeros((0, 64, 64, 3), np.uint8), "with F >= 1")]:
        with pytest.raises(ValueError, match=match):
            write_mp4(bad, tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="quality must be in 1..10"):
        write_mp4(np.zeros((2, 8, 8, 3), np.uint8), tmp_path / "x.mp4", quality=0)
    assert list(tmp_path.iterdir()) == []


def test_the_mp4_is_the_kind_diffusers_export_to_video_writes(tmp_path):
    pytest.importorskip("imageio_ffmpeg", reason="diffusers' export_to_video needs imageio-ffmpeg")
    import av
    from diffusers.utils import export_to_video

    frames = _frames(9, 64, 64)
    ours = write_mp4(frames, tmp_path / "ours.mp4", fps=8)
    theirs = export_to_video(list(frames / 255.0), str(tmp_path / "theirs.mp4"), fps=8)  # it takes [0, 1] floats

    def kind(path):
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            return c.format.name, s.codec_context.name, s.codec_context.pix_fmt, s.codec_context.profile, \
                (s.height, s.width), s.frames, s.average_rate
    assert kind(ours) == kind(theirs)
    # and the two backends read diffusers' file as they read ours
    assert np.abs(read_video(theirs).astype(int) - read_video(ours).astype(int)).mean() < 3.0
