"""Best-of-n from the embedded default: how much reward, and how much VADER agreement, a policy could buy.

    python benchmarks/best_of_n.py                            # train.py's lengths (4-16 tokens), n = 1 ... 16
    python benchmarks/best_of_n.py --tokens 24 --min-tokens 8

For each of the shipped eval prompts, sample n responses from the base model (int8, adapters off: the
PPO reference) and keep the one the reward model rates highest. Best-of-n is a policy whose KL to the
base is at most log(n) - (n - 1) / n (Beirami et al. 2024, arXiv 2401.01879), so the table says what
reward is on offer at a given KL, and whether VADER, the independent judge of `python train.py`, agrees
with the reward model's choices on this model's text. PPO's default run can be read against it.
"""

import argparse
import math

import torch

from minirlhf.checkpoint import load_model
from minirlhf.rewards import reward_model_fn, vader_reward
from minirlhf.options import SamplingConfig
from minirlhf.tokenizer import load_tokenizer
from minirlhf.train import TrainConfig, default_path, read_prompts
from minirlhf.trainer import PPOTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=SamplingConfig.max_new_tokens,
                        help="response length (train.py's eval uses --max-new-tokens)")
    parser.add_argument("--min-tokens", type=int, default=SamplingConfig.min_new_tokens,
                        help="no end-of-text before this many tokens")
    parser.add_argument("--n", type=int, default=16, help="largest n")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    cfg = TrainConfig.from_flags(max_new_tokens=args.tokens, min_new_tokens=args.min_tokens)
    lm = default_path("lm")
    trainer = PPOTrainer.for_config(load_model(lm, int8=True), load_tokenizer(lm), None, cfg)
    rm = reward_model_fn(default_path("rm"), include_prompt=False)  # as train.py's default reward
    vader = vader_reward(include_prompt=False)  # as train.py's judge
    prompts = read_prompts(default_path("eval_prompts.txt"), "eval prompts")
    gen = torch.Generator().manual_seed(args.seed)
    rewards, judged = [], []  # each [n, prompts]
    for _ in range(args.n):
        responses = trainer.sample(prompts, args.tokens, gen).responses
        rewards.append(rm(prompts, responses))
        judged.append(torch.as_tensor(vader(prompts, responses), dtype=torch.float32))
    rewards, judged = torch.stack(rewards), torch.stack(judged)

    print(f"{len(prompts)} eval prompts, {args.tokens}-token responses (min {args.min_tokens}), seed {args.seed}\n")
    print("| n | KL bound | reward mean | rm_positive_frac | vader_positive_frac |\n|---:|---:|---:|---:|---:|")
    n = 1
    while n <= args.n:
        best = rewards[:n].argmax(0, keepdim=True)  # [1, prompts]
        r, v = rewards[:n].gather(0, best)[0], judged[:n].gather(0, best)[0]
        kl = math.log(n) - (n - 1) / n
        print(f"| {n} | {kl:.2f} | {r.mean():+.2f} | {(r > 0).float().mean():.3f} | {(v > 0).float().mean():.3f} |")
        n *= 2


if __name__ == "__main__":
    main()
