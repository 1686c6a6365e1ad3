"""Training checkpoints under `<output_dir>/checkpoints/`.

    checkpoint-000010/          trainable.safetensors (LoRA or full weights), optimizer/scheduler/RNG
                                state from accelerate, trainer_state.json, config.yaml
    latest                      the name of the newest complete checkpoint

A checkpoint is written under a temporary name and renamed once complete, and `latest` is replaced
atomically (cogpipe.atomic), so `latest` never names a partial checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from cogpipe import atomic
from cogpipe.atomic import failpoint, failpoints_armed  # noqa: F401  (training calls checkpoint.failpoint)

TRAINABLE = "trainable.safetensors"
STATE = "trainer_state.json"


def checkpoints_dir(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def resolve(output_dir, resume_from) -> Path | None:
    """The checkpoint folder to resume from: None for a fresh start.

    `latest` with no checkpoint yet is a fresh start; a PATH that does not exist is an error.
    """
    if resume_from is None:
        return None
    if resume_from == "latest":
        pointer = checkpoints_dir(output_dir) / "latest"
        if not pointer.exists():
            return None
        path = checkpoints_dir(output_dir) / pointer.read_text().strip()
    else:
        path = Path(resume_from)
    if not (path / STATE).is_file():
        raise FileNotFoundError(f"train.resume_from: {path} is not a complete checkpoint "
                                f"(no {STATE}); refusing to start a fresh run silently")
    return path


def trainable_state(model) -> dict:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_trainable(state_dict: dict, names, directory) -> None:
    """Save the trainable entries `names` of a full (gathered) state dict as trainable.safetensors."""
    missing = set(names) - set(state_dict)
    if missing:
        raise KeyError(f"state dict lacks trainable parameters {sorted(missing)[:5]}")
    save_file({k: state_dict[k].detach().contiguous().cpu() for k in sorted(names)}, str(Path(directory) / TRAINABLE))


def load_trainable(model, directory, assign=None) -> None:
    """Load `trainable.safetensors` into the model; every trainable parameter must be there. `assign(param, full)`
    writes one (sharding.assign: each process its own shard of a DTensor); by default a plain copy."""
    file = Path(directory) / TRAINABLE
    state = load_file(str(file))
    want = set(trainable_state(model))
    missing, unexpected = want - set(state), set(state) - want
    if missing or unexpected:
        raise KeyError(f"{file}: does not match the model's trainable parameters: "
                       f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    params = dict(model.named_parameters())
    for name in sorted(state):
        if assign is not None:
            assign(params[name], state[name])
        else:
            params[name].data.copy_(state[name])


def read_state(directory) -> dict:
    return json.loads((Path(directory) / STATE).read_text())


def remove_partial(output_dir) -> list[Path]:
    """Remove what writes killed midway left under the output folder (atomic.sweep); returns it."""
    return atomic.sweep(output_dir)


EMA = "ema.safetensors"


def load_ema(directory, like: dict) -> dict:
    file = Path(directory) / EMA
    if not file.is_file():
        raise FileNotFoundError(f"{file}: train.ema_decay is on but this checkpoint has no EMA weights")
    ema = load_file(str(file))
    if set(ema) != set(like):
        raise KeyError(f"{file}: EMA weights do not match the model's trainable parameters")
    return ema


def _previous(root: Path) -> str:
    """What a failed save leaves standing: the checkpoint `latest` names."""
    latest = root / "latest"
    if not latest.exists():
        return "there is no earlier checkpoint"
    return f"the previous checkpoint ({latest.read_text().strip()}) is intact"


def save(accelerator, output_dir, step: int, state: dict, config_yaml: str, total_limit=None, ema=None,
         save_state=None) -> Path:
    """Write checkpoint-<step> atomically (all processes call this) and point `latest` at it. `save_state(folder)`
    writes the training state (weights, optimizer, schedule, RNG; default: accelerator.save_state); `ema` is the
    full EMA on the main process (gathered by the caller), None elsewhere.

    Rotation keeps the newest `total_limit` complete checkpoints, never the one just written. A failed
    write (a full disk, say) removes the partial folder and leaves the previous checkpoint as it was.
    """
    root = checkpoints_dir(output_dir)
    final = root / f"checkpoint-{step:06d}"
    tmp = [atomic.temp_path(final)]  # named after the main process, the owner of the folder
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(tmp)
    tmp = tmp[0]
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        (save_state or accelerator.save_state)(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / "config.yaml").write_text(config_yaml)
            if ema is not None:
                save_file({k: v.contiguous().cpu() for k, v in ema.items()}, str(tmp / EMA))
            failpoint(f"checkpoint-save:{step}")
            (tmp / STATE).write_text(json.dumps(state, indent=1))
    except Exception as e:  # a full disk: an OSError, or hidden in torch.save's and safetensors' own errors
        cause = atomic.disk_error(e, root)
        shutil.rmtree(tmp, ignore_errors=True)
        if cause is None:
            raise
        raise atomic.write_failed(cause, "checkpoint", final, _previous(root)) from e
    if accelerator.is_main_process:
        try:
            atomic.publish(tmp, final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise atomic.write_failed(e, "checkpoint", final, _previous(root)) from e
        try:
            atomic.write_text(root / "latest", final.name)
        except OSError as e:  # the checkpoint is complete, `latest` still names the one before
            raise atomic.WriteFailed(e.errno, f"{e.strerror or e}; {final} is complete (resume from it by its path) "
                                              f"and `latest` still names the one before") from e
        if total_limit:
            for old in sorted(root.glob("checkpoint-*"))[:-total_limit]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
