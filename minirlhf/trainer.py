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

--algorithm rloo | grpo (group_baselines.py) keep this loop and change two things: the advantages come
from the other samples of the same prompt (the batch holds K samples of each of B / K prompts, side by side)
instead of GAE on a value head, and the loss is theirs; no value head is built, trained or saved.
"""

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import distributed as dist
from .generate import generate
from .lora import disable_adapters
from .group_baselines import grpo_advantages, grpo_loss, rloo_advantages, rloo_loss
from .options import AlgorithmConfig, OptimizerConfig, PPOConfig, SamplingConfig, ShapingConfig
from .ppo import (AdaptiveKLController, FixedKLController, LengthSampler, ValueHead, compute_advantages,
                  compute_rewards, entropy_from_logits, logprobs_from_logits, masked_mean, ppo_loss, step_stats,
                  token_logprobs)
from .shaping import RunningMoments, shape_scores


@dataclass
class Pass:
    """One forward pass over b sequences [b, P+N], read at the N positions that predict response tokens."""
    logprobs: torch.Tensor  # [b, N] log pi(token) at the sampling temperature, fp32
    values: torch.Tensor | None  # [b, N] the value head (None: rloo / grpo have none)
    entropy: torch.Tensor  # [b, N] of pi at each position (no gradient)
    logits: torch.Tensor | None = None  # [b, N, V] log-softmaxed fp32, only for the "full" KL estimator


@dataclass
class Samples:
    """Sampled responses to B prompts: the tokenized prompts, the response tokens, and the decoded text."""
    ids: torch.Tensor  # [B, P] prompt tokens, left-padded
    mask: torch.Tensor  # [B, P]
    tokens: torch.Tensor  # [B, N] response tokens, right-padded
    response_mask: torch.Tensor  # [B, N]
    responses: list[str]


@dataclass
class Rollout:
    """What one step's sampling and scoring produced. b rows (this rank's share under torchrun; all B in one
    process); P prompt columns; N response columns (the longest response of all ranks)."""
    prompts: list[str]
    responses: list[str]
    query_ids: torch.Tensor  # [b, P] left-padded
    query_mask: torch.Tensor  # [b, P]
    response_ids: torch.Tensor  # [b, N] right-padded
    response_mask: torch.Tensor  # [b, N]
    scores: torch.Tensor  # [b] from the reward function
    logprobs: torch.Tensor  # [b, N] policy log pi(token), adapters on
    ref_logprobs: torch.Tensor  # [b, N] adapters off
    values: torch.Tensor | None  # [b, N] value head (None for rloo / grpo)
    logits: torch.Tensor | None = None  # [b, N, V] log-softmaxed, kept only for the "full" KL estimator
    ref_logits: torch.Tensor | None = None

    @property
    def seq(self):
        return torch.cat([self.query_ids, self.response_ids], 1)

    @property
    def seq_mask(self):
        return torch.cat([self.query_mask, self.response_mask], 1)


@dataclass
class Batch:
    """The whole batch, every rank's rows in rank order, gathered once (Batch.gather): [B, N] unless noted. What
    the advantages, the update's minibatches and the logged statistics read."""
    raw_scores: torch.Tensor  # [B] from the reward function
    scores: torch.Tensor  # [B] what the reward adds: raw_scores after PPO's reward shaping (shaping.py), if any
    logprobs: torch.Tensor  # the sampling policy's log-probs: the update's "old" log-probs
    mask: torch.Tensor  # response tokens, float
    rewards: torch.Tensor  # -beta * KL per token, + the score at each row's last token
    non_score: torch.Tensor  # the KL part alone
    kls: torch.Tensor  # the per-token KL estimate
    query_lengths: torch.Tensor  # [B]
    values: torch.Tensor | None  # the value head's predictions: the update's "old" values (PPO)
    ref_logprobs: torch.Tensor | None = None  # the reference's log-probs (GRPO's KL term)
    advantages: torch.Tensor | None = None  # PPO: GAE, whitened [B, N]; rloo / grpo: one per sequence [B]
    returns: torch.Tensor | None = None  # PPO: advantages + values, before whitening
    rlhf_reward: torch.Tensor | None = None  # rloo: score - beta * sum_t KL_t [B]

    @classmethod
    def gather(cls, r: Rollout, raw_scores, scores, rewards, non_score, kls, with_ref: bool) -> "Batch":
        """This rank's rows of the rollout and its KL-shaped rewards -> the global batch (the scores are
        gathered already). The single place where rows travel between ranks before the update."""
        g = dist.gather_rows
        logprobs, mask, rewards, non_score, kls, query_lengths = (g(t) for t in (
            r.logprobs, r.response_mask.float(), rewards, non_score, kls, r.query_mask.sum(1)))
        values = g(r.values) if r.values is not None else None
        ref = g(r.ref_logprobs) if with_ref else None
        return cls(raw_scores, scores, logprobs, mask, rewards, non_score, kls, query_lengths, values, ref)


class PPOTrainer:
    """Owns the policy (model with adapters), value head, optimizer, KL controller and RNG state.

    ppo, optim and sampling are the sections of train.py's TrainConfig that a step reads (options.py); seed
    starts the trainer's own generators.
    """

    def __init__(self, model, tokenizer, reward_fn, ppo: PPOConfig, optim: OptimizerConfig,
                 sampling: SamplingConfig, seed: int = 0, device="cpu", optimizer_steps: int = 0,
                 algorithm: AlgorithmConfig | None = None, shaping: ShapingConfig | None = None):
        self.model, self.tokenizer, self.reward_fn, self.device = model, tokenizer, reward_fn, device
        self.ppo, self.optim, self.sampling = ppo, optim, sampling
        self.algorithm, self.shaping = algorithm or AlgorithmConfig(), shaping or ShapingConfig()
        self.K = self.algorithm.group()  # samples per prompt, adjacent rows of the batch
        # only PPO has a critic: rloo and grpo take their baseline from the other samples of the prompt
        self.value_head = ValueHead(model.config.hidden_size).to(device) if self.algorithm.algorithm == "ppo" else None
        head = list(self.value_head.parameters()) if self.value_head is not None else []
        params = [p for p in model.parameters() if p.requires_grad] + head
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas(), eps=optim.adam_eps,
                                           weight_decay=optim.weight_decay)
        self.scheduler = lr_scheduler(self.optimizer, optim, optimizer_steps)  # None: a constant learning rate
        self.kl_ctl = (AdaptiveKLController(ppo.init_kl_coef, ppo.target_kl, ppo.horizon) if ppo.adaptive_kl
                       else FixedKLController(ppo.init_kl_coef))
        self.lengths = LengthSampler(sampling.min_new_tokens, sampling.max_new_tokens + 1, seed=seed)
        self.gen = torch.Generator(device=device).manual_seed(seed)  # sampling, prompts, minibatch order
        self.running = RunningMoments()  # --use-score-scaling's running mean and std of the scores
        self.step_count = 0

    @classmethod
    def for_config(cls, model, tokenizer, reward_fn, cfg, device="cpu") -> "PPOTrainer":
        """The trainer for a whole options.TrainConfig: its ppo, optim and sampling sections and the run's seed."""
        return cls(model, tokenizer, reward_fn, cfg.ppo, cfg.optim, cfg.sampling, cfg.run.seed, device,
                   cfg.optimizer_steps(), cfg.algorithm, cfg.shaping)

    # ---------------------------------------------------------------- the step
    def step(self, prompts: list[str]) -> tuple[dict, Rollout]:
        """One PPO step on these prompts (the global batch: the same list on every rank):
        rollout -> KL-shaped rewards -> the gathered batch with its advantages -> update.
        Returns (stats under trl's names, of the global batch; this rank's rollout)."""
        t0 = time.time()
        r = self.rollout(prompts)
        t1 = time.time()
        kl_coef = self.kl_ctl.value
        batch = self.advantages(r, kl_coef)
        t2 = time.time()
        train_stats = self.update(r, batch, kl_coef)
        t3 = time.time()
        timing = {"time/ppo/rollout": t1 - t0, "time/ppo/compute_advantages": t2 - t1,
                  "time/ppo/optimize_step": t3 - t2, "time/ppo/total": t3 - t0}
        stats = step_stats(batch.scores, batch.logprobs, batch.non_score, batch.kls, batch.mask, kl_coef, train_stats,
                           query_lengths=batch.query_lengths.tolist(), response_lengths=batch.mask.sum(1).tolist(),
                           timing=timing, raw_scores=batch.raw_scores)
        if batch.rlhf_reward is not None:
            stats["objective/rlhf_reward"] = batch.rlhf_reward.mean().item()  # trl RLOOTrainer's name
        self.kl_ctl.update(stats["objective/kl"], len(prompts))
        self.step_count += 1
        return stats, r

    # ---------------------------------------------------------------- rollout
    @torch.no_grad()
    def rollout(self, prompts: list[str]) -> Rollout:
        """Sample, score and run the policy and reference passes for this rank's rows of `prompts`
        (all of them in one process). Lengths and sampling noise are drawn for the whole batch on
        every rank, so row i gets the same ones whichever rank holds it."""
        limits = torch.tensor([self.lengths() for _ in prompts], device=self.device)  # [B]
        noise = torch.rand(len(prompts), self.sampling.max_new_tokens, generator=self.gen, device=self.device)
        mine = dist.my_rows(len(prompts))
        prompts, limits, noise = prompts[mine], limits[mine], noise[mine]
        out = self.sample(prompts, limits, noise=noise)
        # every rank pads its responses to the longest of all ranks: the gathered [B, N] tensors need one N
        N = dist.max_over_ranks(out.tokens.shape[1])
        tokens, resp_mask = pad_columns(out.tokens, N, self.tokenizer.pad_id), pad_columns(out.response_mask, N, 0)
        # the reward is user code: if it raises on one rank, every rank stops here (distributed.guarded)
        scores = dist.guarded(self.reward_fn, prompts, out.responses).to(self.device)
        P = out.ids.shape[1]
        seq, seq_mask = torch.cat([out.ids, tokens], 1), torch.cat([out.mask, resp_mask], 1)
        policy, reference = self.score_pass(seq, seq_mask, P, N)
        return Rollout(prompts, out.responses, out.ids, out.mask, tokens, resp_mask, scores, policy.logprobs,
                       reference.logprobs, policy.values, policy.logits, reference.logits)

    @torch.no_grad()
    def sample(self, prompts: list[str], limits, generator: torch.Generator | None = None, noise=None) -> Samples:
        """Tokenize, left-pad and sample responses with the sampling settings (eval mode).
        limits: an int or a [B] tensor of response lengths; the randomness: noise [B, max_new_tokens]
        uniform numbers (generate.py), or a generator that draws that table up front.

        Samples --generation-batch-size rows at a time (default: --batch-size rows, so the evaluation's
        many prompts need no more memory than a rollout): the KV cache grows with the rows sampled
        together. Each chunk keeps the whole batch's left padding, which changes no logit (positions
        come from the mask), and row i always samples with noise[i], so the chunks' responses simply
        stack: the samples do not depend on the chunk size.
        """
        s, tok = self.sampling, self.tokenizer
        self.model.eval()
        ids, mask = tok.encode_batch(prompts, max_length=s.max_prompt_tokens)
        ids, mask = ids.to(self.device), mask.to(self.device)
        limits = torch.as_tensor(limits, device=self.device).expand(len(prompts))  # [B]
        if noise is None:
            noise = torch.rand(len(prompts), s.max_new_tokens, generator=generator, device=self.device)
        chunk = s.generation_batch_size or self.ppo.batch_size
        tokens, resp_mask = [], []
        for rows in torch.arange(len(prompts)).split(chunk):
            t, m = generate(self.model, ids[rows], mask[rows], limits[rows], min_new_tokens=s.min_new_tokens,
                            temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                            eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, noise=noise[rows])
            tokens.append(t), resp_mask.append(m)
        N = max(t.shape[1] for t in tokens)  # chunks may stop at different lengths: pad to the longest
        tokens = torch.cat([pad_columns(t, N, tok.pad_id) for t in tokens])
        resp_mask = torch.cat([pad_columns(m, N, 0) for m in resp_mask])
        return Samples(ids, mask, tokens, resp_mask, tok.decode_batch(tokens.cpu(), resp_mask.cpu()))

    def forward_pass(self, seq, seq_mask, P, N, full_logits=False) -> Pass:
        """seq [b, P+N] -> the policy's (or, with adapters off, the reference's) Pass.

        Only the N positions that predict response tokens get logits: the LM head is the
        biggest matmul of a small model, and the prompt's logits are never used. Log-probs and
        entropies come from the logits in the model's dtype a few rows at a time (ppo.token_logprobs);
        only the "full" KL estimator, which reads every token's log-prob, gets an fp32 [b, N, V] copy.
        """
        out = self.model(seq, seq_mask, logits_positions=slice(P - 1, P + N - 1))
        values = self.value_head(out.hidden_states[:, P - 1:P + N - 1]) if self.value_head is not None else None
        tau = self.sampling.temperature  # log-probs of the distribution that was sampled
        if not full_logits:
            logprobs, entropy = token_logprobs(out.logits, seq[:, P:], tau)
            return Pass(logprobs, values, entropy)
        logits = out.logits.float() / tau if tau != 1.0 else out.logits.float()
        lse = torch.logsumexp(logits, dim=-1)  # [b, N]
        with torch.no_grad():
            entropy = entropy_from_logits(logits, lse)
        return Pass(logprobs_from_logits(logits, seq[:, P:], lse), values, entropy, logits - lse.unsqueeze(-1))

    @torch.no_grad()
    def score_pass(self, seq, seq_mask, P, N) -> tuple[Pass, Pass]:
        """(policy, reference) passes over this rank's rows, in minibatch-sized chunks (the same shapes the
        update will use, so at step 0 the update's ratio is exactly 1). Logits are kept only for the "full"
        KL estimator (else None: [b, N, V] is the biggest tensor of a step)."""
        full = self.ppo.kl_estimator == "full"
        policy, reference = [], []
        for rows in torch.arange(seq.shape[0]).split(self.ppo.mini_batch_size // dist.world_size()):
            policy.append(self.forward_pass(seq[rows], seq_mask[rows], P, N, full))
            with disable_adapters(self.model):
                reference.append(self.forward_pass(seq[rows], seq_mask[rows], P, N, full))
        return _cat_passes(policy, full), _cat_passes(reference, full)

    # ---------------------------------------------------------------- advantages
    def advantages(self, r: Rollout, kl_coef: float) -> Batch:
        """The whole batch's scores (shaped, for PPO, as --use-score-scaling etc. say: shaping.py), per-token
        rewards (-kl_coef * KL, + the score at the last token) on this rank's rows, the global batch
        (Batch.gather), and its advantages: GAE (PPO), or from the other samples of each prompt (rloo, grpo)."""
        ppo, algorithm = self.ppo, self.algorithm.algorithm
        raw = dist.gather_rows(r.scores)  # [B]: the running moments see the whole batch on every rank
        scores = shape_scores(raw, self.shaping, self.running) if algorithm == "ppo" else raw
        full = ppo.kl_estimator == "full"
        logprobs, ref = (r.logits, r.ref_logits) if full else (r.logprobs, r.ref_logprobs)
        rewards, non_score, kls = compute_rewards(scores[dist.my_rows(len(raw))], logprobs, ref,
                                                  r.response_mask.float(), kl_coef, ppo.kl_estimator)
        batch = Batch.gather(r, raw, scores, rewards, non_score, kls, with_ref=algorithm == "grpo")
        if algorithm == "ppo":
            batch.values, batch.advantages, batch.returns = compute_advantages(
                batch.values, batch.rewards, batch.mask, ppo.gamma, ppo.lam, self.shaping.whiten_rewards)
        elif algorithm == "rloo":
            batch.rlhf_reward, batch.advantages = rloo_advantages(batch.scores, batch.non_score, batch.mask, self.K)
        else:
            batch.advantages = grpo_advantages(batch.scores, self.K, scale=self.algorithm.scale_rewards)
        return batch

    # ---------------------------------------------------------------- update
    def update(self, r: Rollout, batch: Batch, kl_coef: float | None = None) -> list[dict]:
        """PPO epochs over the batch: this rank runs the forward and backward passes of its rows `r` of each
        minibatch; the loss reads the whole minibatch from `batch` (and GRPO's KL term kl_coef, by default the
        controller's). Returns the loss's stats per minibatch."""
        ppo = self.ppo
        kl_coef = self.kl_ctl.value if kl_coef is None else kl_coef
        seq, seq_mask = r.seq, r.seq_mask
        P, N = r.query_ids.shape[1], r.response_ids.shape[1]
        B = batch.logprobs.shape[0]
        first = dist.my_rows(B).start  # global index of this rank's first row
        self.model.train()  # only LoRA dropout (if any) and the model's own dropout change with this
        all_stats = []
        for _ in range(ppo.ppo_epochs):
            for rows in minibatches(B, ppo.mini_batch_size, self.gen, self.device):
                mine = rows[dist.my_rows(len(rows))] - first  # this rank's share of the minibatch, local indices
                new = self.forward_pass(seq[mine], seq_mask[mine], P, N)
                # The whole minibatch's numbers on every rank, gradients only through this rank's rows: the
                # loss is the single-process loss, and summing the ranks' gradients gives its gradient.
                logprobs, entropy = dist.gather_rows(new.logprobs), dist.gather_rows(new.entropy)
                vpreds = dist.gather_rows(new.values) if new.values is not None else None
                loss, stats = self.loss(batch, rows, logprobs, vpreds, entropy, kl_coef)
                loss.backward()
                self.optimizer_step()
                all_stats.append(stats)
            # trl's early stop, checked once per epoch on its last minibatch: the policy moved too far
            # from the one that sampled the data
            if ppo.early_stop_kl and all_stats[-1]["policy/policykl"] > 1.5 * ppo.early_stop_kl:
                break
        self.model.eval()
        return all_stats

    def loss(self, batch: Batch, rows, logprobs, vpreds, entropy, kl_coef: float) -> tuple[torch.Tensor, dict]:
        """One minibatch's loss (rows: its global indices; logprobs, vpreds, entropy: the new pass, gathered) and
        its stats: PPO's clipped policy + value loss (ppo.py), or RLOO's / GRPO's (group_baselines.py)."""
        ppo, algorithm = self.ppo, self.algorithm.algorithm
        old, mask, advantages = batch.logprobs[rows], batch.mask[rows], batch.advantages[rows]
        if algorithm == "ppo":
            pg_loss, vf_loss, stats = ppo_loss(
                old, batch.values[rows], logprobs, vpreds, entropy, mask, advantages, batch.returns[rows],
                ppo.cliprange, ppo.cliprange_value, ppo.vf_coef, ppo.ratio_threshold)
            return pg_loss + vf_loss, stats
        if algorithm == "rloo":
            loss, stats = rloo_loss(old, logprobs, mask, advantages, ppo.cliprange)
        else:
            loss, stats = grpo_loss(old, logprobs, batch.ref_logprobs[rows], mask, advantages, ppo.cliprange, kl_coef,
                                    self.algorithm.loss_type, self.sampling.max_new_tokens)
        stats["policy/entropy"] = masked_mean(entropy, mask).detach()
        return loss, stats

    def optimizer_step(self) -> None:
        """Sum the ranks' gradients, clip their norm, one AdamW step, clear them."""
        dist.sum_gradients(self.params)
        if self.optim.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.optim.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()  # per optimizer step, as torch's schedulers expect


def _cat_passes(passes: list[Pass], keep_logits: bool) -> Pass:
    cat = torch.cat
    values = cat([p.values for p in passes]) if passes[0].values is not None else None
    return Pass(cat([p.logprobs for p in passes]), values, cat([p.entropy for p in passes]),
                cat([p.logits for p in passes]) if keep_logits else None)


def lr_scheduler(optimizer, optim: OptimizerConfig, optimizer_steps: int):
    """torch's scheduler for --lr-schedule over the run's optimizer steps, or None for a constant rate.
    linear: lr -> lr_min in a straight line (LinearLR); cosine: half a cosine from lr to lr_min (CosineAnnealingLR,
    trlX's choice). After the last planned step (a run extended without a schedule) they stay at lr_min."""
    if optim.lr_schedule == "constant":
        return None
    if optimizer_steps < 1:
        raise ValueError(f"--lr-schedule {optim.lr_schedule} needs the run's number of optimizer steps")
    if optim.lr_schedule == "linear":
        return torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=optim.lr_min / optim.lr,
                                                 total_iters=optimizer_steps)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=optimizer_steps, eta_min=optim.lr_min)


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
