"""Run by tests/test_speed.py under `torch.distributed.run` on 2 CPU processes (gloo): the shipped tiny-world
model generates across the 2 processes (sequence parallel) with First Block Cache and TeaCache, then rank 0 makes
the same generations in one process. Writes <out>/rank<r>.json: each rank's per-step decisions (blocks evaluated),
the metric each rank would have seen on its own shard, the latents' difference to one process's (rank 0)."""

import json
import sys

import torch
import torch.distributed as dist

from cogpipe import sequence_parallel
from cogpipe.inference import load_pipeline
from cogpipe.inference import speed as sp

STEPS = 6
CASES = [("fbc", 0.5), ("teacache", 0.3)]


def main(out):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    pipe = load_pipeline(None, device="cpu")
    local = []  # the metric on this rank's shard alone, where the group's is taken
    group_change = sp.relative_change

    def recorded(current, previous, group=None):
        local.append(group_change(current, previous, None))
        return group_change(current, previous, group)

    sp.relative_change = recorded

    def run(cache, threshold):
        sp.apply(pipe, sp.Speed(cache, threshold), STEPS)
        report = sp.begin(pipe, STEPS)
        latents = pipe("a blue circle moving up", num_frames=17, height=64, width=64, num_inference_steps=STEPS,
                       guidance_scale=6.0, max_sequence_length=pipe.transformer.config.max_text_seq_length,
                       output_type="latent", generator=torch.Generator("cpu").manual_seed(0)).frames
        decisions = report.as_dict()["blocks_per_step"]
        sp.remove(pipe.transformer)
        return latents, decisions

    result = {}
    sequence_parallel.reset_counts()
    sequence_parallel.enable(pipe.transformer, None)
    group = {}
    for cache, threshold in CASES:
        local.clear()
        group[cache] = run(cache, threshold)
        result[cache] = {"decisions": group[cache][1], "local_metric": list(local)}
    result["all_to_alls"] = sequence_parallel.COUNTS["all_to_all"]
    sequence_parallel.disable(pipe.transformer)
    if rank == 0:
        for cache, threshold in CASES:
            latents, decisions = run(cache, threshold)
            diff = (group[cache][0] - latents).abs().max().item() / latents.abs().max().item()
            result[cache].update(one_process_decisions=decisions, relative_difference=diff)
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
