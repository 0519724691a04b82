"""RLOO and GRPO (group_baselines.py) against their oracles, and the runs that use them.

RLOO: trl 0.11.4's RLOOTrainer.train computes its advantages and loss inline, in a loop that needs a dataset,
an accelerator, a reward model and a generation pass; `trl_rloo` below is its step's math line for line
(rloo_trainer.py, "4. compute rewards" to "pg_loss = pg_loss_max.mean()"), with trl's own INVALID_LOGPROB and
first_true_indices, on trl's batch layout ([K, n]: its queries are `repeat(K, 1)`), fed the same tensors as
ours ([n, K]). GRPO: `paper_grpo` is equation (3) and section 4.1.2 of DeepSeekMath (Shao et al. 2024) written
out with loops over groups, responses and tokens.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from minirlhf.group_baselines import grpo_advantages, grpo_loss, rloo_advantages, rloo_loss
from minirlhf.options import TrainConfig
from minirlhf.ppo import compute_rewards
from minirlhf.train import run
from tiny import run_folder_inputs

PAD = 1


def ragged(n, K, N, seed):
    """Our layout: K samples of each of n prompts side by side. Responses of 1..N tokens, right-padded with PAD;
    per-token log-probs of the sampling policy, the reference and the new policy; scores."""
    g = torch.Generator().manual_seed(seed)
    B = n * K
    lengths = torch.randint(1, N + 1, (B,), generator=g)
    lengths[0], lengths[1] = N, 1  # a full row and a one-token row
    tokens = torch.randint(2, 50, (B, N), generator=g)
    mask = torch.arange(N)[None, :] < lengths[:, None]
    tokens[~mask] = PAD
    old = -torch.rand(B, N, generator=g) * 3
    ref = old + torch.randn(B, N, generator=g) * 0.3
    new = (old + torch.randn(B, N, generator=g) * 0.1).requires_grad_()  # a moved policy: some ratios clip
    scores = torch.randn(B, generator=g) * 2
    return dict(tokens=tokens, mask=mask.float(), old=old, ref=ref, new=new, scores=scores)


def to_trl(x, n, K):
    """Our rows [n * K] (prompt j's sample k at j*K + k) -> trl's rows (k * n + j)."""
    order = torch.tensor([j * K + k for k in range(K) for j in range(n)])
    return x[order]


def trl_rloo(d, n, K, kl_coef, cliprange, rows):
    """trl 0.11.4 RLOOTrainer's advantages and the loss of one micro-batch `rows` (trl row indices)."""
    from trl.trainer.rloo_trainer import INVALID_LOGPROB
    from trl.trainer.utils import first_true_indices

    responses, logprobs, ref_logprobs, scores = (to_trl(d[k], n, K) for k in ("tokens", "old", "ref", "scores"))
    new_all = to_trl(d["new"], n, K)
    sequence_lengths = first_true_indices(responses == PAD) - 1
    response_idxs = torch.arange(responses.shape[1], device=responses.device).repeat(responses.shape[0], 1)
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
    logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)
    ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)
    kl = logprobs - ref_logprobs
    non_score_reward = (-kl_coef * kl).sum(1)
    rlhf_reward = scores + non_score_reward
    rlhf_reward = rlhf_reward.reshape(K, -1)
    baseline = (rlhf_reward.sum(0) - rlhf_reward) / (K - 1)
    advantages = rlhf_reward - baseline
    advantages = advantages.flatten()

    mb_advantage, mb_logprobs = advantages[rows], logprobs[rows]
    new_logprobs = torch.masked_fill(new_all[rows], padding_mask[rows], INVALID_LOGPROB)
    new_logprobs = new_logprobs.sum(1)
    mb_logprobs = mb_logprobs.sum(1)
    logprobs_diff = new_logprobs - mb_logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -mb_advantage * ratio
    pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss_max = torch.max(pg_losses, pg_losses2)
    pg_loss = pg_loss_max.mean()
    clipfrac = (pg_losses2 > pg_losses).float().mean()
    return rlhf_reward.flatten(), advantages, pg_loss, clipfrac, 0.5 * (logprobs_diff**2).mean()


@pytest.mark.parametrize("n, K", [(3, 4), (4, 2), (2, 5)])
def test_rloo_equals_trl_rlootrainer(n, K):
    d = ragged(n, K, N=7, seed=n * 10 + K)
    kl_coef, cliprange = 0.05, 0.2
    B = n * K
    _, non_score, _ = compute_rewards(d["scores"], d["old"], d["ref"], d["mask"], kl_coef)  # what the trainer calls
    ours_reward, ours_adv = rloo_advantages(d["scores"], non_score, d["mask"], K)
    clipped = []
    for rows_ours in (torch.arange(B), torch.tensor([0, 1, B - 1, 3])):  # the whole batch, a shuffled minibatch
        trl_position = {int(t): i for i, t in enumerate(to_trl(torch.arange(B), n, K))}  # our row -> trl row
        rows_trl = torch.tensor([trl_position[int(r)] for r in rows_ours])
        trl_reward, trl_adv, trl_loss, trl_clip, trl_approxkl = trl_rloo(d, n, K, kl_coef, cliprange, rows_trl)
        torch.testing.assert_close(to_trl(ours_reward, n, K), trl_reward, rtol=0, atol=1e-6)
        torch.testing.assert_close(to_trl(ours_adv, n, K), trl_adv, rtol=0, atol=1e-6)
        (trl_grad,) = torch.autograd.grad(trl_loss, d["new"])

        loss, stats = rloo_loss(d["old"][rows_ours], d["new"][rows_ours], d["mask"][rows_ours], ours_adv[rows_ours],
                                cliprange)
        (grad,) = torch.autograd.grad(loss, d["new"])
        assert abs(loss.item() - trl_loss.item()) <= 1e-6
        torch.testing.assert_close(grad, trl_grad, rtol=0, atol=1e-6)  # zero on padding, equal elsewhere
        assert stats["policy/clipfrac"].item() == trl_clip.item()
        assert abs(stats["policy/approxkl"].item() - trl_approxkl.item()) <= 1e-6
        clipped.append(stats["policy/clipfrac"].item())
    assert 0 < clipped[0] < 1  # over the whole batch some sequence ratios are clipped, some not
    # the leave-one-out advantages of a prompt sum to zero: K A_i = K R_i - K/(K-1) (S - R_i) sums to 0
    assert torch.allclose(ours_adv.view(n, K).sum(1), torch.zeros(n), atol=1e-5)


def paper_grpo(d, K, beta, eps_clip, eps_std, scale="group", loss_type="grpo", L=None):
    """DeepSeekMath eq. (3) with outcome supervision (4.1.2): A_i = (r_i - mean(r)) / std(r) for every token of
    o_i, J = 1/G sum_i 1/|o_i| sum_t {min(ratio A, clip(ratio) A) - beta D_KL}, D_KL = pi_ref/pi - log(pi_ref/pi)
    - 1; the loss is -J, averaged over the groups. Written with python loops, one token at a time.
    With Dr. GRPO's and trl's variants: scale "batch" divides by the std of all B scores, "none" by nothing
    (Liu et al. 2025, eq. 3: A_i = r_i - mean(r)); loss_type "dr_grpo" replaces 1/|o_i| by 1/L, "bnpo" averages
    over every response token of the batch."""
    B, N = d["mask"].shape
    n = B // K
    every = [d["scores"][row].item() for row in range(B)]
    batch_mean = sum(every) / B
    batch_std = math.sqrt(sum((x - batch_mean) ** 2 for x in every) / (B - 1))
    tokens = sum(int(d["mask"][row].sum().item()) for row in range(B))
    total, advantages = 0.0, []
    for j in range(n):
        r = every[j * K:(j + 1) * K]
        mean = sum(r) / K
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / (K - 1))
        divisor = {"group": std + eps_std, "batch": batch_std + eps_std, "none": 1.0}[scale]
        for i in range(K):
            row = j * K + i
            A = (r[i] - mean) / divisor
            advantages.append(A)
            length = int(d["mask"][row].sum().item())
            terms = 0.0
            for t in range(length):
                logp, old, ref = d["new"][row, t], d["old"][row, t], d["ref"][row, t]
                ratio = torch.exp(logp - old)
                clipped = torch.clamp(ratio, 1 - eps_clip, 1 + eps_clip)
                kl = torch.exp(ref - logp) - (ref - logp) - 1
                terms = terms + torch.min(ratio * A, clipped * A) - beta * kl
            if loss_type == "grpo":
                total = total + terms / length / B  # 1/G sum_i 1/|o_i| ..., then the mean over the n groups
            elif loss_type == "dr_grpo":
                total = total + terms / L / B
            else:  # bnpo
                total = total + terms / tokens
    return -total, torch.tensor(advantages)


@pytest.mark.parametrize("K", [2, 4])
def test_grpo_equals_the_papers_equations(K):
    d = ragged(3, K, N=6, seed=K)
    beta, cliprange = 0.04, 0.2
    adv = grpo_advantages(d["scores"], K)
    loss, stats = grpo_loss(d["old"], d["new"], d["ref"], d["mask"], adv, cliprange, beta)
    expected_loss, expected_adv = paper_grpo(d, K, beta, cliprange, 1e-4)
    torch.testing.assert_close(adv, expected_adv, rtol=0, atol=1e-6)
    assert abs(loss.item() - expected_loss.item()) <= 1e-6
    (grad,) = torch.autograd.grad(loss, d["new"])
    (expected_grad,) = torch.autograd.grad(expected_loss, d["new"])
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-6)
    assert (grad[d["mask"] == 0] == 0).all()  # padding gets no gradient
    assert stats["policy/kl_ref"].item() > 0  # k3 is never negative, and the reference differs here
    # a group whose scores are all equal has nothing to learn from: advantages 0, not nan
    assert grpo_advantages(torch.ones(2 * K), K).abs().max().item() == 0


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_grpo_variants_equal_their_equations(scale, loss_type):
    """--scale-rewards and --loss-type (trl GRPOConfig's names; Dr. GRPO's unscaled advantages and constant
    length): advantages, loss and gradient equal the loop transcription, ragged responses included."""
    K, L = 4, 8  # L: dr_grpo's constant, longer than any response here (N = 6) as --max-new-tokens is
    d = ragged(3, K, N=6, seed=7)
    adv = grpo_advantages(d["scores"], K, scale=scale)
    loss, _ = grpo_loss(d["old"], d["new"], d["ref"], d["mask"], adv, 0.2, 0.04, loss_type, L)
    expected_loss, expected_adv = paper_grpo(d, K, 0.04, 0.2, 1e-4, scale, loss_type, L)
    torch.testing.assert_close(adv, expected_adv, rtol=0, atol=1e-6)
    assert abs(loss.item() - expected_loss.item()) <= 1e-6
    (grad,) = torch.autograd.grad(loss, d["new"])
    (expected_grad,) = torch.autograd.grad(expected_loss, d["new"])
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-6)
    # the three scales differ on these scores, and so do the three averages on these ragged lengths
    others = [grpo_advantages(d["scores"], K, scale=s) for s in ("group", "batch", "none") if s != scale]
    assert all((adv - o).abs().max() > 1e-3 for o in others)
    other_losses = [grpo_loss(d["old"], d["new"], d["ref"], d["mask"], adv, 0.2, 0.04, t, L)[0]
                    for t in ("grpo", "bnpo", "dr_grpo") if t != loss_type]
    assert all(abs(loss.item() - o.item()) > 1e-4 for o in other_losses)


# ---------------------------------------------------------------------------------------------- runs

PROMPTS = ["the movie was", "hello world", "a dull film", "I loved every", "this is a", "boring plot"]
SMALL = dict(steps=3, batch_size=8, mini_batch_size=4, ppo_epochs=2, min_new_tokens=2, max_new_tokens=4,
             eval_size=2, save_every=1, seed=0, reward="toyreward:score", lr=1e-2, init_kl_coef=0.05,
             lr_schedule="constant")
REWARD = "def score(prompts, responses):\n    return [(sum(map(ord, r)) % 11) / 10 - 0.5 for r in responses]\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # a reward with spread: every step has a real gradient
    return run_folder_inputs(tmp_path_factory.mktemp("groups"), PROMPTS, **{"toyreward.py": REWARD})


@pytest.fixture(autouse=True)
def in_tiny(tiny, monkeypatch):
    monkeypatch.chdir(tiny)  # --reward toyreward:score imports from the working directory
    monkeypatch.syspath_prepend(str(tiny))


def small_run(tiny, out, **kw):
    return run(TrainConfig.from_flags(model=str(tiny / "model"), prompts=str(tiny / "prompts.txt"), out=str(out),
                                      **{**SMALL, **kw}), progress=False)


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algorithm", ["rloo", "grpo"])
def test_a_group_run_has_no_value_head_and_resumes_exactly(tiny, tmp_path, algorithm):
    """A 3-step run: no value head anywhere (not trained, not saved); the K copies of each prompt are adjacent;
    resumed from its step-1 checkpoint (which has no value head file) it gives the same steps 2 and 3."""
    summary = small_run(tiny, tmp_path / "full", algorithm=algorithm, group_size=2)
    full = tmp_path / "full"
    assert summary["algorithm"] == algorithm and summary["group_size"] == 2
    assert not (full / "value_head.safetensors").exists()
    assert not any(p.name == "value_head.safetensors" for p in (full / "checkpoints").rglob("*"))
    assert json.loads((full / "config.json").read_text())["group_size"] == 2
    rows = metrics(full)
    assert "ppo/val/var_explained" not in rows[0] and "ppo/loss/value" not in rows[0]
    assert ("objective/rlhf_reward" in rows[0]) == (algorithm == "rloo")

    part = tmp_path / "part"
    small_run(tiny, part, algorithm=algorithm, group_size=2, steps=1)
    run(TrainConfig.from_flags(model=str(tiny / "model"), prompts=str(tiny / "prompts.txt"), resume=str(part),
                               **{**SMALL, "algorithm": algorithm, "group_size": 2}), progress=False)
    for x, y in zip(rows, metrics(part), strict=True):
        for key in x:
            if not key.startswith("time/"):
                assert y[key] == pytest.approx(x[key], rel=1e-6, abs=1e-7), (x["step"], key)
    lora_b = [v for k, v in load_file(full / "adapter" / "adapter_model.safetensors").items() if "lora_B" in k]
    assert max(v.abs().max().item() for v in lora_b) > 1e-3  # it trained (B starts at 0)


def test_the_batch_holds_k_adjacent_copies_of_each_prompt(tiny, tmp_path, monkeypatch):
    from minirlhf import trainer as trainer_module

    seen = []
    step = trainer_module.PPOTrainer.step
    monkeypatch.setattr(trainer_module.PPOTrainer, "step", lambda self, prompts: seen.append(prompts) or step(self, prompts))
    small_run(tiny, tmp_path / "r", algorithm="rloo", group_size=4, steps=1)
    (prompts,) = seen
    assert len(prompts) == 8 and prompts[0:4] == [prompts[0]] * 4 and prompts[4:8] == [prompts[4]] * 4
    assert prompts[0] != prompts[4]  # two different prompts (drawn without replacement)


def test_the_grpo_flags_reach_its_advantages_and_loss(tiny, tmp_path, monkeypatch):
    """--scale-rewards and --loss-type are what the run's advantages and every minibatch's loss use, with
    --max-new-tokens as dr_grpo's constant."""
    from minirlhf import trainer as trainer_module

    calls = []
    advantages, loss = trainer_module.grpo_advantages, trainer_module.grpo_loss
    monkeypatch.setattr(trainer_module, "grpo_advantages",
                        lambda scores, K, **kw: calls.append(("advantages", kw)) or advantages(scores, K, **kw))
    monkeypatch.setattr(trainer_module, "grpo_loss",
                        lambda *a: calls.append(("loss", a[-2:])) or loss(*a))
    small_run(tiny, tmp_path / "r", algorithm="grpo", group_size=2, steps=1, scale_rewards="none",
              loss_type="dr_grpo")
    assert calls[0] == ("advantages", {"scale": "none"})
    assert calls[1:] == [("loss", ("dr_grpo", SMALL["max_new_tokens"]))] * 4  # 2 epochs x 2 minibatches

