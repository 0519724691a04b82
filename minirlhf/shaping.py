"""Reward shaping for PPO, with trl 0.11.4 PPOConfig's names and semantics.

A reward model's scale is arbitrary, and PPO's per-token reward adds it to -beta * KL: a reward model whose
scores are ten times larger gets, in effect, a ten times smaller KL penalty. These options rescale the score
before it meets the KL (trl's PPOTrainer.step, in this order), and one rescales the whole per-token reward:

    --use-score-scaling   s <- s / (running std + eps)           running over every batch so far
    --use-score-norm      s <- (s - running mean) / (running std + eps)    (only with --use-score-scaling)
    --score-clip c        s <- clip(s, -c, c)                    after the scaling
    --whiten-rewards      rewards [B, N] <- masked_whiten(rewards, shift_mean=False) before GAE (ppo.py)

eps is float32's machine epsilon. The running moments are trl's RunningMoments (from MOSS-RLHF): a batch's
mean and biased variance merged into the running ones with Chan et al.'s parallel update,

    delta = mean_b - mean;   n' = n + n_b
    var'  = (var * n + delta^2 * n * n_b / n' + var_b * n_b) / n'
    mean' = mean + delta * n_b / n';   std' = sqrt(var' * n' / (n' - 1))

starting from mean 0, var 1, std 1, n = 1e-24; the batch statistics are taken *before* scaling it, so a
step's own scores count. The state (mean, std, var, count) is four floats, saved in checkpoints
(resume.py) so a resumed run scales exactly as one that never stopped. Under torchrun the moments are
updated with the gathered scores of the whole batch (trainer.py), so every rank holds the same state and
1 process equals 2.

(trl 0.11.4 itself crashes on use_score_scaling: it calls `.to()` on the running std, a Python float after
the first update. tests/test_reward_shaping.py drives trl's RunningMoments and applies its formulas.)

rloo and grpo refuse these flags (options.py): trl's RLOOTrainer has none of them, and GRPO normalizes each
prompt's scores by its group already.
"""

import torch

from .options import ShapingConfig


class RunningMoments:
    """trl's RunningMoments: the running mean and std of every score seen, updated per batch. The arithmetic
    is trl's, step for step (float32 batch statistics, Python floats kept), so the numbers are its own."""

    def __init__(self):
        self.mean, self.std, self.var, self.count = 0.0, 1.0, 1.0, 1e-24

    @torch.no_grad()
    def update(self, xs: torch.Tensor) -> None:
        xs_count = xs.numel()
        xs_var, xs_mean = torch.var_mean(xs, correction=0)
        xs_mean, xs_var = xs_mean.float(), xs_var.float()
        delta = xs_mean - self.mean
        tot_count = self.count + xs_count
        new_sum = xs_var * xs_count
        old_sum = self.var * self.count + delta**2 * self.count * xs_count / tot_count  # the old sum, moved
        tot_sum = old_sum + new_sum
        self.mean += (delta * xs_count / tot_count).item()
        new_var = tot_sum / tot_count
        self.std = (new_var * tot_count / (tot_count - 1)).float().sqrt().item()
        self.var = new_var.item()
        self.count = tot_count

    def state_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.std, self.var, self.count = (float(state[k]) for k in ("mean", "std", "var", "count"))


def shape_scores(scores: torch.Tensor, shaping: ShapingConfig, running: RunningMoments) -> torch.Tensor:
    """scores [B] of the whole batch -> the scores PPO's reward adds to the KL penalty (updates `running`)."""
    if shaping.use_score_scaling:
        running.update(scores)
        factor = torch.tensor(running.std, dtype=scores.dtype, device=scores.device) + torch.finfo(scores.dtype).eps
        if shaping.use_score_norm:
            scores = (scores - torch.tensor(running.mean, dtype=scores.dtype, device=scores.device)) / factor
        else:
            scores = scores / factor
    if shaping.score_clip > 0:
        scores = torch.clip(scores.float(), -shaping.score_clip, shaping.score_clip).to(dtype=scores.dtype)
    return scores
