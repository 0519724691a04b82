"""Reward against KL on the embedded default: PPO, RLOO, GRPO and best-of-n, on the same 512 eval prompts.

    python benchmarks/frontier.py                                   # train all three (seed 0), then measure and draw
    python benchmarks/frontier.py --seeds 0 1 2 --out /tmp/frontier # three seeds each
    python benchmarks/frontier.py --runs /tmp/r16/ppo_s0 /tmp/r16/rloo_s0 ...   # measure finished run folders

Every point is measured the same way, on train.py's 512 eval prompts with train.py's evaluation seed (one
16-token response each): the share the reward model rates positive (`rm_positive_frac`), the share VADER
rates positive (`vader_positive_frac`), and the KL of those very responses to the reference (the base, adapters
off), sum_t log pi(a_t) - log pi_ref(a_t) per response, averaged: an unbiased estimate of KL(pi || pi_ref) per
sequence. A trained run is loaded from its folder (config.json, adapter/); its shares equal its summary.json's
"after" (checked). Best-of-n samples n responses per prompt from the base and keeps the one the reward model
rates highest; its KL is the bound log n - (n - 1) / n (Beirami et al. 2024), as in benchmarks/best_of_n.py.
Writes the table to stdout and the two panels to --png (docs/frontier.png for the README).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

from minirlhf.lora import load_adapter
from minirlhf.options import TrainConfig
from minirlhf.train import build, eval_seed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# train.py's flags for each algorithm's row: rloo is the default; ppo runs its own recipe (the default before)
ALGORITHMS = {"ppo": ["--algorithm", "ppo", "--init-kl-coef", "0.15", "--lr-schedule", "constant"],
              "rloo": ["--algorithm", "rloo"], "grpo": ["--algorithm", "grpo"]}
COLORS = {"ppo": "tab:blue", "rloo": "tab:orange", "grpo": "tab:green", "best-of-n": "tab:gray"}


@torch.no_grad()
def measure(trainer, prompts, judges, seed: int, n: int = 1) -> dict:
    """Sample n responses per prompt (the evaluation's seed, so n = 1 is train.py's after-eval), score them.
    Returns the shares of the response the reward model rates highest, and the mean KL per sequence of
    the first sample (n = 1: the policy's own responses)."""
    gen = torch.Generator(device=trainer.device).manual_seed(seed)
    best_r, best_v, kl = None, None, None
    for i in range(n):
        s = trainer.sample(prompts, trainer.sampling.max_new_tokens, gen)
        r = torch.as_tensor(judges["reward"](prompts, s.responses), dtype=torch.float32)
        v = torch.as_tensor(judges["vader"](prompts, s.responses), dtype=torch.float32)
        if i == 0:
            P, N = s.ids.shape[1], s.tokens.shape[1]
            seq, mask = torch.cat([s.ids, s.tokens], 1), torch.cat([s.mask, s.response_mask], 1)
            policy, reference = trainer.score_pass(seq, mask, P, N)
            kl = ((policy.logprobs - reference.logprobs) * s.response_mask).sum(1).mean().item()
            best_r, best_v = r, v
        else:
            better = r > best_r
            best_r, best_v = torch.where(better, r, best_r), torch.where(better, v, best_v)
    return {"rm_positive_frac": (best_r > 0).float().mean().item(), "vader_positive_frac": (best_v > 0).float().mean().item(),
            "kl": kl}


def measure_run(folder: str) -> dict:
    """A finished run folder: its trained policy on the eval prompts."""
    with open(os.path.join(folder, "config.json")) as f:
        flags = json.load(f)
    cfg = TrainConfig.from_flags(**{k: v for k, v in flags.items() if k not in ("out", "resume")})
    job = build(cfg, folder, None)
    load_adapter(job.trainer.model, os.path.join(folder, "adapter"))
    point = measure(job.trainer, job.eval_prompts, job.judges, eval_seed(cfg))
    with open(os.path.join(folder, "summary.json")) as f:
        after = json.load(f)["after"]
    for key in ("rm_positive_frac", "vader_positive_frac"):  # the same responses as the run's own after-eval
        if abs(point[key] - after[key]) > 1e-9:
            raise SystemExit(f"{folder}: {key} {point[key]} differs from summary.json's {after[key]}")
    return {"name": flags.get("algorithm", "ppo"), "seed": flags["seed"], "folder": folder, **point}


def best_of_n(ns, seed: int) -> list[dict]:
    """Best-of-n from the base (adapters off: the runs' reference) on the same prompts and evaluation seed."""
    cfg = TrainConfig.from_flags(out="")
    job = build(cfg, "", None)
    points = []
    for n in ns:
        p = measure(job.trainer, job.eval_prompts, job.judges, eval_seed(cfg) if seed is None else seed, n)
        points.append({"name": "best-of-n", "seed": 0, "n": n, **p, "kl": math.log(n) - (n - 1) / n})
    return points


def train(name: str, seed: int, out: str) -> str:
    folder = os.path.join(out, f"{name}_s{seed}")
    if not os.path.isfile(os.path.join(folder, "summary.json")):
        command = [sys.executable, os.path.join(ROOT, "train.py"), *ALGORITHMS[name], "--seed", str(seed),
                   "--out", folder]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return folder


def draw(points: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    for ax, key, label in ((axes[0], "rm_positive_frac", "reward model: share positive"),
                           (axes[1], "vader_positive_frac", "VADER: share positive")):
        for name, color in COLORS.items():
            mine = sorted((p for p in points if p["name"] == name), key=lambda p: p["kl"])
            if not mine:
                continue
            style = "o--" if name == "best-of-n" else "o"
            ax.plot([p["kl"] for p in mine], [p[key] for p in mine], style, color=color, label=name)
            if name == "best-of-n":
                for p in mine:
                    ax.annotate(f"n={p['n']}", (p["kl"], p[key]), fontsize=7, xytext=(3, -9), textcoords="offset points")
        ax.set_xlabel("KL(policy || reference) per response, nats (best-of-n: the bound)")
        ax.set_ylabel(label), ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    fig.suptitle("512 held-out eval prompts, one 16-token response each (train.py's evaluation)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="*", default=None, help="finished run folders to measure (no training)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0], help="seeds to train, without --runs")
    parser.add_argument("--out", default="runs/frontier", help="where the trained run folders go, without --runs")
    parser.add_argument("--n", nargs="*", type=int, default=[1, 2, 4, 8, 16], help="best-of-n's n")
    parser.add_argument("--png", default=os.path.join(ROOT, "docs", "frontier.png"))
    args = parser.parse_args()

    start = time.time()
    folders = args.runs if args.runs is not None else [train(a, s, args.out) for s in args.seeds for a in ALGORITHMS]
    points = [measure_run(f) for f in folders] + (best_of_n(args.n, None) if args.n else [])
    print("\n| policy | seed | KL per response | rm_positive_frac | vader_positive_frac |\n|---|---:|---:|---:|---:|")
    for p in points:
        name = f"best-of-{p['n']}" if p["name"] == "best-of-n" else p["name"]
        print(f"| {name} | {p['seed']} | {p['kl']:.2f} | {p['rm_positive_frac']:.3f} | {p['vader_positive_frac']:.3f} |")
    draw(points, args.png)
    print(f"\n{args.png} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
