"""RLOO and GRPO: policy gradients whose baseline is the other samples of the same prompt, not a critic.

PPO (ppo.py) learns a value head V(s_t) to tell a good token from a lucky one. On a small model the critic
can explain next to nothing of the reward (the README's notes on the embedded default), and it costs a head
to train and hold. Group baselines drop it: sample K responses to each prompt and compare each response with
its siblings. Both algorithms here share everything else with PPO (trainer.py): the sampling, the reward, the
reference = the same model with its adapters off, the epochs over shuffled minibatches, the clipped ratio.

Shapes: the batch holds B = n * K rows, the K samples of each of n prompts side by side (rows j*K .. j*K+K-1
are prompt j's), N response columns, `mask [B, N]` 1 on response tokens. `view(n, K)` puts a prompt's group
on one row.

RLOO (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
Feedback in LLMs", https://arxiv.org/abs/2402.14740; Kool et al. 2019 for the leave-one-out baseline), as
trl 0.11.4's RLOOTrainer computes it:

    R_i   = score_i - beta * sum_t kl_{i,t}                  one reward per sequence, kl_t = log pi - log pi_ref
    A_i   = R_i - 1/(K-1) * sum_{j != i} R_j                 the mean of the other K - 1 rewards of the prompt
    r_i   = exp(sum_t log pi_new(a_t) - sum_t log pi_old(a_t))     ONE ratio per sequence (the whole response
                                                                   is one action)
    loss  = mean_i max(-A_i r_i, -A_i clip(r_i, 1 - eps, 1 + eps))  over the minibatch's sequences

The whole response is the action: no per-token credit assignment, no discount, no whitening (trl's RLOOConfig
has a whiten_rewards field that its trainer never reads). trl lays the batch out as [K, n] (its queries are
`repeat(K, 1)`); ours is [n, K]; the numbers are the same (tests/test_rloo_grpo.py). trl fills padding
log-probs with 1.0 before summing, so they cancel in the ratio; we sum under the mask.

GRPO (Shao et al. 2024, "DeepSeekMath", https://arxiv.org/abs/2402.03300, section 4.1, outcome supervision):

    A_i   = (score_i - mean_j score_j) / (std_j score_j + eps)     the same for every token of response i
    r_it  = pi_new(a_t) / pi_old(a_t)                               per token
    D_it  = pi_ref / pi_new - log(pi_ref / pi_new) - 1              the k3 estimator of KL(pi_new || pi_ref):
                                                                    unbiased, never negative
    loss  = -mean_i 1/|o_i| sum_t [min(r_it A_i, clip(r_it, 1 - eps, 1 + eps) A_i) - beta D_it]

The KL is in the loss, with its gradient, not in the reward: the advantages come from the scores alone. std
is the unbiased sample std of the group and eps = 1e-4 (trl's later GRPOTrainer makes the same choices; the
paper names neither). Each response weighs the same whatever its length (the 1/|o_i|), unlike PPO's and
trl's token-weighted means.

Two choices of that formula are flags, under the names and with the meanings of trl's later GRPOConfig:

    --scale-rewards group   A_i = (score_i - mean) / (std + eps)     the paper
                    batch   A_i = (score_i - mean) / (std of all B scores + eps)
                    none    A_i = score_i - mean                      Dr. GRPO (Liu et al. 2025, "Understanding
                                                                      R1-Zero-Like Training", arXiv 2503.20783)
    --loss-type grpo        1/m sum_i 1/|o_i| sum_t l_it              the paper (above)
                bnpo        sum_i sum_t l_it / sum_i |o_i|            every token of the minibatch weighs the same
                dr_grpo     1/m sum_i 1/L sum_t l_it, L = --max-new-tokens       Dr. GRPO

Why Dr. GRPO drops the std: a prompt whose K samples score 2.30, 2.31, 2.33, 2.35 (all already positive) gets
advantages of +-1 like a prompt whose samples span -2 .. +2, so the policy keeps being pushed on differences the
reward barely sees. Unscaled, such a group's advantages are ~0.02 and it stops pulling once its samples agree.
And 1/|o_i| gives each token of a short response more weight than a token of a long one (a length bias);
dividing by the constant L instead does not.

Data parallel (distributed.py): the advantages are computed after Batch.gather, on the whole batch on every
rank, so a prompt's K samples may sit on different ranks: the numbers are the single-process ones for any
number of processes. The losses are means over the minibatch's rows, computed on every rank from the
gathered log-probs, so each rank's backward is its share of the one loss, as for PPO.
"""

import torch

from .ppo import masked_mean

GRPO_EPS = 1e-4  # added to the group's std: a group of equal scores gets advantages 0, not 0 / 0


def groups(x: torch.Tensor, K: int) -> torch.Tensor:
    """[B] -> [B / K, K]: each prompt's K samples (adjacent rows) on one row."""
    if x.shape[0] % K:
        raise ValueError(f"{x.shape[0]} rows do not split into groups of {K}")
    return x.view(-1, K)


# ----------------------------------------------------------------------------------------------------
# RLOO
# ----------------------------------------------------------------------------------------------------


def rloo_advantages(scores: torch.Tensor, non_score_reward: torch.Tensor, mask: torch.Tensor,
                    K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rlhf_reward [B], advantages [B]). scores [B]; non_score_reward [B, N] = -beta * kl per token (ppo.py's
    compute_rewards), summed over each response's tokens (mask [B, N]); K >= 2 samples per prompt."""
    rlhf_reward = scores + (non_score_reward * mask).sum(1)  # R_i = score_i - beta * sum_t kl_t
    R = groups(rlhf_reward, K)  # [n, K]
    baseline = (R.sum(1, keepdim=True) - R) / (K - 1)  # the mean of the other K - 1
    return rlhf_reward, (R - baseline).flatten()


def rloo_loss(old_logprobs, logprobs, mask, advantages, cliprange: float) -> tuple[torch.Tensor, dict]:
    """RLOO's clipped loss for one minibatch of m sequences: old_logprobs, logprobs (with gradients), mask
    [m, N]; advantages [m]. Returns (loss, stats under trl's names: per-sequence ratio statistics)."""
    diff = (logprobs * mask).sum(1) - (old_logprobs * mask).sum(1)  # [m] log r_i of the whole sequence
    ratio = torch.exp(diff)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = torch.max(pg_losses, pg_losses2).mean()
    stats = {"loss/policy": loss.detach(),
             "policy/approxkl": (0.5 * diff**2).mean().detach(),
             "policy/clipfrac": (pg_losses2 > pg_losses).float().mean().detach(),
             "policy/ratio": ratio.mean().detach(),
             "policy/advantages_mean": advantages.mean().detach()}
    return loss, stats


# ----------------------------------------------------------------------------------------------------
# GRPO
# ----------------------------------------------------------------------------------------------------


def grpo_advantages(scores: torch.Tensor, K: int, eps: float = GRPO_EPS, scale: str = "group") -> torch.Tensor:
    """scores [B] -> advantages [B]: each score's distance to its prompt's group mean, divided as --scale-rewards
    says (reward_scale)."""
    g = groups(scores, K)  # [n, K]
    return (g - g.mean(1, keepdim=True)).flatten() / reward_scale(scores, K, eps, scale)


def reward_scale(scores: torch.Tensor, K: int, eps: float, scale: str) -> torch.Tensor:
    """[B]: what divides each response's advantage: its group's std + eps ("group"), the std of all B scores + eps
    ("batch"), or 1 ("none")."""
    if scale == "group":
        return (groups(scores, K).std(1, keepdim=True) + eps).expand(-1, K).flatten()
    if scale == "batch":
        return (scores.std() + eps).expand(scores.shape[0])
    if scale == "none":
        return torch.ones_like(scores)
    raise ValueError(f"unknown GRPO reward scale {scale!r}: expected 'group', 'batch' or 'none'")


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_length: int) -> torch.Tensor:
    """per_token [m, N] losses -> one number, as --loss-type says (the table in the module summary)."""
    summed = (per_token * mask).sum(1)  # [m] each response's token losses
    if loss_type == "grpo":
        return (summed / mask.sum(1)).mean()
    if loss_type == "bnpo":
        return summed.sum() / mask.sum()
    if loss_type == "dr_grpo":
        return summed.mean() / max_length
    raise ValueError(f"unknown GRPO loss type {loss_type!r}: expected 'grpo', 'bnpo' or 'dr_grpo'")


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) at the sampled tokens: exp(d) - d - 1 with d = log pi_ref - log pi.
    >= 0 for every sample, and its expectation over pi is the exact KL (Schulman 2020, "Approximating KL")."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def grpo_loss(old_logprobs, logprobs, ref_logprobs, mask, advantages, cliprange: float,
              beta: float, loss_type: str = "grpo", max_length: int = 0) -> tuple[torch.Tensor, dict]:
    """GRPO's loss for one minibatch of m sequences: old_logprobs, logprobs (with gradients), ref_logprobs,
    mask [m, N]; advantages [m]; beta the KL coefficient. Per token clipped ratio minus beta * k3, averaged as
    loss_type says (max_length: dr_grpo's constant L). Returns (loss, stats)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    A = advantages[:, None]  # [m, 1]: the same for every token of a response
    surrogate = torch.min(ratio * A, torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange) * A)
    kl = k3_kl(logprobs, ref_logprobs)
    per_token = -(surrogate - beta * kl)  # [m, N]
    loss = aggregate(per_token, mask, loss_type, max_length)
    stats = {"loss/policy": loss.detach(),
             "policy/kl_ref": masked_mean(kl, mask).detach(),
             "policy/approxkl": (0.5 * masked_mean(log_ratio**2, mask)).detach(),
             "policy/clipfrac": masked_mean((ratio * A > torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange) * A)
                                            .float(), mask).detach(),
             "policy/ratio": masked_mean(ratio, mask).detach(),
             "policy/advantages_mean": advantages.mean().detach()}
    return loss, stats
