"""The synthetic world (cogpipe/world/render.py), the scorer (cogpipe/world/score.py) and the shipped data/tiny/
dataset."""

import functools
import itertools
from pathlib import Path

import numpy as np
import pytest

from cogpipe.video import read_video, write_mp4
from cogpipe.world import render as world
from cogpipe.world.score import fixed_prompts, held_out_prompts, score_many, score_video

from helpers import REPO  # noqa: E402

TINY = REPO / "data" / "tiny"
ALL_SPECS = list(itertools.product(world.SHAPES, world.ALL_COLOURS, world.DIRECTIONS))  # 60


@functools.lru_cache(maxsize=1)
def _clips():
    """One clip of every shape x colour x direction (held-out colour included), each with its own seed."""
    return tuple((world.render(s, c, d, seed=i), world.caption(s, c, d)) for i, (s, c, d) in enumerate(ALL_SPECS))


def _foreground(video):
    return (video.astype(int) != np.array(world.BACKGROUND)).any(axis=-1)  # (F, H, W)


def _blur(video, sigma):
    """Separable gaussian blur over height and width; float output."""
    r = int(3 * sigma + 0.5)
    k = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma**2))
    k /= k.sum()
    out = np.pad(video.astype(np.float32), ((0, 0), (r, r), (0, 0), (0, 0)), mode="edge")
    out = sum(w * out[:, i:i + video.shape[1]] for i, w in enumerate(k))  # height
    out = np.pad(out, ((0, 0), (0, 0), (r, r), (0, 0)), mode="edge")
    return sum(w * out[:, :, i:i + video.shape[2]] for i, w in enumerate(k))  # width


def _u8(x):
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


# --- the world ---------------------------------------------------------------------------------------------

def test_render_is_deterministic_with_right_shape_and_dtype():
    a = world.render("triangle", "green", "up", seed=7)
    assert a.dtype == np.uint8 and a.shape == (17, 64, 64, 3)
    assert np.array_equal(a, world.render("triangle", "green", "up", seed=7))
    assert not np.array_equal(a, world.render("triangle", "green", "up", seed=8))
    assert world.render("circle", "purple", "left", frames=25, size=96, seed=1).shape == (25, 96, 96, 3)
    # the background is the plain background colour
    assert (a[:, 0, 0] == world.BACKGROUND).all()


@pytest.mark.parametrize("bad", [dict(shape="hexagon"), dict(colour="orange"), dict(direction="sideways"),
                                 dict(frames=1), dict(size=48)])
def test_render_rejects_bad_arguments(bad):
    args = dict(shape="square", colour="red", direction="left", frames=17, size=64)
    args.update(bad)
    with pytest.raises(ValueError):
        world.render(args.pop("shape"), args.pop("colour"), args.pop("direction"), **args)


def test_shapes_stay_inside_the_frame_and_move_a_clear_distance():
    for i, (s, c, d) in enumerate(ALL_SPECS):
        video = world.render(s, c, d, seed=100 + i)
        fg = _foreground(video)
        assert not fg[:, [0, -1], :].any() and not fg[:, :, [0, -1]].any(), (s, c, d)  # never touches an edge
        ys, xs = np.nonzero(fg[0])
        assert 23 <= max(np.ptp(ys), np.ptp(xs)) + 1 <= 34, (s, c, d)  # 6-8 latent pixels at 4x compression
        start = np.argwhere(fg[0]).mean(axis=0)
        end = np.argwhere(fg[-1]).mean(axis=0)
        dy, dx = end - start
        expected = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}[d]
        along = dy * expected[0] + dx * expected[1]
        across = dx if expected[0] else dy
        assert 17 <= along <= 25 and abs(across) < 0.5, (s, c, d, dx, dy)


def test_captions_parse_back():
    for s, c, d in ALL_SPECS:
        assert world.parse_prompt(world.caption(s, c, d)) == (c, s, d)
    assert world.parse_prompt("a red ball") == ("red", "circle", None)
    assert world.parse_prompt("Purple triangle, moving UPWARDS.") == ("purple", "triangle", "up")
    assert world.parse_prompt("a cat on a sofa") == (None, None, None)


def test_sample_specs_is_balanced_and_deterministic():
    specs = world.sample_specs(48, seed=3)
    assert specs == world.sample_specs(48, seed=3) and specs != world.sample_specs(48, seed=4)
    assert {(x.shape, x.colour, x.direction) for x in specs} == set(
        itertools.product(world.SHAPES, world.COLOURS, world.DIRECTIONS))
    assert len({x.seed for x in specs}) == 48
    assert world.HELD_OUT_COLOUR not in {x.colour for x in world.sample_specs(200, seed=0)}
    held = world.sample_specs(12, seed=0, colours=[world.HELD_OUT_COLOUR])
    assert {x.colour for x in held} == {"purple"} and len({x.caption for x in held}) == 12


def test_fixed_prompts_cover_the_palette_and_the_held_out_colour_separately():
    prompts = fixed_prompts()
    assert prompts == fixed_prompts() and len(set(prompts)) == 48
    assert {world.parse_prompt(p) for p in prompts} == set(
        itertools.product(world.COLOURS, world.SHAPES, world.DIRECTIONS))
    held = held_out_prompts()
    assert len(set(held)) == 12 and all(world.parse_prompt(p)[0] == "purple" for p in held)
    assert not any("purple" in p for p in prompts)


# --- the scorer --------------------------------------------------------------------------------------------

def test_scorer_is_perfect_on_fresh_clips():
    assert score_many(_clips()) == {"colour": 1.0, "shape": 1.0, "direction": 1.0, "all": 1.0, "n": 60}


def test_scorer_is_perfect_after_an_mp4_round_trip(tmp_path):
    decoded = []
    for i, (frames, prompt) in enumerate(_clips()):
        back = read_video(write_mp4(frames, tmp_path / f"{i}.mp4", fps=8))
        assert back.shape == frames.shape
        decoded.append((back, prompt))
    assert score_many(decoded) == {"colour": 1.0, "shape": 1.0, "direction": 1.0, "all": 1.0, "n": 60}


def test_scorer_is_robust_to_noise_and_blur():
    rng = np.random.default_rng(0)
    clips = _clips()
    smooth = [_blur(f, 1.5) for f, _ in clips]
    noisy = [(_u8(f + rng.normal(0, 12, f.shape)), p) for f, p in clips]
    blurred = [(_u8(b), p) for b, (_, p) in zip(smooth, clips)]
    both = [(_u8(b + rng.normal(0, 12, b.shape)), p) for b, (_, p) in zip(smooth, clips)]
    for items in (noisy, blurred, both):
        assert score_many(items)["all"] >= 0.95


def _with_bump(frames, colour):
    """A bump of the shape's colour, 6 px tall and 4 px wide, on its left side in every frame, as a tiny model
    draws them."""
    out = frames.copy()
    for t, mask in enumerate(_foreground(frames)):
        ys, xs = np.nonzero(mask)
        y = int(ys.mean())
        out[t, y - 3:y + 3, max(xs.min() - 4, 0):xs.min()] = world.RGB[colour]
    return out


def test_a_bump_does_not_turn_a_square_round():
    # the fill of the bounding box (square 1.0, circle 0.79) drops to 0.87-0.89 for these squares: the earlier
    # rule (square above 0.89) read 3 of the 4 as circles
    for shape in ("square", "circle"):
        for seed, direction in enumerate(world.DIRECTIONS):
            frames = _with_bump(world.render(shape, "red", direction, seed=seed), "red")
            result = score_video(frames, f"a red {shape} moving {direction}")
            assert result["shape"] == shape, (shape, direction, result["features"])
    square = score_video(world.render("square", "red", "up", seed=0), "a red square")["features"]
    circle = score_video(world.render("circle", "red", "up", seed=0), "a red circle")["features"]
    assert abs(square["corners"] - 1.2) < 0.02 and abs(circle["corners"] - 1.0) < 0.02


def test_scorer_reports_mismatches():
    frames = world.render("circle", "red", "right", seed=5)
    result = score_video(frames, "a blue square moving left")
    assert (result["colour"], result["shape"], result["direction"]) == ("red", "circle", "right")
    assert result["match"] == {"colour": False, "shape": False, "direction": False, "all": False}
    one_wrong = score_video(frames, "a red circle moving up")["match"]
    assert one_wrong == {"colour": True, "shape": True, "direction": False, "all": False}
    assert score_many([(frames, "a red circle moving right"), (frames, "a blue circle moving left")]) == {
        "colour": 0.5, "shape": 1.0, "direction": 0.5, "all": 0.5, "n": 2}


def test_prompt_without_an_attribute_leaves_it_out():
    result = score_video(world.render("circle", "red", "up", seed=1), "a red ball")
    assert result["match"] == {"colour": True, "shape": True, "direction": None, "all": True}


def test_scorer_handles_videos_without_a_shape():
    flat = np.full((17, 64, 64, 3), 40, np.uint8)
    noise = _u8(np.random.default_rng(0).normal(100, 20, (17, 64, 64, 3)))
    for frames in (flat, noise):
        result = score_video(frames, "a red square moving left")
        assert (result["colour"], result["shape"], result["direction"]) == (None, None, None)
        assert result["match"] == {"colour": False, "shape": False, "direction": False, "all": False}
    # a shape that does not move has no direction
    still = np.repeat(world.render("square", "yellow", "down", seed=2)[:1], 17, axis=0)
    result = score_video(still, "a yellow square moving down")
    assert result["direction"] is None and result["match"]["shape"] and not result["match"]["direction"]


def test_scorer_ignores_a_stray_blob_and_takes_float_and_larger_videos():
    frames = world.render("triangle", "purple", "left", seed=4).copy()
    frames[:, 2:7, 2:7] = world.RGB["green"]  # a small blob of another colour in a corner
    assert score_video(frames, "a purple triangle moving left")["match"]["all"]
    big = world.render("square", "blue", "up", frames=25, size=128, seed=3)
    assert score_video(big.astype(np.float32) / 255.0, "a blue square moving up")["match"]["all"]
    with pytest.raises(ValueError):
        score_video(big[0], "a blue square moving up")  # one frame, not a video


# --- the shipped dataset -----------------------------------------------------------------------------------

def _tiny_entries(root):
    prompts = (root / "prompts.txt").read_text().splitlines()
    videos = (root / "videos.txt").read_text().splitlines()
    assert len(prompts) == len(videos)
    return list(zip(prompts, videos))


def test_tiny_dataset_decodes_and_shows_the_held_out_colour():
    entries = _tiny_entries(TINY)
    assert len(entries) >= 8 and len({p for p, _ in entries}) == len(entries)
    total = 0
    for prompt, rel in entries:
        path = TINY / rel
        assert not Path(rel).is_absolute() and path.is_file(), rel
        total += path.stat().st_size
        frames = read_video(path)
        assert frames.shape[0] >= 17 and frames.shape[1:] == (64, 64, 3), rel
        assert world.parse_prompt(prompt)[0] == world.HELD_OUT_COLOUR
        assert score_video(frames, prompt)["match"]["all"], (prompt, rel)
    assert total < 200_000  # a few KB a clip


def test_make_tiny_reproduces_the_shipped_dataset(tmp_path):
    from cogpipe.cli import main

    assert main(["world", "tiny-data", "--out", str(tmp_path)]) == 0
    assert _tiny_entries(tmp_path) == _tiny_entries(TINY)
    for _, rel in _tiny_entries(TINY):
        diff = np.abs(read_video(tmp_path / rel).astype(int) - read_video(TINY / rel).astype(int))
        assert diff.mean() < 1.0, rel
