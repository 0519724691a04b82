"""python train.py [flags]: RLHF a GPT-NeoX with RLOO, GRPO or PPO, an int8 base and LoRA adapters.

Every flag is a field of minirlhf.options.TrainConfig; --help prints each field's documentation.
With no flags it runs the embedded default: a small GPT-NeoX trained on movie-review snippets,
taught by RLOO (--algorithm ppo|grpo for the others) to write positive reviews, scored by a reward model
trained on human ratings.

Data parallel: `torchrun --nproc_per_node=N train.py [flags]` runs N processes (GPUs: one each, NCCL;
CPU: gloo); --batch-size is the global batch, split evenly between them (minirlhf/distributed.py).
"""

import argparse
import os
import sys

from minirlhf import distributed
from minirlhf.cli import Parser, add_dataclass_flags, fail
from minirlhf.options import SECTIONS, TrainConfig
from minirlhf.rewards import RewardError
from minirlhf.train import run


def parse_args(argv=None) -> TrainConfig:
    parser = Parser(prog="train.py", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for _, section, title in SECTIONS:  # --help lists the flags by concern
        add_dataclass_flags(parser, section, title)
    return TrainConfig.from_flags(**vars(parser.parse_args(argv)))


def main(argv=None) -> int:
    cfg = parse_args(argv)  # a malformed flag exits 2 here, with one line
    try:
        summary = run(cfg)  # with --plan-memory: prints the plan, returns {"plan": ...}, loads nothing
    except (ValueError, OSError, RewardError, distributed.RankError) as e:  # flags, files, checkpoints, rewards
        if os.environ.get("MINIRLHF_DEBUG"):
            raise
        where = f"[rank {distributed.rank()}] " if distributed.world_size() > 1 else ""
        return fail("train.py", f"{where}{e}")
    except KeyboardInterrupt:
        print("train.py: interrupted; the run folder keeps its last complete checkpoint "
              "(continue with --resume RUN_FOLDER)", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()
    if "before" not in summary:  # a memory plan, or not rank 0: nothing to report
        return 0
    before, after = summary["before"], summary["after"]
    print(f"\nrun folder: {summary['out']}")
    print("| metric | before | after |\n|---|---|---|")
    for key in before:
        print(f"| {key} | {before[key]:.3f} | {after[key]:.3f} |")
    print(f"KL per sequence (last 5 steps): {summary['kl_final']:.2f} (target {summary['kl_target']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
