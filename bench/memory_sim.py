"""Every recipe's training step simulated at its real size on the meta device (`cogpipe plan --simulate`), plain
and with the low-VRAM switches, into bench/results/memory_sim.json; `--readme` rewrites README.md's memory table
from that file.

    python bench/memory_sim.py                      # every run below (about a minute each on 2 cores)
    python bench/memory_sim.py --only 5b_lora       # runs whose name contains this
    python bench/memory_sim.py --readme             # the formula beside each run and README's table, from the JSON

Each run is one process's step, batch 1, the recipe's gradient checkpointing; the file also holds the formula of
`cogpipe plan` for each plain recipe (GB = 1e9 bytes, converted to GiB) and the per-rank shares of its launchers.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import write_json  # noqa: E402

OUT = ROOT / "bench" / "results" / "memory_sim.json"
SWAP_OFFLOAD = ["train.blocks_to_swap=36", "train.activation_offload=true"]
# (name, recipe, overrides, goal in GiB or None): the plain recipes, then the switches the goals ask about
RUNS = [
    ("5b_lora+swap36+offload", "cogvideox_5b_lora.yaml", SWAP_OFFLOAD, 12.0),
    ("1.5_5b_lora+swap36+offload", "cogvideox1.5_5b_lora.yaml", SWAP_OFFLOAD, 24.0),
    ("5b_full+offload+adamw8bit", "cogvideox_5b_full.yaml",
     ["train.activation_offload=true", "train.optimizer=adamw8bit"], None),
    ("5b_lora+swap36+offload+int8", "cogvideox_5b_lora.yaml", SWAP_OFFLOAD + ["model.quantize_frozen=int8"], 12.0),
    ("5b_lora+offload+fp8", "cogvideox_5b_lora.yaml", ["train.activation_offload=true", "model.fp8_frozen=true"], None),
] + [(p.stem, p.name, [], None) for p in sorted((ROOT / "configs").glob("*.yaml"))]


def _whole_sample(runs):
    """A sequence-parallel recipe is simulated at train.sequence_parallel=1: the simulation is one process, which
    holds the whole sample (its per-GPU share under SP is cogpipe plan's formula alone, not checked here)."""
    from omegaconf import OmegaConf

    for name, recipe, overrides, goal in runs:
        sp = OmegaConf.load(ROOT / "configs" / recipe).get("train", {}).get("sequence_parallel", 1)
        yield name, recipe, overrides + (["train.sequence_parallel=1"] if sp > 1 else []), goal


RUNS = list(_whole_sample(RUNS))
LAUNCHERS = [("zero2", 8), ("zero3", 8), ("fsdp", 8)]

# the peers' published figures (GB as they state them), beside the plain recipes in the README table
PEERS = {
    "cogvideox_2b_lora": "CogVideo 16 (fp16); CogKit 12",
    "cogvideox_5b_lora": "CogVideo 24; CogKit 24; finetrainers 18 (fp8, rank 128, 49x512x768)",
    "cogvideox1.5_5b_lora": "CogVideo 35; CogKit 32",
    "cogvideox_5b_full": "CogKit 20 (FSDP, per GPU)",
}


def low_vram(recipe: str) -> list[str]:
    """The low-VRAM switches of cogpipe/offload.py a recipe can take: a LoRA recipe its frozen blocks swapped to the
    host (2 of them) and its checkpointed activations offloaded; a full fine-tune its activations offloaded and 8-bit
    AdamW. Gradient checkpointing on (the switches need it)."""
    from omegaconf import OmegaConf

    mode = OmegaConf.load(ROOT / "configs" / recipe).get("train", {}).get("mode", "lora")
    extra = ["train.blocks_to_swap=2"] if mode == "lora" else ["train.optimizer=adamw8bit"]
    return ["train.gradient_checkpointing=true", "train.activation_offload=true", *extra]


def every_recipe() -> list[tuple[str, str, list[str]]]:
    """(name, recipe, overrides) for every shipped recipe, plain and with its low-VRAM switches."""
    plain = [(p.stem, p.name, []) for p in sorted((ROOT / "configs").glob("*.yaml"))]
    runs = plain + [(f"{n}+low_vram", r, low_vram(r)) for n, r, _ in plain]
    return [(n, r, o) for n, r, o, _ in _whole_sample([(n, r, o, None) for n, r, o in runs])]


def git_state(out: Path = OUT) -> dict:
    """The commit the results are made with, and whether the working tree differed from it (the results file `out`,
    which this script writes, left out)."""
    import subprocess

    def git(*args):
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", f":(exclude){out.resolve()}")
    return dict(commit=git("rev-parse", "HEAD"), dirty=None if status is None else bool(status))


def simulate_run(name: str, recipe: str, overrides: list[str], layers: int | None = None) -> dict:
    """One run: `cogpipe plan --simulate`'s load and simulation of the recipe; `layers`: at most that many transformer
    blocks (the same code path at reduced depth: what the tests run)."""
    from cogpipe.plan import model_stats
    from cogpipe.plan.cli import load
    from cogpipe.plan.simulate import per_rank, simulate

    cfg, transformer_config, note = load(ROOT / "configs" / recipe, overrides)
    if layers is not None:
        transformer_config = dict(transformer_config, num_layers=min(layers, transformer_config["num_layers"]))
    sim = simulate(cfg, transformer_config)
    from cogpipe.plan import estimate

    formula = estimate(cfg, transformer_config=transformer_config)["gb"]
    sim.update(name=name, recipe=f"configs/{recipe}", overrides=overrides, note=note, layers=transformer_config[
        "num_layers"], formula_peak_bytes=round(formula["peak"] * 1e9),
        formula_host_bytes=round(formula["host_offloaded"] * 1e9), **git_state())
    if not overrides:
        weight_bytes = 4 if cfg.train.mode == "full" else 2  # a gathered block in its compute dtype
        block = model_stats(transformer_config)["block_params"] * weight_bytes / 2 ** 30
        sim["launchers"] = [per_rank(sim, s, n, block) for s, n in LAUNCHERS]
    return sim


def add_formula(results: dict) -> dict:
    """Each plain recipe's `cogpipe plan` formula (GB converted to GiB) beside its simulation, from the code as it is
    now (the formula is instant; the simulations are what takes the time)."""
    from cogpipe.plan import estimate
    from cogpipe.plan.cli import load

    for r in results["runs"]:
        if r.get("error"):
            continue
        cfg, transformer_config, _ = load(ROOT / r["recipe"], r["overrides"])
        formula = estimate(cfg, transformer_config=transformer_config)["gb"]["peak"] * 1e9 / 2 ** 30
        r["formula_gib"] = round(formula, 3)
        r["formula_vs_simulation"] = round(formula / r["peak_allocated_gib"], 3)
    return results


def readme_table(results: dict) -> str:
    """The README's memory table (markdown), from memory_sim.json."""
    rows = ["| run | simulated peak GiB | parameters | activations | gradients | optimizer | host GiB | PCIe GB/step "
            "| FSDP, 8 GPUs: a rank | `cogpipe plan` formula | peers (GB, as published) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        if r.get("error"):
            continue
        c = r["categories"]
        over = " ".join(r["overrides"])
        label = f"`{r['recipe'].split('/')[-1]}`" + (f" `{over}`" if over else "")
        fsdp = next((f"{x['peak_allocated_gib']:.2f}" for x in r.get("launchers", []) if x["strategy"] == "fsdp"), "")
        formula = f"{r['formula_gib']:.2f}" if "formula_gib" in r else ""
        rows.append(f"| {label} | **{r['peak_allocated_gib']:.2f}** | {c.get('parameters', 0):.2f} | "
                    f"{c.get('activations', 0):.2f} | {c.get('gradients', 0):.2f} | {c.get('optimizer_state', 0):.2f} "
                    f"| {r['host_peak_gib']:.2f} | {r['pcie_bytes_per_step'] / 1e9:.1f} | {fsdp} | {formula} | "
                    f"{PEERS.get(r['name'], '') if not over else ''} |")
    return "\n".join(rows)


def write_readme(results: dict, readme: Path = ROOT / "README.md") -> None:
    begin, end = "<!-- memory_sim table begin -->", "<!-- memory_sim table end -->"
    text = readme.read_text()
    if begin not in text:
        raise SystemExit(f"{readme}: no '{begin}' marker to put the table at")
    new = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: f"{begin}\n{readme_table(results)}\n{end}",
                 text, flags=re.S)
    readme.write_text(new)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=None, help="run only the runs whose name contains this")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--skip-done", action="store_true", help="keep the runs --out already holds (no error)")
    parser.add_argument("--readme", action="store_true", help="rewrite README.md's table from --out; simulate nothing")
    args = parser.parse_args(argv)
    if args.readme:
        results = add_formula(json.loads(args.out.read_text()))
        write_json(args.out, results)
        write_readme(results)
        return 0
    import torch

    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    runs = {r["name"]: r for r in results.get("runs", [])}
    for name, recipe, overrides, goal in RUNS:
        if args.only and args.only not in name:
            continue
        if args.skip_done and name in runs and not runs[name].get("error"):
            continue
        try:
            sim = simulate_run(name, recipe, overrides)
        except Exception as e:  # recorded, the other runs go on
            sim = dict(name=name, recipe=f"configs/{recipe}", overrides=overrides, error=f"{type(e).__name__}: {e}",
                       peak_allocated_gib=None, host_peak_gib=None, seconds=None)
        if goal is not None:
            sim["goal_gib"] = goal
            sim["meets_goal"] = sim["peak_allocated_gib"] is not None and sim["peak_allocated_gib"] <= goal
        runs[name] = sim
        print(json.dumps({k: sim[k] for k in ("name", "peak_allocated_gib", "host_peak_gib", "seconds")}), flush=True)
        order = [n for n, *_ in RUNS]
        results = dict(torch=torch.__version__, date=time.strftime("%Y-%m-%d"), **git_state(),
                       what="simulated peak allocated GiB (2**30 bytes) of one training step, one process, batch 1; "
                            "`cogpipe plan --simulate`",
                       runs=sorted(runs.values(), key=lambda r: order.index(r["name"]) if r["name"] in order else 99))
        write_json(args.out, add_formula(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
