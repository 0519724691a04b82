"""--log-with none|tensorboard|wandb: every scalar of metrics.jsonl, per step, to an experiment tracker.

    tracker = open_tracker("tensorboard", run_folder, config)    # rank 0 only
    tracker.log(stats, step)     every number of the step's metrics.jsonl line, under the same (trl's) names:
                                 env/reward_mean, objective/kl, ppo/policy/approxkl, ...
    tracker.text(tag, markdown, step)    the before/after samples table (samples.md)
    tracker.close()

metrics.jsonl, reward.png and samples.md are written as before; a tracker is a second view of the same numbers,
which is why it logs exactly the dict that goes into metrics.jsonl. TensorBoard goes through
torch.utils.tensorboard (needs the `tensorboard` package: pip install 'minirlhf[tensorboard]'), into
RUN_FOLDER/tensorboard/; its event files are append-only logs like metrics.jsonl (atomic.py). W&B runs in
offline mode only (nothing leaves the machine; `wandb sync RUN_FOLDER/wandb/offline-run-*` uploads later), into
RUN_FOLDER/wandb/. Neither package is imported unless asked for, and a missing one is refused before the run
starts (options.py).
"""

import importlib.util
import os

TRACKERS = ("none", "tensorboard", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --log-with -> the package it needs


def missing_package(kind: str) -> str | None:
    """The package --log-with `kind` needs and this environment lacks, or None."""
    package = PACKAGES.get(kind)
    return package if package and importlib.util.find_spec(package) is None else None


def scalars(stats: dict) -> dict:
    """The numbers of a metrics.jsonl line, without its step."""
    return {k: v for k, v in stats.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class NoTracker:
    def log(self, stats: dict, step: int) -> None:
        pass

    def text(self, tag: str, markdown: str, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(NoTracker):
    def __init__(self, folder: str, first_step: int = 1):
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run logs again from the checkpoint's step + 1: purge_step hides what an earlier process
        # logged from there on (it may have run past its last checkpoint), as metrics.jsonl drops those lines.
        self.writer = SummaryWriter(log_dir=folder, purge_step=first_step if first_step > 1 else None)

    def log(self, stats: dict, step: int) -> None:
        for name, value in scalars(stats).items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # a step is on disk when metrics.jsonl's line is

    def text(self, tag: str, markdown: str, step: int) -> None:
        self.writer.add_text(tag, markdown, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker(NoTracker):
    def __init__(self, run_folder: str, config: dict):
        import wandb

        os.makedirs(run_folder, exist_ok=True)
        self.wandb = wandb
        # W&B writes into dir/wandb/: RUN_FOLDER/wandb/offline-run-<time>-<id>/ (its run-<id>.wandb log and files/)
        self.run = wandb.init(mode="offline", dir=run_folder, config=config, project="minirlhf")

    def log(self, stats: dict, step: int) -> None:
        self.run.log(scalars(stats), step=step)

    def text(self, tag: str, markdown: str, step: int) -> None:
        self.run.log({tag: self.wandb.Html(f"<pre>{_escape(markdown)}</pre>")}, step=step)

    def close(self) -> None:
        self.run.finish()


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def open_tracker(kind: str, out: str, config: dict, first_step: int = 1):
    """The tracker --log-with names, writing under the run folder; first_step: the first step this process logs
    (a resumed run's checkpoint step + 1). A W&B offline run is a new run per process (`wandb sync` uploads each)."""
    if kind == "tensorboard":
        return TensorBoardTracker(os.path.join(out, "tensorboard"), first_step)
    if kind == "wandb":
        return WandbTracker(out, config)
    return NoTracker()
