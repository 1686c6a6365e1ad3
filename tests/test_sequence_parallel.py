"""Sequence parallel (cogpipe/sequence_parallel.py): the transformer across 2 and 4 CPU processes (gloo) gives one
process's output and parameter gradients for every position scheme; the size checks."""

import json
import os
import subprocess
import sys

import pytest

from cogpipe import sequence_parallel as sp

from helpers import REPO, free_port

# fp64 throughout: the SP run sums the same products in another order (tokens split over ranks, gradients summed
# over the group), so the results differ by rounding only: about 1e-16 of the values' scale a step; 1e-12 of the
# scale leaves room for the few hundred additions of these sizes and fails on any real error (a missing or
# doubled part is of the order of the values themselves)
REL = 1e-12


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    """One launch of 4 processes: SP 2 (x DP 2: two groups of 2 processes) and SP 4, every variant."""
    out = tmp_path_factory.mktemp("sp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port",
           str(free_port()), str(REPO / "tests" / "sp_equality.py"), str(out)]
    r = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [json.loads((out / f"rank{i}.json").read_text()) for i in range(4)]


@pytest.mark.slow
def test_output_and_every_gradient_equal_one_process(four):
    from sp_equality import VARIANTS

    names = {f"sp{n}/{v[0]}" for n in (2, 4) for v in VARIANTS}
    for rank, report in enumerate(four):
        assert set(report) == names
        for name, r in report.items():
            assert r["output"] <= REL * r["output_scale"], (rank, name, r)
            assert r["grad"] <= REL * r["grad_scale"], (rank, name, r)
            assert r["zero_grads"] == [], (rank, name)  # every parameter's gradient was compared, none trivially
            assert r["restored"] == 0.0  # disable() gives back the model's own attention
            # per block: the q/k/v and output all-to-alls forward and back, the text heads' reduce-scatter; twice
            # that again where gradient checkpointing recomputes the forward
            checkpointed = name.endswith("ofs")
            assert r["all_to_all"] == 2 * (5 + 2 * checkpointed), (name, r)
            assert r["all_gather"] == 2 * (1 + checkpointed) + 1, (name, r)


@pytest.mark.slow
def test_counted_bytes_match_the_analytic_count(four):
    from sp_equality import COMMON, TEXT, VARIANTS

    for name, kwargs, frames, h, w, checkpointed in VARIANTS:
        cfg = {"patch_size": 2, "patch_size_t": None, **COMMON, **kwargs}
        tokens = (frames // (cfg["patch_size_t"] or 1)) * (h // 2) * (w // 2)
        for n in (2, 4):
            expected = sp.exchanged_bytes(cfg, tokens, TEXT, batch=2, sp=n, element_size=8)
            counted = four[0][f"sp{n}/{name}"]["bytes_sent"]
            if checkpointed:  # the recomputed forward's blocks (not the output gather) exchange once more
                gather = 2 * -(-tokens // n) * 4 * 4 * (cfg["patch_size_t"] or 1) * 8 * (n - 1)
                expected["step"] += expected["forward"] - gather
            assert counted == expected["step"], (name, n, counted, expected)


def test_size_problems_name_the_valid_values():
    assert sp.problem(1, 30, 8) is None and sp.problem(2, 30, 8) is None and sp.problem(8, 48, 8) is None
    assert "valid values: 1, 2, 3, 5, 6, 10, 15, 30" in sp.problem(4, 30, None)
    assert "valid values here: 1, 2, 3, 6" in sp.problem(5, 30, 6)
    assert "valid values here: 1, 2, 3, 6" in sp.problem(4, 30, 6)  # 5 does not divide 6 processes
    assert sp.valid_sizes(48) == [2, 3, 4, 6, 8] and sp.valid_sizes(30) == [2, 3, 5, 6]
    assert "does not divide the 6 processes" in sp.problem(4, 48, 6)
    layout = sp.Layout(rank=5, world=8, sp=4)
    assert (layout.sp_rank, layout.dp_rank, layout.dp_world, layout.group_ranks(1)) == (1, 1, 2, [4, 5, 6, 7])
