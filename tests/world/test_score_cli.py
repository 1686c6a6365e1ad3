import json

from cogpipe.world.score import spread


def test_spread_keeps_ends_and_count():
    items = list(range(48))
    assert spread(items, 12)[0] == 0 and spread(items, 12)[-1] == 47 and len(spread(items, 12)) == 12
    assert spread(items, 100) == items


def test_score_command_prints_accuracies(capsys):
    from cogpipe.cli import main

    assert main(["score", "--limit", "2", "--steps", "1", "--prompts", "held-out"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n"] == 2 and out["prompts"] == "held-out"
    assert all(0.0 <= out[k] <= 1.0 for k in ("colour", "shape", "direction", "all"))
