import pytest
import torch

from cogpipe.data.folders import DataError, VideoDataset, discover, frame_indices, load_clip, resize_crop

from helpers import SPECS, make_clips


@pytest.mark.parametrize("layout", ["txt", "folder", "jsonl", "csv"])
def test_every_layout_is_discovered(tmp_path, layout):
    root = make_clips(tmp_path / layout, SPECS[:2], layout=layout)
    samples = discover(root)
    assert [s.caption for s in samples] == ["a purple square moving right", "a purple circle moving up"]
    assert all(s.video.is_file() and s.video.is_relative_to(root.resolve()) for s in samples)


def test_clip_shapes_and_range(clips):
    ds = VideoDataset(clips, frames=9, height=32, width=48)
    item = ds[0]
    assert item["frames"].shape == (9, 3, 32, 48)
    assert item["frames"].dtype == torch.float32
    assert item["frames"].min() >= -1.0 and item["frames"].max() <= 1.0
    assert item["frames"].min() < -0.5 and item["frames"].max() > 0.0  # dark background, bright shape
    assert item["caption"] == "a purple square moving right"


def test_frame_sampling_spans_the_clip():
    assert frame_indices(17, 17).tolist() == list(range(17))
    idx = frame_indices(33, 17)
    assert idx[0] == 0 and idx[-1] == 32 and len(idx) == 17 and (idx[1:] > idx[:-1]).all()


def test_resize_keeps_aspect_and_center_crops():
    x = torch.zeros(1, 3, 40, 80)
    x[..., 30:50] = 1.0  # a vertical band in the middle of the wide frame
    y = resize_crop(x, 32, 32)
    assert y.shape == (1, 3, 32, 32)
    # aspect kept: 40x80 -> 32x64, then the middle 32 columns; the band (3/8..5/8 of the width) lands centred
    assert y[0, 0, 16, 16] > 0.9 and y[0, 0, 16, 0] < 0.1 and y[0, 0, 16, 31] < 0.1


def test_too_short_and_too_small_clips_name_the_file(clips):
    path = discover(clips)[0].video
    with pytest.raises(DataError, match=r"fewer than data.frames=25") as e:
        load_clip(path, 25, 64, 64)
    assert path.name in str(e.value)
    with pytest.raises(DataError, match="smaller than"):
        load_clip(path, 17, 128, 128)


def test_list_length_mismatch(tmp_path):
    root = make_clips(tmp_path / "d", SPECS[:2])
    (root / "prompts.txt").write_text("only one caption\n")
    with pytest.raises(DataError, match="prompts.txt has 1 lines but .*videos.txt has 2"):
        discover(root)


def test_path_escaping_the_folder(tmp_path):
    root = make_clips(tmp_path / "d", SPECS[:1])
    (root / "videos.txt").write_text("../../etc/passwd\n")
    with pytest.raises(DataError, match="escapes the dataset folder"):
        discover(root)


def test_missing_folder_and_undecodable_file(tmp_path):
    with pytest.raises(DataError, match="data.root"):
        discover(tmp_path / "nope")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(DataError, match="cannot decode") as e:
        load_clip(bad, 17, 64, 64)
    assert "bad.mp4" in str(e.value)
