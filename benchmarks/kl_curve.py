"""How much a setting buys beyond moving along the reward-per-KL curve, from finished run folders.

    python benchmarks/kl_curve.py runs/*/              # every run folder under runs/
    python benchmarks/kl_curve.py --by-flags runs/*/   # and the mean residual of each setting (seeds pooled)

On the embedded default, changing a knob (beta, the learning rate, the rank, the clip range, ...) mostly moves
a run *along* one curve of reward-model positive share against KL: more KL, more reward. To say whether a
setting is better, compare it with the curve at its own KL, not with another run at another KL. This fits

    logit(rm_positive_frac) = a + b * log(kl_final)

by least squares over all the folders given (each run's summary.json: its after-training `rm_positive_frac`
and `kl_final`, the issue's KL), prints the curve at a few KLs, and each run's residual: its share minus the
curve's at its KL. A setting whose runs sit above the curve on every seed lifts it; one that moves runs along it
only trades reward for KL. The residuals' standard deviation is the noise one run carries (the evaluation's
512 prompts alone resolve a share to about +-0.013 at 0.9).

Runs whose KL is under 0.3 (nothing learned) are left out of the fit. A setting is what its config.json sets
away from train.py's defaults (as this machine resolves them), seed and run folder aside.
"""

import argparse
import json
import math
import os
import sys
from collections import defaultdict

import numpy as np

from minirlhf.options import TrainConfig

SKIP = ("seed", "out", "resume")
KLS = (2, 3, 4, 5, 5.5, 6, 7)  # where the curve is printed
DEFAULTS = TrainConfig().resolved()  # what config.json holds for a run with no flags


def load(folder: str) -> dict | None:
    """{name, setting, seed, kl, rm} of a finished run folder, or None if it has no summary.json."""
    summary = os.path.join(folder, "summary.json")
    if not os.path.isfile(summary):
        return None
    with open(summary) as f:
        s = json.load(f)
    with open(os.path.join(folder, "config.json")) as f:
        flags = json.load(f)
    setting = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in sorted(flags.items())
                       if k not in SKIP and DEFAULTS.get(k) != v) or "(the defaults)"
    return {"name": os.path.basename(os.path.normpath(folder)), "setting": setting, "seed": flags.get("seed"),
            "kl": s["kl_final"], "rm": s["after"]["rm_positive_frac"]}


def fit(runs: list[dict]) -> tuple[float, float, float]:
    """(a, b, residual std) of logit(rm) = a + b log(kl)."""
    kl = np.array([r["kl"] for r in runs])
    rm = np.clip(np.array([r["rm"] for r in runs]), 1e-3, 1 - 1e-3)
    X = np.stack([np.ones_like(kl), np.log(kl)], 1)
    (a, b), *_ = np.linalg.lstsq(X, np.log(rm / (1 - rm)), rcond=None)
    for r in runs:
        r["residual"] = r["rm"] - curve(a, b, r["kl"])
    return a, b, float(np.std([r["residual"] for r in runs]))


def curve(a: float, b: float, kl: float) -> float:
    return 1 / (1 + math.exp(-(a + b * math.log(kl))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+", help="finished run folders (train.py --out)")
    p.add_argument("--by-flags", action="store_true", help="also the mean residual of each setting")
    args = p.parse_args()
    runs = [r for r in map(load, args.folders) if r is not None and r["kl"] >= 0.3]
    if len(runs) < 3:
        print(f"kl_curve.py: {len(runs)} finished runs with KL >= 0.3 among the folders; the fit needs 3", file=sys.stderr)
        sys.exit(2)
    a, b, sd = fit(runs)
    print(f"{len(runs)} runs: logit(rm_positive_frac) = {a:.3f} + {b:.3f} log(kl_final); residual std {sd:.4f}\n")
    print("| kl_final | " + " | ".join(f"{k:g}" for k in KLS) + " |")
    print("|---|" + "---:|" * len(KLS))
    print("| curve's rm_positive_frac | " + " | ".join(f"{curve(a, b, k):.3f}" for k in KLS) + " |\n")
    print("| run | seed | kl_final | rm_positive_frac | residual |\n|---|---:|---:|---:|---:|")
    for r in sorted(runs, key=lambda r: -r["residual"]):
        print(f"| {r['name']} | {r['seed']} | {r['kl']:.2f} | {r['rm']:.3f} | {r['residual']:+.3f} |")
    if args.by_flags:
        groups = defaultdict(list)
        for r in runs:
            groups[r["setting"]].append(r["residual"])
        print("\n| mean residual | runs | setting (config.json's flags away from the defaults) |\n|---:|---:|---|")
        for setting, res in sorted(groups.items(), key=lambda kv: -sum(kv[1]) / len(kv[1])):
            print(f"| {sum(res) / len(res):+.3f} | {len(res)} | `{setting}` |")


if __name__ == "__main__":
    main()
