"""PPO for language models: the math, as plain tensor functions.

This module is the arithmetic of RLHF's PPO (Ziegler et al. 2019, "Fine-Tuning Language Models from
Human Preferences", https://arxiv.org/abs/1909.08593; PPO itself: Schulman et al. 2017,
https://arxiv.org/abs/1707.06347; GAE: Schulman et al. 2015, https://arxiv.org/abs/1506.02438), written
to reproduce the classic `trl.PPOTrainer` of trl 0.11.4 number for number. The training loop that calls
these functions lives elsewhere; everything here is a function of tensors (plus two tiny stateful helpers,
the KL controllers and the length sampler, because their state must be checkpointed).

The game
--------
A prompt (the "query") is fed to the policy, which samples a response token by token. A reward function
scores the whole text once: one scalar per sample, `scores [B]`. Treat each generated token as an action:

    state s_t  = query + response[:t]           action a_t = response[t]
    pi(a_t|s_t) = the policy's next-token probability

Shapes. Every per-token tensor is `[B, T]`: B samples, T token positions. Following trl, position t holds
the quantities *for the token at t+1 of the concatenated `query + response` sequence*: the logits of
position t predict token t+1, `logprobs[:, t] = log pi(ids[:, t+1] | ids[:, :t+1])` and
`values[:, t] = V(ids[:, :t+1])`, the value of the state from which token t+1 is sampled. `mask [B, T]`
is 1 exactly on the positions that predict a *response* token and 0 on query positions and on padding.
(A loop that only keeps the response positions, `[B, T_response]` with right padding, gets identical
per-token results: the math below never looks across masked positions in a way that matters.)

1. The KL-shaped reward
-----------------------
Optimising the score alone lets the policy drift into gibberish that fools the reward function. So each
token pays a price for moving away from the reference policy pi_ref (the model before RL):

    kl_t      = log pi(a_t|s_t) - log pi_ref(a_t|s_t)            (an estimate of KL(pi || pi_ref) at t)
    reward_t  = -beta * kl_t            + (score  if t is the last response token else 0)

`compute_rewards` builds this `[B, T]` reward. beta (`kl_coef`) is adapted by `AdaptiveKLController` so
that the per-sequence KL tracks a target (Ziegler et al. section 2.2). With LoRA the reference model is
*the same network with the adapters switched off*: the base weights are frozen, so "adapters off" is
exactly the model before RL, and no second copy of the weights is needed. The loop does that switching.

2. Advantages with GAE
----------------------
A value head predicts V(s_t), the expected future reward. The advantage says how much better the sampled
token was than expected. GAE blends n-step estimates with a decay lam:

    delta_t = reward_t + gamma * V(s_{t+1}) - V(s_t)           (V after the last token is 0: episode over)
    A_t     = delta_t + gamma * lam * A_{t+1}                  (computed backwards over t)
    R_t     = A_t + V(s_t)                                     (the target the value head regresses to)

`compute_advantages` also whitens A over the masked tokens (zero mean, unit variance), as trl does.

3. The clipped PPO objectives
-----------------------------
Each batch of rollouts is reused for several epochs of minibatch updates. The policy update is kept close
to the policy that sampled the data by clipping the probability ratio r_t = pi_new(a_t|s_t) / pi_old(a_t|s_t):

    pg_loss = mean_t max(-A_t * r_t, -A_t * clip(r_t, 1 - eps, 1 + eps))
    vf_loss = 0.5 * mean_t max((V_new - R_t)^2, (clip(V_new, V_old - eps_v, V_old + eps_v) - R_t)^2)
    loss    = pg_loss + vf_coef * vf_loss

where every mean is a masked mean over all response tokens of the minibatch (`ppo_loss`).

Reading order: the masked statistics, `logprobs_from_logits` / `entropy_from_logits` (and `token_logprobs`,
the same two computed a few rows at a time, which the trainer uses), `kl_penalty`,
`compute_rewards`, `compute_advantages`, `ppo_loss`, `step_stats`, then the KL controllers,
`LengthSampler` and `ValueHead`.
"""

import warnings

import torch
from torch import nn


# ----------------------------------------------------------------------------------------------------
# Masked statistics: means and variances over the tokens where mask == 1.
# ----------------------------------------------------------------------------------------------------


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` over the positions where `mask` is 1.

    values, mask: same shape, e.g. [B, T]. With dim=None the result is a scalar; with dim=d the masked
    dimension d is reduced (e.g. dim=-1 gives one mean per row, [B]).
    """
    if dim is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(dim=dim) / mask.sum(dim=dim)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `values` over the masked positions (scalar).

    Like trl, the unbiased estimate multiplies the biased one by n / (n - 1) with n = mask.sum(), the
    number of masked tokens (Bessel's correction). n == 1 divides by zero (inf/nan): use bigger minibatches.
    """
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n == 0:
            raise ValueError("masked_var: the mask is all zeros (is the minibatch empty or the response masked out?)")
        variance = variance * (n / (n - 1))
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise `values` to zero mean, unit variance using the masked positions' statistics.

    Every position is transformed (masked-out ones too: they are just not counted in the statistics).
    With shift_mean=False the mean is added back, so only the scale changes. Shape: same as `values`.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


# ----------------------------------------------------------------------------------------------------
# From logits to per-token log-probabilities and entropies.
# ----------------------------------------------------------------------------------------------------


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor | None = None) -> torch.Tensor:
    """log p(label) under softmax(logits): [B, T, V] logits, [B, T] labels -> [B, T] float32.

    log_softmax(x)[y] = x[y] - logsumexp(x). trl computes the full [B, T, V] log_softmax and gathers;
    we gather first and subtract the logsumexp, so no second vocabulary-sized tensor is made (the
    backward of logsumexp recomputes the softmax). Pass `lse` = logsumexp(logits) if you already have
    it (entropy_from_logits needs the same one). Logits are upcast to float32 (bf16 logsumexp is too
    coarse). The result agrees with trl's to float32 rounding (a few ulps), not bit for bit.

    Temperature: sampling with temperature tau draws from softmax(logits / tau), so the caller divides
    the logits by tau before calling this if the log-probs must describe the sampling distribution.
    """
    logits = logits.float()
    if lse is None:
        lse = torch.logsumexp(logits, dim=-1)  # [B, T]
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - lse


def entropy_from_logits(logits: torch.Tensor, lse: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim: [B, T, V] -> [B, T].

    H = -sum_v p_v log p_v = logsumexp(x) - sum_v p_v x_v   (the same formula as trl). Pass `lse` =
    logsumexp(logits) when you have it, to save a pass over the vocabulary.
    """
    if lse is None:
        lse = torch.logsumexp(logits, dim=-1)
    return lse - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)


# Rows of logits per chunk in token_logprobs: ~1 MB of fp32, so each chunk's passes run in the cache.
CHUNK_BYTES = 2 ** 20


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0):
    """(log-probs [..., T] with a gradient, entropies [..., T] without) of logits [..., T, V] at temperature tau.

    The same numbers as logprobs_from_logits and entropy_from_logits on logits / tau upcast to fp32, but
    a few rows at a time: each chunk of rows is upcast, exponentiated and reduced while it sits in the
    cache, and no fp32 [..., T, V] tensor is made or kept for the backward pass (which recomputes the
    softmax from the logits in their own dtype, chunk by chunk: d log p(y) / dz = onehot(y) - softmax(z)).
    With a bf16 model that keeps the largest tensor of a PPO step at 2 bytes per element instead of 4+4.
    """
    V = logits.shape[-1]
    logprobs, entropy = _TokenLogprobs.apply(logits.reshape(-1, V), labels.reshape(-1), temperature)
    return logprobs.view(labels.shape), entropy.view(labels.shape)


def _chunks(rows: int, V: int):
    size = max(1, CHUNK_BYTES // (4 * V))
    return [slice(start, start + size) for start in range(0, rows, size)]


def _scaled(z: torch.Tensor, temperature: float) -> torch.Tensor:
    z = z.to(torch.promote_types(z.dtype, torch.float32))  # fp32 (fp64 stays fp64: gradcheck)
    return z / temperature if temperature != 1.0 else z


class _TokenLogprobs(torch.autograd.Function):
    """logits [R, V] (any float dtype), labels [R] -> log p(label) [R], entropy [R] (no gradient); math in fp32."""

    @staticmethod
    def forward(ctx, logits, labels, temperature):
        R, V = logits.shape
        dtype = torch.promote_types(logits.dtype, torch.float32)
        logprobs, lse, entropy = (torch.empty(R, dtype=dtype, device=logits.device) for _ in range(3))
        for rows in _chunks(R, V):
            z = _scaled(logits[rows], temperature)  # [r, V]
            peak = z.amax(dim=-1, keepdim=True)  # [r, 1]
            shifted = z - peak  # <= 0: exp cannot overflow
            e = shifted.exp()  # [r, V], the one exp of the chunk: softmax = e / total
            total = e.sum(dim=-1)  # [r], >= 1
            log_total = total.log()  # [r]
            m = peak.squeeze(-1) + log_total  # log-sum-exp [r]
            lse[rows] = m
            logprobs[rows] = z.gather(-1, labels[rows, None]).squeeze(-1) - m
            # entropy -sum p log p with p = e / total, log p = shifted - log total: both terms are relative to the
            # peak, so nothing cancels against the size of the logits
            entropy[rows] = log_total - torch.linalg.vecdot(e, shifted) / total
        ctx.save_for_backward(logits, labels, lse)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, labels, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for rows in _chunks(*logits.shape):
            g = grad_logprobs[rows, None]  # [r, 1]
            d = (_scaled(logits[rows], ctx.temperature) - lse[rows, None]).exp_().mul_(-g)  # -softmax * g
            d.scatter_add_(-1, labels[rows, None], g)  # + onehot * g
            grad[rows] = d / ctx.temperature if ctx.temperature != 1.0 else d  # copy_ rounds to the logits' dtype
        return grad, None, None


# ----------------------------------------------------------------------------------------------------
# 1. The KL-shaped reward.
# ----------------------------------------------------------------------------------------------------


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, estimator: str = "kl") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) -> [B, T].

    For "kl", "abs" and "mse" the inputs are the log-probs of the *sampled* tokens, [B, T]:
        "kl":  log pi - log pi_ref              unbiased in expectation over samples, can be negative
        "abs": |log pi - log pi_ref|
        "mse": 0.5 * (log pi - log pi_ref)^2
    For "full" the inputs are the whole next-token distributions as log-probs, [B, T, V]
    (log_softmax of the policy's and of the reference's logits), and the exact KL is summed over the
    vocabulary: sum_v pi_v * (log pi_v - log pi_ref_v). This is trl's
    `F.kl_div(ref_logprob, logprob, log_target=True).sum(-1)`.
    """
    if estimator == "kl":
        return logprob - ref_logprob
    if estimator == "abs":
        return (logprob - ref_logprob).abs()
    if estimator == "mse":
        return 0.5 * (logprob - ref_logprob).square()
    if estimator == "full":
        return (logprob.exp() * (logprob - ref_logprob)).sum(-1)
    raise ValueError(f"unknown KL estimator {estimator!r}: expected 'kl', 'abs', 'mse' or 'full'")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position where mask != 0, per row: [B, T] -> [B] (long).

    Each kept position contributes its own index, the others contribute 0, and the max is the last one.
    A row with no response token has no last token: that is an error (trl crashes there too).
    """
    kept = mask != 0  # [B, T]
    if not kept.any(dim=-1).all():
        raise ValueError("every row of the mask needs at least one response token (a row is all zeros)")
    positions = torch.arange(mask.shape[-1], device=mask.device)  # [T]
    return (positions * kept).amax(dim=-1)


def compute_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    masks: torch.Tensor,
    kl_coef: float,
    estimator: str = "kl",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * KL everywhere, plus the score on the last response token.

    scores [B]; logprobs, ref_logprobs [B, T] (or [B, T, V] full log-prob distributions for
    estimator="full", see `kl_penalty`); masks [B, T].
    Returns (rewards, non_score_reward, kls), each [B, T]:
        kls              = kl_penalty(logprobs, ref_logprobs)        not masked
        non_score_reward = -kl_coef * kls                             not masked
        rewards          = non_score_reward, with score added at the last index where mask == 1
    Like trl, nothing is masked here: the KL of query and padding positions is still in `rewards`;
    `compute_advantages` and the statistics apply the mask later.
    """
    kls = kl_penalty(logprobs, ref_logprobs, estimator)  # [B, T]
    non_score_reward = -kl_coef * kls  # [B, T]
    rewards = non_score_reward.clone()
    last = last_token_index(masks)  # [B]
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards, non_score_reward, kls


# ----------------------------------------------------------------------------------------------------
# 2. Advantages with GAE.
# ----------------------------------------------------------------------------------------------------


def compute_advantages(
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten_rewards: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GAE advantages and value targets, trl's way. values, rewards, mask: [B, T].

    Returns (values, advantages, returns), each [B, T]:
        values     = values * mask   (the masked values: store these as the "old values" for the loss)
        returns    = raw GAE advantages + masked values
        advantages = GAE advantages whitened over the masked tokens (masked_whiten, shift_mean=True)

    Masking first zeroes V and r outside the response, so the bootstrap value after the last response
    token is V = 0 (the episode ended) and trailing padding contributes nothing. Query positions before the
    response do receive (meaningless) advantages; every later use multiplies them by the mask.
    whiten_rewards=True rescales the rewards first (masked_whiten, shift_mean=False), trl's option.
    """
    values = values * mask
    rewards = rewards * mask
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)

    # Backwards over time; each step works on the whole batch column at once ([B]).
    T = rewards.shape[-1]
    lastgaelam = 0.0
    advantages_reversed = []
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # [B, T]

    returns = advantages + values
    advantages = masked_whiten(advantages, mask).detach()
    return values, advantages, returns


# ----------------------------------------------------------------------------------------------------
# 3. The clipped PPO losses for one minibatch.
# ----------------------------------------------------------------------------------------------------


def ppo_loss(
    old_logprobs: torch.Tensor,
    values: torch.Tensor,
    logprobs: torch.Tensor,
    vpreds: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    cliprange: float = 0.2,
    cliprange_value: float = 0.2,
    vf_coef: float = 0.1,
    ratio_threshold: float = 10.0,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """PPO's clipped policy loss and clipped value loss for one minibatch, with trl's statistics.

    Inputs, all [b, T] for a minibatch of b samples:
        old_logprobs, values      from the rollout (values = the masked values of `compute_advantages`)
        logprobs, vpreds          from the current policy / value head (these carry gradients)
        entropy                   per-token entropy of the current policy (`entropy_from_logits`); only
                                  logged, so compute it under torch.no_grad() to save memory
        mask, advantages, returns from the rollout (`compute_advantages`)
    Returns (pg_loss, vf_loss, stats): pg_loss and vf_loss are scalars and vf_loss is *already multiplied
    by vf_coef*, so the loss to backpropagate is pg_loss + vf_loss. stats is a flat dict of detached tensors
    under trl's names ("loss/policy", "policy/approxkl", "val/clipfrac", ...); "policy/advantages" and
    "policy/ratio" are [b, T], the rest are scalars. "loss/value" is the value loss *before* vf_coef.

    Skipping minibatches: if the masked mean ratio exceeds ratio_threshold, the policy has moved so far
    from the sampling policy that the update is untrustworthy. trl then multiplies the losses by 0: the
    backward gives zero gradients, but the optimizer step still runs (so Adam's momentum still moves
    the weights), and the logged losses are 0.
    """
    # Value loss: the new value may move at most cliprange_value from the rollout value.
    vpredclipped = torch.clamp(vpreds, values - cliprange_value, values + cliprange_value)
    vf_losses1 = (vpreds - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    vf_clipfrac = masked_mean(torch.gt(vf_losses2, vf_losses1).float(), mask)

    # Policy loss: pessimistic (max of losses = min of objectives) of the raw and the clipped ratio.
    ratio = torch.exp(logprobs - old_logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
    pg_clipfrac = masked_mean(torch.gt(pg_losses2, pg_losses).float(), mask)

    loss = pg_loss + vf_coef * vf_loss

    avg_ratio = masked_mean(ratio, mask).item()
    if avg_ratio > ratio_threshold:
        warnings.warn(
            f"The average ratio of batch ({avg_ratio:.2f}) exceeds threshold {ratio_threshold:.2f}. Skipping batch."
        )
        pg_loss = pg_loss * 0.0
        vf_loss = vf_loss * 0.0
        loss = loss * 0.0

    # approxkl is the quadratic estimator 0.5 * E[(log r)^2]; policykl is the plain E[-log r].
    log_ratio = logprobs - old_logprobs
    stats = {
        "loss/policy": pg_loss.detach(),
        "loss/value": vf_loss.detach(),
        "loss/total": loss.detach(),
        "policy/entropy": masked_mean(entropy, mask).detach(),
        "policy/approxkl": (0.5 * masked_mean(log_ratio**2, mask)).detach(),
        "policy/policykl": masked_mean(-log_ratio, mask).detach(),
        "policy/clipfrac": pg_clipfrac.detach(),
        "policy/advantages": advantages.detach(),
        "policy/advantages_mean": masked_mean(advantages, mask).detach(),
        "policy/ratio": ratio.detach(),
        "returns/mean": masked_mean(returns, mask).detach(),
        "returns/var": masked_var(returns, mask).detach(),
        "val/vpred": masked_mean(vpreds, mask).detach(),
        "val/error": masked_mean((vpreds - returns) ** 2, mask).detach(),
        "val/clipfrac": vf_clipfrac.detach(),
        "val/mean": masked_mean(values, mask).detach(),
        "val/var": masked_var(values, mask).detach(),
    }
    return pg_loss, vf_coef * vf_loss, stats


# ----------------------------------------------------------------------------------------------------
# The per-step log.
# ----------------------------------------------------------------------------------------------------


def step_stats(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    non_score_reward: torch.Tensor,
    kls: torch.Tensor,
    masks: torch.Tensor,
    kl_coef: float,
    train_stats: list[dict],
    query_lengths: list[int] | None = None,
    response_lengths: list[int] | None = None,
    timing: dict | None = None,
    raw_scores: torch.Tensor | None = None,
) -> dict[str, float]:
    """One PPO step's statistics under trl's names, as python floats.

    scores [B]; logprobs, non_score_reward, kls, masks [B, T] from the rollout of the whole batch;
    kl_coef is the coefficient *used* for this batch (log it before updating the controller);
    train_stats is the list of `ppo_loss` stats dicts, one per minibatch over all PPO epochs.

        objective/kl              mean over samples of the masked per-sequence KL sum: what the
                                  adaptive controller tracks (its target is per sequence, not per token)
        objective/entropy         mean over samples of -sum_t log pi(a_t): a sampled-token estimate of
                                  the sequence entropy (the exact per-token one is ppo/policy/entropy)
        objective/kl_coef         kl_coef
        ppo/mean_non_score_reward masked mean of -kl_coef * kl over all response tokens
        ppo/mean_scores, ppo/std_scores, env/reward_mean, env/reward_std
                                  mean and unbiased std of the scores (trl logs the env/ pair from the
                                  rewards passed to log_stats: raw_scores when given, the scores before
                                  reward shaping; the ppo/ pair from the shaped ones)
        ppo/<key>                 for each scalar key of ppo_loss's stats: the mean over all minibatches
        ppo/val/var_explained     1 - mean(val/error) / mean(returns/var): a ratio of the minibatch means
                                  (when the stats have a value loss: not for rloo / grpo)
        tokens/...                lengths, when given
    plus the `timing` entries as given (the loop's time/ppo/forward_pass, time/ppo/compute_rewards,
    time/ppo/compute_advantages, time/ppo/optimize_step, time/ppo/calc_stats, time/ppo/total).
    """
    kl_per_sequence = (kls * masks).sum(dim=-1)  # [B]
    mean_kl = kl_per_sequence.mean()
    raw_scores = scores if raw_scores is None else raw_scores
    if mean_kl.item() < -1.0:
        warnings.warn(f"KL divergence is becoming negative: {mean_kl.item():.2f} - check the generation settings.")
    stats = {
        "objective/kl": mean_kl.item(),
        "objective/kl_coef": float(kl_coef),
        "objective/entropy": (-logprobs * masks).sum(dim=-1).mean().item(),
        "ppo/mean_non_score_reward": masked_mean(non_score_reward, masks).item(),
        "ppo/mean_scores": scores.mean().item(),
        "ppo/std_scores": scores.std().item(),
        "env/reward_mean": raw_scores.mean().item(),
        "env/reward_std": raw_scores.std().item(),
    }
    # Minibatch statistics: average each scalar over every minibatch of every epoch.
    for key, value in train_stats[0].items():
        if value.dim() == 0:
            stats[f"ppo/{key}"] = torch.stack([s[key] for s in train_stats]).mean().item()
    if "val/error" in train_stats[0]:
        mean_error = torch.stack([s["val/error"] for s in train_stats]).mean()
        mean_returns_var = torch.stack([s["returns/var"] for s in train_stats]).mean()
        stats["ppo/val/var_explained"] = (1 - mean_error / mean_returns_var).item()

    if query_lengths is not None:
        lengths = torch.tensor(query_lengths, dtype=torch.float)
        stats["tokens/queries_len_mean"] = lengths.mean().item()
        stats["tokens/queries_len_std"] = lengths.std().item()
    if response_lengths is not None:
        lengths = torch.tensor(response_lengths, dtype=torch.float)
        stats["tokens/responses_len_mean"] = lengths.mean().item()
        stats["tokens/responses_len_std"] = lengths.std().item()
    if timing is not None:
        stats.update(timing)
    return stats


# ----------------------------------------------------------------------------------------------------
# KL coefficient controllers (Ziegler et al. 2019, section 2.2).
# ----------------------------------------------------------------------------------------------------


class AdaptiveKLController:
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon).

    Too much KL (above target) raises beta, too little lowers it; the clip bounds the proportional error
    to +-20%, and n_steps / horizon (samples in this batch / horizon) makes the change per sample small.
    `current` is the per-sequence KL, step_stats' "objective/kl"; n_steps is the number of samples in the
    batch (all processes). Arithmetic is in python float (float64).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current: float, n_steps: int) -> None:
        proportional_error = min(max(float(current) / self.target - 1, -0.2), 0.2)
        mult = 1 + proportional_error * n_steps / self.horizon
        self.value *= mult

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])


class FixedKLController:
    """A constant beta, with the same interface as AdaptiveKLController."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


# ----------------------------------------------------------------------------------------------------
# Random prompt / response lengths, reproducible across a resume.
# ----------------------------------------------------------------------------------------------------


class LengthSampler:
    """Uniform random integer in [min_value, max_value): note max_value is *excluded*, like trl's
    `LengthSampler` (which picks from `range(min_value, max_value)`).

    trl draws with numpy's global RNG; we own a torch.Generator, so `state_dict()` captures the exact
    position in the random stream and a resumed run draws the same lengths as an uninterrupted one.
    """

    def __init__(self, min_value: int, max_value: int, seed: int = 0):
        if max_value <= min_value:
            raise ValueError(f"LengthSampler needs min_value < max_value, got [{min_value}, {max_value})")
        self.min_value = min_value
        self.max_value = max_value
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self) -> int:
        return int(torch.randint(self.min_value, self.max_value, (), generator=self.generator))

    def state_dict(self) -> dict:
        return {"min_value": self.min_value, "max_value": self.max_value, "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.min_value = state["min_value"]
        self.max_value = state["max_value"]
        self.generator.set_state(state["rng"])


# ----------------------------------------------------------------------------------------------------
# The value head.
# ----------------------------------------------------------------------------------------------------


class ValueHead(nn.Module):
    """V(s_t) = w . h_t + b: a Linear(hidden, 1) on the last hidden states, [B, T, H] -> [B, T] float32.

    Differences from trl's ValueHead, and why:
    * No dropout. trl's head has Dropout(0.1), but its PPOTrainer runs every forward, the training ones
      included, in eval mode (batched_forward_pass calls model.eval()), so the dropout never fires.
    * Zero init by default (zero_init=False gives nn.Linear's default init, which is what trl uses).
      With w = 0 and b = 0 the first values are exactly 0, so the first advantages are the plain
      discounted rewards instead of rewards minus random noise, and, because dV/dh = w = 0, the value loss
      sends no gradient into the shared backbone (the LoRA adapters) until the head has learned something.
      The head still learns from step one: dL/dw = (V - R) * h is not zero.
    * The hidden states are upcast to the head's dtype (float32), as trl does, so values are float32
      even when the backbone runs in bf16 or int8.
    """

    def __init__(self, hidden_size: int, zero_init: bool = True):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)  # "summary" is trl's parameter name
        if zero_init:
            nn.init.zeros_(self.summary.weight)
            nn.init.zeros_(self.summary.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states.to(self.summary.weight.dtype)  # [B, T, H]
        return self.summary(hidden_states).squeeze(-1)  # [B, T]
