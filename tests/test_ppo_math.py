"""Parity of minirlhf.ppo with trl 0.11.4's classic PPOTrainer, on the same random tensors.

Every expected value comes from trl itself: its `trl.core` helpers, its `AdaptiveKLController`, and the
`PPOTrainer` methods `compute_rewards`, `_kl_penalty`, `compute_advantages`, `loss` and
`record_step_stats`, called unbound with a minimal stand-in `self` (they only read `self.config`,
`self.kl_ctl` and `self._kl_penalty`), so no model, tokenizer or accelerator is built.

The masks imitate trl's layout: zeros on the query positions at the start, ones on the response, zeros on
the padding at the end, with a different response length in every row.
"""

import types
import warnings

import numpy as np
import pytest
import torch

import trl  # the oracle: trl==0.11.4 from the [test] extra

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl import PPOConfig
    from trl.core import entropy_from_logits as trl_entropy_from_logits
    from trl.core import LengthSampler as TrlLengthSampler
    from trl.core import logprobs_from_logits as trl_logprobs_from_logits
    from trl.core import masked_mean as trl_masked_mean
    from trl.core import masked_var as trl_masked_var
    from trl.core import masked_whiten as trl_masked_whiten
    from trl.core import stack_dicts, stats_to_np
    from trl.models.modeling_value_head import ValueHead as TrlValueHead
    from trl.trainer.ppo_trainer import PPOTrainer
    from trl.trainer.utils import AdaptiveKLController as TrlAdaptiveKLController

from minirlhf import ppo

SEEDS = [0, 1, 2, 3]
ESTIMATORS = ["kl", "abs", "mse", "full"]


def exact(actual, expected, tol=1e-6):
    torch.testing.assert_close(actual, expected, rtol=0, atol=tol)


def exact_or_relative(actual, expected, tol=1e-6):
    """|actual - expected| <= tol * max(1, |expected|) elementwise: the README's "<= 1e-6, relative above 1"."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert ((actual - expected).abs() <= tol * expected.abs().clamp(min=1.0)).all(), (actual - expected).abs().max()


def trl_self(**config):
    """A stand-in `self` for PPOTrainer's methods: a PPOConfig, a KL controller and `_kl_penalty`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PPOConfig's deprecation warning
        cfg = PPOConfig(**config)
    kl_ctl = TrlAdaptiveKLController(cfg.init_kl_coef, cfg.target, cfg.horizon)
    stand_in = types.SimpleNamespace(config=cfg, kl_ctl=kl_ctl)
    stand_in._kl_penalty = types.MethodType(PPOTrainer._kl_penalty, stand_in)
    return stand_in


def ragged_mask(g, B, T):
    """[B, T] long mask: a query prefix of zeros, a response of ones, padding zeros. Row 0 ends at T-1,
    row 1 has a single response token, the others are random."""
    mask = torch.zeros(B, T, dtype=torch.long)
    for i in range(B):
        start = int(torch.randint(0, 4, (), generator=g))
        if i == 0:
            end = T
        elif i == 1:
            end = start + 1
        else:
            end = int(torch.randint(start + 1, T + 1, (), generator=g))
        mask[i, start:end] = 1
    return mask


def make_rollout(seed, B=6, T=13, V=29):
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(B, T, V, generator=g)
    ref_logits = logits + 0.5 * torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    return dict(
        mask=ragged_mask(g, B, T),
        logits=logits,
        ref_logits=ref_logits,
        logprobs=trl_logprobs_from_logits(logits, labels),
        ref_logprobs=trl_logprobs_from_logits(ref_logits, labels),
        values=torch.randn(B, T, generator=g),
        scores=3.0 * torch.randn(B, generator=g),
        g=g,
    )


# ----------------------------------------------------------------------------------------------------
# Masked statistics and logits helpers vs trl.core.
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_masked_statistics_match_trl(seed):
    r = make_rollout(seed)
    x, mask = 5.0 * r["values"] + 2.0, r["mask"]
    exact(ppo.masked_mean(x, mask), trl_masked_mean(x, mask))
    exact(ppo.masked_mean(x, mask, dim=-1), trl_masked_mean(x, mask, axis=-1))
    exact(ppo.masked_var(x, mask), trl_masked_var(x, mask))
    exact(ppo.masked_var(x, mask, unbiased=False), trl_masked_var(x, mask, unbiased=False))
    exact(ppo.masked_whiten(x, mask), trl_masked_whiten(x, mask))
    exact(ppo.masked_whiten(x, mask, shift_mean=False), trl_masked_whiten(x, mask, shift_mean=False))
    # The whitened masked values really are standardised (guards against comparing two wrong answers).
    w = ppo.masked_whiten(x, mask)
    assert abs(ppo.masked_mean(w, mask).item()) < 1e-5
    assert abs(ppo.masked_var(w, mask).item() - 1) < 1e-4


def test_masked_var_of_empty_mask_raises():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="all zeros"):
        ppo.masked_var(x, torch.zeros(2, 3))


@pytest.mark.parametrize("seed", SEEDS)
def test_logprobs_and_entropy_match_trl(seed):
    r = make_rollout(seed)
    labels = torch.randint(0, r["logits"].shape[-1], r["mask"].shape, generator=r["g"])
    # Gather-minus-logsumexp vs trl's log_softmax-then-gather: equal up to float32 rounding of log-probs near
    # -log(29) ~ -3.4 .. -11 (measured: <= 9.5e-7 absolute, 3.4e-7 relative; 2 ulps of fp32 at 4..8)
    exact_or_relative(ppo.logprobs_from_logits(r["logits"], labels), trl_logprobs_from_logits(r["logits"], labels))
    exact(ppo.entropy_from_logits(r["logits"]), trl_entropy_from_logits(r["logits"]))
    # bf16 logits are upcast: compare with trl on the same (upcast) numbers.
    bf16 = r["logits"].bfloat16()
    ours = ppo.logprobs_from_logits(bf16, labels)
    assert ours.dtype == torch.float32
    exact_or_relative(ours, trl_logprobs_from_logits(bf16.float(), labels))


def test_logprobs_from_logits_gradient_matches_trl():
    r = make_rollout(7)
    labels = torch.randint(0, r["logits"].shape[-1], r["mask"].shape, generator=r["g"])
    weights = torch.randn(labels.shape, generator=r["g"])
    ours_logits = r["logits"].clone().requires_grad_()
    trl_logits = r["logits"].clone().requires_grad_()
    (ppo.logprobs_from_logits(ours_logits, labels) * weights).sum().backward()
    (trl_logprobs_from_logits(trl_logits, labels) * weights).sum().backward()
    exact(ours_logits.grad, trl_logits.grad, tol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("seed", SEEDS)
def test_chunked_token_logprobs_match_trl(seed, temperature, monkeypatch):
    """ppo.token_logprobs (a few rows at a time, no fp32 [B, T, V] copy) against trl on logits / tau, upcast: the
    log-probs, the entropies, and the log-probs' gradient, with chunks that split the rows unevenly."""
    monkeypatch.setattr(ppo, "CHUNK_BYTES", 4 * 29 * 3)  # 3 rows of the 29-token vocabulary per chunk
    r = make_rollout(seed)
    labels = torch.randint(0, r["logits"].shape[-1], r["mask"].shape, generator=r["g"])
    weights = torch.randn(labels.shape, generator=r["g"])
    for logits in (r["logits"], r["logits"].bfloat16()):
        ours_logits = logits.clone().requires_grad_()
        trl_logits = (logits.float() / temperature).requires_grad_()
        logprobs, entropy = ppo.token_logprobs(ours_logits, labels, temperature)
        want = trl_logprobs_from_logits(trl_logits, labels)
        assert logprobs.dtype == entropy.dtype == torch.float32 and not entropy.requires_grad
        exact_or_relative(logprobs, want)
        # -sum p log p of the log-softmax: within 1e-6 of trl's formula in float64 (trl's own fp32 value has a
        # cancellation, logsumexp - sum p z, of a few 1e-6)
        exact(entropy.double(), trl_entropy_from_logits(trl_logits.detach().double()), tol=1e-6)
        (logprobs * weights).sum().backward()
        (want * weights).sum().backward()
        assert ours_logits.grad.dtype == logits.dtype
        # d/dlogits = d/d(logits / tau) / tau, rounded once to the logits' dtype: bf16 may round the other way
        # where fp32 rounding lands on a bf16 midpoint, one bf16 step (2^-8 relative)
        got, want_grad = ours_logits.grad.float(), trl_logits.grad / temperature
        step = 1e-6 if logits.dtype == torch.float32 else 2 ** -8
        assert ((got - want_grad).abs() <= step * want_grad.abs() + 1e-6).all(), (got - want_grad).abs().max()


def test_chunked_token_logprobs_gradcheck():
    logits = torch.randn(7, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (7,))
    assert torch.autograd.gradcheck(lambda z: ppo.token_logprobs(z, labels, 0.8)[0], (logits,))


# ----------------------------------------------------------------------------------------------------
# KL penalty and per-token rewards vs PPOTrainer._kl_penalty / compute_rewards.
# ----------------------------------------------------------------------------------------------------


def rollout_logprobs(r, estimator):
    """trl's step() passes full-vocab log-prob distributions for "full", gathered log-probs otherwise."""
    if estimator == "full":
        full = trl_logprobs_from_logits(r["logits"], None, gather=False)  # [B, T, V]
        ref_full = trl_logprobs_from_logits(r["ref_logits"], None, gather=False)
        return full, ref_full
    return r["logprobs"], r["ref_logprobs"]


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("seed", SEEDS)
def test_compute_rewards_matches_trl(seed, estimator):
    r = make_rollout(seed)
    logprobs, ref_logprobs = rollout_logprobs(r, estimator)
    stand_in = trl_self(kl_penalty=estimator, init_kl_coef=0.137)
    expected = PPOTrainer.compute_rewards(stand_in, r["scores"], logprobs, ref_logprobs, r["mask"])
    actual = ppo.compute_rewards(r["scores"], logprobs, ref_logprobs, r["mask"], kl_coef=0.137, estimator=estimator)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape == r["mask"].shape
        exact(a, e)
    exact(ppo.kl_penalty(logprobs, ref_logprobs, estimator), stand_in._kl_penalty(logprobs, ref_logprobs))


def test_full_kl_is_nonnegative_and_zero_for_identical_models():
    r = make_rollout(0)
    logp, ref_logp = rollout_logprobs(r, "full")
    assert (ppo.kl_penalty(logp, ref_logp, "full") >= -1e-6).all()
    exact(ppo.kl_penalty(logp, logp, "full"), torch.zeros(r["mask"].shape))


def test_compute_rewards_puts_score_on_last_response_token():
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0], [1, 1, 1, 1, 1]])
    zeros = torch.zeros(3, 5)
    rewards, _, _ = ppo.compute_rewards(torch.tensor([1.0, 2.0, 3.0]), zeros, zeros, mask, kl_coef=0.2)
    expected = torch.zeros(3, 5)
    expected[0, 3], expected[1, 2], expected[2, 4] = 1.0, 2.0, 3.0
    exact(rewards, expected)


def test_compute_rewards_rejects_row_without_response():
    mask = torch.tensor([[0, 1, 1], [0, 0, 0]])
    with pytest.raises(ValueError, match="all zeros"):
        ppo.compute_rewards(torch.ones(2), torch.zeros(2, 3), torch.zeros(2, 3), mask, kl_coef=0.2)


def test_unknown_estimator_raises():
    with pytest.raises(ValueError, match="unknown KL estimator"):
        ppo.kl_penalty(torch.zeros(1, 2), torch.zeros(1, 2), "js")


# ----------------------------------------------------------------------------------------------------
# GAE vs PPOTrainer.compute_advantages.
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("whiten_rewards", [False, True])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.9, 1.0)])
@pytest.mark.parametrize("seed", SEEDS)
def test_compute_advantages_matches_trl(seed, gamma, lam, whiten_rewards):
    r = make_rollout(seed)
    rewards, _, _ = PPOTrainer.compute_rewards(trl_self(), r["scores"], r["logprobs"], r["ref_logprobs"], r["mask"])
    stand_in = trl_self(gamma=gamma, lam=lam, whiten_rewards=whiten_rewards)
    expected = PPOTrainer.compute_advantages(stand_in, r["values"], rewards, r["mask"])
    actual = ppo.compute_advantages(
        r["values"], rewards, r["mask"], gamma=gamma, lam=lam, whiten_rewards=whiten_rewards
    )
    for a, e in zip(actual, expected):  # values, advantages, returns: every position, masked or not
        exact(a, e)


# ----------------------------------------------------------------------------------------------------
# The PPO losses and their statistics vs PPOTrainer.loss.
# ----------------------------------------------------------------------------------------------------


def make_minibatch(seed, logprob_shift=0.0):
    """A rollout plus a "current policy" that moved a bit: new logprobs and vpreds that carry gradients."""
    r = make_rollout(seed)
    g, mask = r["g"], r["mask"]
    rewards, _, _ = PPOTrainer.compute_rewards(trl_self(), r["scores"], r["logprobs"], r["ref_logprobs"], mask)
    values, advantages, returns = PPOTrainer.compute_advantages(trl_self(), r["values"], rewards, mask)
    return dict(
        old_logprobs=r["logprobs"],
        values=values,
        logits=r["logits"] + 0.3 * torch.randn(r["logits"].shape, generator=g),
        vpreds=values + 0.4 * torch.randn(values.shape, generator=g),
        logprobs=r["logprobs"] + 0.25 * torch.randn(values.shape, generator=g) + logprob_shift,
        mask=mask,
        advantages=advantages,
        returns=returns,
    )


def run_both(mb, **config):
    """Run trl's loss and ours on the same minibatch; return both results and the input gradients."""
    stand_in = trl_self(**config)
    names = ["cliprange", "cliprange_value", "vf_coef", "ratio_threshold"]
    hyper = {k: getattr(stand_in.config, k) for k in names}

    trl_logprobs, trl_vpreds = mb["logprobs"].clone().requires_grad_(), mb["vpreds"].clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skip warning
        trl_pg, trl_vf, trl_stats = PPOTrainer.loss(
            stand_in, mb["old_logprobs"], mb["values"], mb["logits"], trl_vpreds, trl_logprobs,
            mb["mask"], mb["advantages"], mb["returns"],
        )
    (trl_pg + trl_vf).backward()

    logprobs, vpreds = mb["logprobs"].clone().requires_grad_(), mb["vpreds"].clone().requires_grad_()
    entropy = ppo.entropy_from_logits(mb["logits"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pg, vf, stats = ppo.ppo_loss(
            mb["old_logprobs"], mb["values"], logprobs, vpreds, entropy,
            mb["mask"], mb["advantages"], mb["returns"], **hyper,
        )
    (pg + vf).backward()
    return (pg, vf, stats, logprobs.grad, vpreds.grad), (trl_pg, trl_vf, trl_stats, trl_logprobs.grad, trl_vpreds.grad)


def assert_same_loss(ours, theirs):
    pg, vf, stats, g_logprobs, g_vpreds = ours
    trl_pg, trl_vf, trl_stats, trl_g_logprobs, trl_g_vpreds = theirs
    exact(pg, trl_pg)
    exact(vf, trl_vf)
    assert set(stats) == set(trl_stats)
    for key in trl_stats:
        exact(stats[key], trl_stats[key].detach(), tol=1e-6 * max(1.0, trl_stats[key].abs().max().item()))
    exact(g_logprobs, trl_g_logprobs)
    exact(g_vpreds, trl_g_vpreds)


LOSS_CONFIGS = [
    {},  # trl's defaults: cliprange 0.2, cliprange_value 0.2, vf_coef 0.1, ratio_threshold 10
    {"cliprange": 0.1, "cliprange_value": 0.05, "vf_coef": 0.5},
    {"cliprange": 0.3, "cliprange_value": 1.0, "vf_coef": 1.0},
]


@pytest.mark.parametrize("config", LOSS_CONFIGS)
@pytest.mark.parametrize("seed", SEEDS)
def test_ppo_loss_matches_trl(seed, config):
    mb = make_minibatch(seed)
    ours, theirs = run_both(mb, **config)
    assert_same_loss(ours, theirs)
    # Non-trivial case: clipping happens for some tokens but not all, and the losses are not zero.
    stats = ours[2]
    assert 0 < stats["policy/clipfrac"] < 1
    if config.get("cliprange_value", 0.2) <= 0.2:  # a wide value clip range (1.0) may clip nothing
        assert 0 < stats["val/clipfrac"] < 1
    assert ours[0] != 0 and ours[1] != 0


@pytest.mark.parametrize("seed", SEEDS)
def test_ppo_loss_skips_minibatch_when_ratio_explodes(seed):
    # log-ratio shifted by +1: mean ratio ~ e > 2, above the threshold -> trl zeroes every loss.
    mb = make_minibatch(seed, logprob_shift=1.0)
    ours, theirs = run_both(mb, ratio_threshold=2.0)
    assert_same_loss(ours, theirs)
    pg, vf, stats, g_logprobs, g_vpreds = ours
    assert pg == 0 and vf == 0 and stats["loss/total"] == 0
    assert (g_logprobs == 0).all() and (g_vpreds == 0).all()
    assert stats["policy/approxkl"] > 0.4  # the statistics are still reported
    with pytest.warns(UserWarning, match="Skipping batch"):
        entropy = torch.zeros_like(mb["values"])
        ppo.ppo_loss(
            mb["old_logprobs"], mb["values"], mb["logprobs"], mb["vpreds"], entropy,
            mb["mask"], mb["advantages"], mb["returns"], ratio_threshold=2.0,
        )
    # The same minibatch under the default threshold (10) is not skipped, in trl or here.
    ours, theirs = run_both(mb)
    assert_same_loss(ours, theirs)
    assert ours[0] != 0


# ----------------------------------------------------------------------------------------------------
# The per-step log vs PPOTrainer.record_step_stats.
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["kl", "full"])
@pytest.mark.parametrize("seed", SEEDS[:2])
def test_step_stats_match_trl(seed, estimator):
    r = make_rollout(seed, B=6)
    mask, kl_coef = r["mask"], 0.21
    logprobs, ref_logprobs = rollout_logprobs(r, estimator)
    stand_in = trl_self(kl_penalty=estimator, init_kl_coef=kl_coef)
    rewards, non_score_reward, kls = PPOTrainer.compute_rewards(stand_in, r["scores"], logprobs, ref_logprobs, mask)
    values, advantages, returns = PPOTrainer.compute_advantages(stand_in, r["values"], rewards, mask)

    # Two PPO epochs of three minibatches of two samples, each with a differently moved policy.
    ours_all, trl_all = [], []
    g = r["g"]
    for epoch in range(2):
        order = torch.randperm(6, generator=g)
        for start in range(0, 6, 2):
            idx = order[start : start + 2]
            mb = dict(
                old_logprobs=r["logprobs"][idx],
                values=values[idx],
                logits=r["logits"][idx] + 0.3 * torch.randn(2, *r["logits"].shape[1:], generator=g),
                vpreds=values[idx] + 0.4 * torch.randn(2, mask.shape[1], generator=g),
                logprobs=r["logprobs"][idx] + 0.25 * torch.randn(2, mask.shape[1], generator=g),
                mask=mask[idx],
                advantages=advantages[idx],
                returns=returns[idx],
            )
            ours, theirs = run_both(mb)
            ours_all.append(ours[2])
            trl_all.append(theirs[2])

    # trl's step(): stack the minibatch dicts, flatten advantages and ratios, then record_step_stats.
    train_stats = stack_dicts(trl_all)
    train_stats["policy/advantages"] = torch.flatten(train_stats["policy/advantages"]).unsqueeze(0)
    train_stats["policy/ratio"] = torch.flatten(train_stats["policy/ratio"]).unsqueeze(0)
    query_lengths = [3, 5, 4, 2, 6, 3]
    response_lengths = mask.sum(-1).tolist()
    expected = PPOTrainer.record_step_stats(
        None,
        kl_coef=kl_coef,
        scores=r["scores"],
        logprobs=r["logprobs"],
        ref_logprobs=r["ref_logprobs"],
        non_score_reward=non_score_reward,
        train_stats=train_stats,
        masks=mask,
        queries=[torch.zeros(n) for n in query_lengths],
        responses=[torch.zeros(n) for n in response_lengths],
        kls=kls,
    )
    expected = stats_to_np(expected)
    # What log_stats adds (it logs the rewards passed to it: here the scores).
    expected["env/reward_mean"] = torch.mean(r["scores"]).item()
    expected["env/reward_std"] = torch.std(r["scores"]).item()

    timing = {"time/ppo/forward_pass": 1.5, "time/ppo/total": 3.0}
    actual = ppo.step_stats(
        r["scores"], r["logprobs"], non_score_reward, kls, mask, kl_coef, ours_all,
        query_lengths=query_lengths, response_lengths=response_lengths, timing=timing,
    )
    required = [
        "objective/kl", "objective/kl_coef", "objective/entropy", "env/reward_mean", "env/reward_std",
        "ppo/loss/policy", "ppo/loss/value", "ppo/loss/total", "ppo/policy/approxkl", "ppo/policy/policykl",
        "ppo/policy/clipfrac", "ppo/policy/entropy", "ppo/returns/mean", "ppo/val/clipfrac",
        "ppo/val/var_explained", "ppo/val/vpred", "ppo/val/error", "ppo/mean_non_score_reward", "ppo/mean_scores",
    ]
    for key in required:
        assert key in actual, key
    scalar_keys = [k for k, v in expected.items() if getattr(v, "size", 1) == 1]
    assert "ppo/val/var_explained" in scalar_keys and "ppo/policy/advantages_mean" in scalar_keys
    for key in scalar_keys:
        e = np.asarray(expected[key]).item()  # trl keeps the minibatch means as shape (1,) arrays
        assert isinstance(actual[key], float), key
        assert abs(actual[key] - e) <= 1e-6 * max(1.0, abs(e)), (key, actual[key], e)
    assert actual["time/ppo/forward_pass"] == 1.5 and actual["time/ppo/total"] == 3.0


# ----------------------------------------------------------------------------------------------------
# KL controllers, length sampler and value head.
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("horizon", [10000.0, 500.0])
def test_adaptive_kl_controller_matches_trl(horizon):
    g = torch.Generator().manual_seed(0)
    theirs = TrlAdaptiveKLController(0.2, 6.0, horizon)
    ours = ppo.AdaptiveKLController(0.2, 6.0, horizon)
    for step in range(400):
        # KLs below, near and far above the target, so both clip edges and the linear zone are hit.
        current = float(torch.rand((), generator=g) * 14.0)
        n_steps = [1, 64, 128, 256][step % 4]
        theirs.update(current, n_steps)
        ours.update(current, n_steps)
        assert abs(ours.value - float(theirs.value)) <= 1e-6 * abs(float(theirs.value)), step
        if step == 200:  # checkpoint and resume mid-way into a fresh controller
            resumed = ppo.AdaptiveKLController(1.0, 1.0, 1.0)
            resumed.load_state_dict(ours.state_dict())
            ours = resumed
    assert abs(ours.value - 0.2) > 1e-3  # it did move


def test_fixed_kl_controller():
    ctl = ppo.FixedKLController(0.05)
    ctl.update(100.0, 128)
    assert ctl.value == 0.05
    other = ppo.FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_length_sampler_support_and_resume():
    draws = ppo.LengthSampler(3, 9, seed=0)
    values = [draws() for _ in range(600)]
    assert set(values) == set(TrlLengthSampler(3, 9).values)  # [3, 9): max excluded, like trl
    assert all(isinstance(v, int) for v in values)

    a = ppo.LengthSampler(3, 9, seed=5)
    first = [a() for _ in range(10)]
    state = a.state_dict()
    rest = [a() for _ in range(20)]
    b = ppo.LengthSampler(3, 9, seed=123)
    b.load_state_dict(state)
    assert [b() for _ in range(20)] == rest
    c = ppo.LengthSampler(3, 9, seed=5)
    assert [c() for _ in range(10)] == first
    assert first + rest != [ppo.LengthSampler(3, 9, seed=6)() for _ in range(30)]


def test_value_head_matches_trl_forward():
    hidden = torch.randn(3, 7, 16).bfloat16()
    ours = ppo.ValueHead(16, zero_init=False)
    theirs = TrlValueHead(types.SimpleNamespace(hidden_size=16, summary_dropout_prob=0.0))
    theirs.summary.load_state_dict(ours.summary.state_dict())
    out = ours(hidden)
    assert out.shape == (3, 7) and out.dtype == torch.float32
    exact(out, theirs(hidden).squeeze(-1))
    assert out.abs().sum() > 0

    zero = ppo.ValueHead(16)
    exact(zero(hidden), torch.zeros(3, 7))
    (zero(hidden) - 1.0).pow(2).sum().backward()
    assert zero.summary.weight.grad.abs().sum() > 0  # zero init still learns
