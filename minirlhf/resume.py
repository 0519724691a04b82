"""Checkpoints that resume a run exactly, or refuse to: the trainer's whole state plus the run's resolved config.

    runs/<name>/checkpoints/step-000050/
        adapter/                  LoRA A, B in PEFT's format
        value_head.safetensors    (PPO only)
        state.safetensors         AdamW moments, RNG states (trainer generator, length sampler, torch CPU,
                                  and CUDA when the run is on a GPU): tensors, never pickle
        trainer_state.json        step, KL controller, AdamW's scalars and param groups, the learning-rate
                                  schedule's state (--lr-schedule), the running score moments
                                  (--use-score-scaling, shaping.py), and `config`: every flag of the run,
                                  with --device and --dtype resolved ("auto" -> what it chose)

A resumed run must give the numbers the run would have given had it never stopped. Two things make that true:
every source of randomness is saved and restored, and the flags are the run's own. So `--resume` compares the
command's resolved flags with the checkpoint's config and refuses with one line per flag that differs
(`--lr 0.1 differs from the run's 0.0005`), except the few that cannot change the numbers
(options.TrainConfig.resume_may_differ: --steps upward unless a schedule spans them, --save-every, the memory
knobs).

The folder is written through atomic_folder: a crash or Ctrl-C never leaves half a checkpoint.
"""

import json
import os

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_file, atomic_folder
from .cli import UsageError, flag
from .lora import load_adapter, save_adapter

STATE_FILE, TENSORS_FILE, VALUE_HEAD_FILE = "trainer_state.json", "state.safetensors", "value_head.safetensors"


def latest_checkpoint(run_dir: str) -> str | None:
    """runs/<name>/checkpoints/step-N with the largest N, or None."""
    folder = os.path.join(run_dir, "checkpoints")
    steps = [int(n.split("-")[1]) for n in os.listdir(folder) if n.startswith("step-")] if os.path.isdir(folder) else []
    return os.path.join(folder, f"step-{max(steps):06d}") if steps else None


def read_config(checkpoint: str) -> dict:
    """The resolved config a checkpoint was written with."""
    path = os.path.join(checkpoint, STATE_FILE)
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: unreadable checkpoint ({e})") from None
    if "config" not in state:
        raise UsageError(f"{path}: written by an older minirlhf without the run's config; cannot check the flags")
    return state["config"]


def check_flags(saved: dict, current: dict, may_differ: tuple[str, ...], where: str) -> None:
    """Refuse a resume whose flags would change the run: one line per differing flag."""
    lines = []
    for name, value in current.items():
        if name in may_differ:
            continue
        if name not in saved:
            lines.append(f"{flag(name)} is not in the run's config (written by another minirlhf version)")
        elif saved[name] != value:
            lines.append(f"{flag(name)} {value!r} differs from the run's {saved[name]!r}")
    if current["steps"] < saved["steps"]:
        lines.append(f"--steps {current['steps']} is below the run's {saved['steps']} (it may only grow)")
    if lines:
        raise UsageError(f"--resume {where}: " + "; ".join(lines))


def save_checkpoint(folder: str, trainer, config: dict) -> None:
    """Adapter + value head + optimizer + KL controller + RNG states + step + the run's resolved config."""
    with atomic_folder(folder) as tmp:
        save_adapter(trainer.model, os.path.join(tmp, "adapter"), base_model_name_or_path=config.get("model"))
        if trainer.value_head is not None:
            save_value_head(trainer.value_head, os.path.join(tmp, VALUE_HEAD_FILE))
        tensors, opt_meta = flatten_optimizer(trainer.optimizer.state_dict())
        tensors.update(rng_states(trainer))
        save_file(tensors, os.path.join(tmp, TENSORS_FILE))
        state = {"step": trainer.step_count, "kl_ctl": trainer.kl_ctl.state_dict(), "optimizer": opt_meta,
                 "running_moments": trainer.running.state_dict(), "config": config}
        if trainer.scheduler is not None:  # floats and ints only: JSON
            state["lr_scheduler"] = trainer.scheduler.state_dict()
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump(state, f, indent=2)


def load_checkpoint(folder: str, trainer) -> dict:
    """Restore everything save_checkpoint wrote into `trainer` (built with the same config); the state dict."""
    with open(os.path.join(folder, STATE_FILE)) as f:
        state = json.load(f)
    load_adapter(trainer.model, os.path.join(folder, "adapter"))
    if trainer.value_head is not None:
        trainer.value_head.load_state_dict(load_file(os.path.join(folder, VALUE_HEAD_FILE),
                                                     device=str(trainer.device)))
    tensors = load_file(os.path.join(folder, TENSORS_FILE))
    trainer.optimizer.load_state_dict(unflatten_optimizer(tensors, state["optimizer"]))
    restore_rng_states(trainer, tensors)
    trainer.kl_ctl.load_state_dict(state["kl_ctl"])
    trainer.running.load_state_dict(state["running_moments"])
    if trainer.scheduler is not None:
        trainer.scheduler.load_state_dict(state["lr_scheduler"])
    trainer.step_count = state["step"]
    return state


def save_value_head(value_head, path: str) -> None:
    with atomic_file(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in value_head.state_dict().items()}, tmp)


def rng_states(trainer) -> dict[str, torch.Tensor]:
    """Every random stream a step draws from, as uint8 state tensors. The trainer's own generator drives prompts,
    sampling and minibatch order; the length sampler draws response lengths; torch's global RNG drives dropout
    (on CPU) and, on a GPU, the CUDA RNG of that device does."""
    states = {"rng.trainer": trainer.gen.get_state(), "rng.lengths": trainer.lengths.generator.get_state(),
              "rng.torch": torch.get_rng_state()}
    if torch.device(trainer.device).type == "cuda":
        states["rng.cuda"] = torch.cuda.get_rng_state(trainer.device)
    return states


def restore_rng_states(trainer, tensors: dict[str, torch.Tensor]) -> None:
    trainer.gen.set_state(tensors["rng.trainer"])
    trainer.lengths.generator.set_state(tensors["rng.lengths"])
    torch.set_rng_state(tensors["rng.torch"])
    if torch.device(trainer.device).type == "cuda":
        if "rng.cuda" not in tensors:
            raise UsageError("the checkpoint was written on a CPU and has no CUDA RNG state to resume on a GPU")
        torch.cuda.set_rng_state(tensors["rng.cuda"], trainer.device)


def flatten_optimizer(sd: dict) -> tuple[dict, dict]:
    """An optimizer state_dict -> (tensors for safetensors, the rest as JSON). No pickle."""
    tensors, scalars = {}, {}
    for idx, slots in sd["state"].items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}
