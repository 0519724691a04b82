"""The RLHF loop: one PPO step as data.

One model does three jobs (Hu et al.'s LoRA on a frozen, int8 base; TRL's PPO loop):

    policy     = base + LoRA adapters          (trained)
    reference  = base, adapters switched off   (frozen: the model before RL, for the KL penalty)
    value      = ValueHead on the policy's last hidden states   (trained)

One step, with B prompts, P = padded prompt length, N = longest response:

    prompts --tokenizer, left pad--> ids [B, P], mask [B, P]
      --generate (adapters on, KV cache, per-row lengths)--> response tokens [B, N], response mask [B, N]
      --decode--> reward_fn(prompts, responses) --> scores [B]
    seq = ids + response [B, P+N]; the logits at positions P-1 .. P+N-2 predict the N response tokens
      --forward, adapters on--> logprobs [B, N], values [B, N]
      --forward, adapters off--> ref_logprobs [B, N]                    (no second model in memory)
    rewards [B, N] = -beta * KL(logprobs, ref_logprobs), + score at each row's last response token
    GAE(gamma, lam) --> advantages (whitened) [B, N], returns [B, N]
    for each PPO epoch, for each shuffled minibatch:
        forward (adapters on) -> clipped policy loss + vf_coef * clipped value loss
        -> backward into LoRA A/B and the value head only -> clip grads -> AdamW
    beta <- adaptive KL controller(mean KL per sequence)

Everything random draws from generators the trainer owns (prompt choice, response lengths,
sampling, minibatch order, dropout), and checkpoints (resume.py) save their states: a resumed run
continues with the same numbers as one that never stopped.

Under torchrun (distributed.py) each process runs this same code on its share of the rows:
`prompts` is the global batch, the rollout holds this rank's rows, and the few places that need
the whole batch (whitening, statistics, each minibatch's loss, the gradients) go through
distributed.py's helpers, which return their input unchanged in a single process.
"""

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import distributed as dist
from .generate import generate
from .lora import disable_adapters
from .ppo import (AdaptiveKLController, FixedKLController, LengthSampler, ValueHead, compute_advantages,
                  compute_rewards, entropy_from_logits, logprobs_from_logits, ppo_loss, step_stats)


@dataclass
class Rollout:
    """What one step's sampling and scoring produced. B rows (this rank's share under torchrun);
    P prompt columns; N response columns (the longest response of all ranks)."""
    prompts: list[str]
    responses: list[str]
    query_ids: torch.Tensor  # [B, P] left-padded
    query_mask: torch.Tensor  # [B, P]
    response_ids: torch.Tensor  # [B, N] right-padded
    response_mask: torch.Tensor  # [B, N]
    scores: torch.Tensor  # [B] from the reward function
    logprobs: torch.Tensor  # [B, N] policy log pi(token), adapters on
    ref_logprobs: torch.Tensor  # [B, N] adapters off
    values: torch.Tensor  # [B, N] value head
    logits: torch.Tensor | None = None  # [B, N, V] log-softmaxed, kept only for the "full" KL estimator
    ref_logits: torch.Tensor | None = None

    @property
    def seq(self):
        return torch.cat([self.query_ids, self.response_ids], 1)

    @property
    def seq_mask(self):
        return torch.cat([self.query_mask, self.response_mask], 1)


class PPOTrainer:
    """Owns the policy (model with adapters), value head, optimizer, KL controller and RNG state.

    cfg is any object with TrainConfig's PPO fields (train.py's TrainConfig).
    """

    def __init__(self, model, tokenizer, reward_fn, cfg, device="cpu"):
        self.model, self.tokenizer, self.reward_fn, self.cfg, self.device = model, tokenizer, reward_fn, cfg, device
        self.value_head = ValueHead(model.config.hidden_size).to(device)
        params = [p for p in model.parameters() if p.requires_grad] + list(self.value_head.parameters())
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.kl_ctl = (AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.horizon) if cfg.adaptive_kl
                       else FixedKLController(cfg.init_kl_coef))
        self.lengths = LengthSampler(cfg.min_new_tokens, cfg.max_new_tokens + 1, seed=cfg.seed)
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed)  # sampling, prompts, minibatch order
        model.gpt_neox.gradient_checkpointing = cfg.gradient_checkpointing  # recompute blocks in backward
        self.step_count = 0

    # ---------------------------------------------------------------- rollout
    def forward_pass(self, seq, seq_mask, P, N, full_logits=False):
        """seq [b, P+N] -> logprobs [b, N], values [b, N], logits [b, N, V] (log-softmaxed if
        full_logits) and their logsumexp [b, N].

        Only the N positions that predict response tokens get logits: the LM head is the
        biggest matmul of a small model, and the prompt's logits are never used.
        """
        out = self.model(seq, seq_mask, logits_positions=slice(P - 1, P + N - 1))
        logits = out.logits.float()
        if self.cfg.temperature != 1.0:
            logits = logits / self.cfg.temperature  # the distribution that was sampled
        lse = torch.logsumexp(logits, dim=-1)  # [b, N], shared by log-probs and entropy
        logprobs = logprobs_from_logits(logits, seq[:, P:], lse)
        values = self.value_head(out.hidden_states[:, P - 1:P + N - 1])
        return logprobs, values, (logits - lse.unsqueeze(-1) if full_logits else logits), lse

    @torch.no_grad()
    def score_pass(self, seq, seq_mask, P, N):
        """Policy and reference passes over the whole batch, in minibatch-sized chunks (the same
        shapes the update will use, so at step 0 the update's ratio is exactly 1)."""
        full = self.cfg.kl_estimator == "full"
        lp, rlp, vals, lg, rlg = [], [], [], [], []
        for rows in torch.arange(seq.shape[0]).split(self.cfg.mini_batch_size // dist.world_size()):
            logprobs, values, logits, _ = self.forward_pass(seq[rows], seq_mask[rows], P, N, full)
            with disable_adapters(self.model):
                ref_logprobs, _, ref_logits, _ = self.forward_pass(seq[rows], seq_mask[rows], P, N, full)
            lp.append(logprobs), rlp.append(ref_logprobs), vals.append(values)
            if full:
                lg.append(logits), rlg.append(ref_logits)
        cat = torch.cat
        return cat(lp), cat(rlp), cat(vals), (cat(lg) if full else None), (cat(rlg) if full else None)

    @torch.no_grad()
    def sample(self, prompts: list[str], limits, generator: torch.Generator | None = None, noise=None):
        """Tokenize, left-pad and sample responses with the config's sampling settings (eval mode).
        limits: an int or a [B] tensor of response lengths; the randomness: noise [B, max_new_tokens]
        uniform numbers (generate.py), or a generator that draws that table up front. Returns ids,
        mask [B, P], tokens, response mask [B, N] and the decoded responses.

        Samples --generation-batch-size rows at a time (default: --batch-size rows, so the evaluation's
        many prompts need no more memory than a rollout): the KV cache grows with the rows sampled
        together. Each chunk keeps the whole batch's left padding, which changes no logit (positions
        come from the mask), and row i always samples with noise[i], so the chunks' responses simply
        stack: the samples do not depend on the chunk size.
        """
        cfg, tok = self.cfg, self.tokenizer
        self.model.eval()
        ids, mask = tok.encode_batch(prompts, max_length=cfg.max_prompt_tokens)
        ids, mask = ids.to(self.device), mask.to(self.device)
        limits = torch.as_tensor(limits, device=self.device).expand(len(prompts))  # [B]
        if noise is None:
            noise = torch.rand(len(prompts), cfg.max_new_tokens, generator=generator, device=self.device)
        chunk = cfg.generation_batch_size or cfg.batch_size
        tokens, resp_mask = [], []
        for rows in torch.arange(len(prompts)).split(chunk):
            t, m = generate(self.model, ids[rows], mask[rows], limits[rows], min_new_tokens=cfg.min_new_tokens,
                            temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                            eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, noise=noise[rows])
            tokens.append(t), resp_mask.append(m)
        N = max(t.shape[1] for t in tokens)  # chunks may stop at different lengths: pad to the longest
        tokens = torch.cat([pad_columns(t, N, tok.pad_id) for t in tokens])
        resp_mask = torch.cat([pad_columns(m, N, 0) for m in resp_mask])
        return ids, mask, tokens, resp_mask, tok.decode_batch(tokens.cpu(), resp_mask.cpu())

    @torch.no_grad()
    def rollout(self, prompts: list[str]) -> Rollout:
        """Sample, score and run the policy and reference passes for this rank's rows of `prompts`
        (all of them in one process). Lengths and sampling noise are drawn for the whole batch on
        every rank, so row i gets the same ones whichever rank holds it."""
        limits = torch.tensor([self.lengths() for _ in prompts], device=self.device)  # [B]
        noise = torch.rand(len(prompts), self.cfg.max_new_tokens, generator=self.gen, device=self.device)
        mine = dist.my_rows(len(prompts))
        prompts, limits, noise = prompts[mine], limits[mine], noise[mine]
        ids, mask, tokens, resp_mask, responses = self.sample(prompts, limits, noise=noise)
        # every rank pads its responses to the longest of all ranks: the gathered [B, N] tensors need one N
        N = dist.max_over_ranks(tokens.shape[1])
        tokens, resp_mask = pad_columns(tokens, N, self.tokenizer.pad_id), pad_columns(resp_mask, N, 0)
        # the reward is user code: if it raises on one rank, every rank stops here (distributed.guarded)
        scores = dist.guarded(self.reward_fn, prompts, responses).to(self.device)
        P = ids.shape[1]
        seq, seq_mask = torch.cat([ids, tokens], 1), torch.cat([mask, resp_mask], 1)
        logprobs, ref_logprobs, values, logits, ref_logits = self.score_pass(seq, seq_mask, P, N)
        return Rollout(prompts, responses, ids, mask, tokens, resp_mask, scores, logprobs, ref_logprobs, values,
                       logits, ref_logits)

    # ---------------------------------------------------------------- update
    def update(self, r: Rollout, old_values, advantages, returns) -> list[dict]:
        """PPO epochs over the batch. r: this rank's rollout; old_values, advantages, returns: [B, N] for
        the whole batch (compute_advantages' outputs). Returns ppo_loss's stats, one dict per minibatch."""
        cfg = self.cfg
        seq, seq_mask = r.seq, r.seq_mask
        old_logprobs, mask = dist.gather_rows(r.logprobs), dist.gather_rows(r.response_mask).float()  # [B, N]
        P, N = r.query_ids.shape[1], r.response_ids.shape[1]
        first = dist.my_rows(old_logprobs.shape[0]).start  # global index of this rank's first row
        self.model.train()  # only LoRA dropout (if any) and the model's own dropout change with this
        all_stats = []
        for _ in range(cfg.ppo_epochs):
            for rows in minibatches(old_logprobs.shape[0], cfg.mini_batch_size, self.gen, self.device):
                mine = rows[dist.my_rows(len(rows))] - first  # this rank's share of the minibatch, local indices
                logprobs, vpreds, logits, lse = self.forward_pass(seq[mine], seq_mask[mine], P, N)
                with torch.no_grad():
                    entropy = entropy_from_logits(logits, lse)
                # The whole minibatch's numbers on every rank, gradients only through this rank's rows: the
                # loss is the single-process loss, and summing the ranks' gradients gives its gradient.
                logprobs, vpreds, entropy = (dist.gather_rows(t) for t in (logprobs, vpreds, entropy))
                pg_loss, vf_loss, stats = ppo_loss(
                    old_logprobs[rows], old_values[rows], logprobs, vpreds, entropy, mask[rows], advantages[rows],
                    returns[rows], cfg.cliprange, cfg.cliprange_value, cfg.vf_coef, cfg.ratio_threshold)
                (pg_loss + vf_loss).backward()
                dist.sum_gradients(self.params)
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                all_stats.append(stats)
            # trl's early stop, checked once per epoch on its last minibatch: the policy moved too far
            # from the one that sampled the data
            if cfg.early_stop_kl and all_stats[-1]["policy/policykl"] > 1.5 * cfg.early_stop_kl:
                break
        self.model.eval()
        return all_stats

    def step(self, prompts: list[str]) -> tuple[dict, Rollout]:
        """One PPO step on these prompts (the global batch: the same list on every rank).
        Returns (stats under trl's names, of the global batch; this rank's rollout)."""
        cfg, t0 = self.cfg, time.time()
        r = self.rollout(prompts)
        t1 = time.time()
        kl_coef = self.kl_ctl.value
        mask = r.response_mask.float()
        logprobs, ref = (r.logits, r.ref_logits) if cfg.kl_estimator == "full" else (r.logprobs, r.ref_logprobs)
        rewards, non_score, kls = compute_rewards(r.scores, logprobs, ref, mask, kl_coef, cfg.kl_estimator)
        # whitening and statistics see the whole batch: gather every rank's rows ([b, N] -> [B, N])
        scores, logprobs, values, mask, rewards, non_score, kls, query_lengths = (dist.gather_rows(t) for t in (
            r.scores, r.logprobs, r.values, mask, rewards, non_score, kls, r.query_mask.sum(1)))
        values, advantages, returns = compute_advantages(values, rewards, mask, cfg.gamma, cfg.lam)
        t2 = time.time()
        train_stats = self.update(r, values, advantages, returns)
        t3 = time.time()
        timing = {"time/ppo/rollout": t1 - t0, "time/ppo/compute_advantages": t2 - t1,
                  "time/ppo/optimize_step": t3 - t2, "time/ppo/total": t3 - t0}
        stats = step_stats(scores, logprobs, non_score, kls, mask, kl_coef, train_stats,
                           query_lengths=query_lengths.tolist(), response_lengths=mask.sum(1).tolist(),
                           timing=timing)
        self.kl_ctl.update(stats["objective/kl"], len(prompts))
        self.step_count += 1
        return stats, r


def pad_columns(t: torch.Tensor, N: int, value) -> torch.Tensor:
    """Right-pad a [b, n] tensor of responses (or their mask) to [b, N] with `value`."""
    return F.pad(t, (0, N - t.shape[1]), value=value)


def minibatches(B: int, M: int, generator: torch.Generator, device="cpu") -> torch.Tensor:
    """One epoch's shuffled minibatches: [B / M, M] global row indices, each row of the batch once.

    trl shuffles all B rows and cuts them into minibatches. We cut the batch into M strata of S = B / M
    consecutive rows, shuffle within each stratum, and minibatch k takes the k-th shuffled row of every
    stratum, in stratum order. Why: with W ranks each holding B / W consecutive rows (M / W whole strata),
    every minibatch holds exactly M / W rows of every rank, in rank order. So the work is balanced, and the
    minibatches are the same whatever the number of ranks. (The rows of a batch are interchangeable, random
    prompts with independent samples, so this mixes them as well as one global shuffle.)
    """
    S = B // M
    order = torch.rand(M, S, generator=generator, device=device).argsort(dim=1)  # a shuffle per stratum [M, S]
    rows = order + S * torch.arange(M, device=device)[:, None]  # global rows: stratum s holds s*S .. s*S+S-1
    return rows.T  # [S, M]: minibatch k = the k-th shuffled row of every stratum
