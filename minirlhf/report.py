"""What a run leaves behind for people: metrics.jsonl, reward.png, samples.md, summary.json.

Every file is written through atomic.py (a temporary name, then a rename), so a run killed mid-write
leaves the previous version, never half a file. metrics.jsonl is appended one line per step
(a line is either whole or, after a crash, cut; `read_metrics` drops a cut last line).
"""

import json
import os

from .atomic import atomic_file


def append_metrics(path: str, stats: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(stats) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a crash: everything after it is untrustworthy
    return rows


def plot_curve(metrics: list[dict], path: str, kl_target: float | None = None, algorithm: str = "ppo") -> None:
    """reward.png: reward mean (with +-std band, and the --eval-every points) and KL per step, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    mean = [m["env/reward_mean"] for m in metrics]
    std = [m["env/reward_std"] for m in metrics]
    kl = [m["objective/kl"] for m in metrics]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(steps, mean, color="tab:blue", label="reward (batch mean)")
    ax1.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                     color="tab:blue", alpha=0.15, label="+- std")
    points = [m for m in metrics if "eval/reward_mean" in m]  # --eval-every
    if points:
        ax1.plot([m["step"] for m in points], [m["eval/reward_mean"] for m in points], "o-", color="tab:green",
                 label="eval reward (held-out prompts)")
    ax1.set_xlabel(f"{algorithm.upper()} step"), ax1.set_ylabel("reward"), ax1.legend(loc="lower right"), ax1.grid(alpha=0.3)
    ax2.plot(steps, kl, color="tab:red", label="KL(policy || reference) per sequence")
    if kl_target:
        ax2.axhline(kl_target, color="gray", linestyle="--", label=f"KL target {kl_target:g}")
    ax2.set_xlabel(f"{algorithm.upper()} step"), ax2.set_ylabel("KL (nats)"), ax2.legend(loc="upper left"), ax2.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def samples_markdown(before: dict, after: dict, judges: list[str], algorithm: str = "ppo") -> str:
    """The before/after table on the fixed eval prompts, as in the trlX sentiment write-up."""
    head = "| prompt | before | " + " | ".join(f"{j} before" for j in judges) + " | after | " + \
           " | ".join(f"{j} after" for j in judges) + " |"
    rule = "|" + "---|" * (3 + 2 * len(judges))
    lines = [f"# Samples before and after {algorithm.upper()}", "", "Same prompts, same sampling seed, adapters off "
             "(before) and trained (after).", "", head, rule]
    for i, prompt in enumerate(before["prompts"]):
        b = [f"{before['scores'][j][i]:+.2f}" for j in judges]
        a = [f"{after['scores'][j][i]:+.2f}" for j in judges]
        lines.append(f"| {_cell(prompt)} | {_cell(before['responses'][i])} | " + " | ".join(b) +
                     f" | {_cell(after['responses'][i])} | " + " | ".join(a) + " |")
    return "\n".join(lines) + "\n"
