"""Batched sampling with a KV cache.

One forward pass over the (left-padded) prompts fills the cache and gives the logits of the first
new token; after that every step feeds one token per row, so a step costs O(prompt + generated)
attention instead of re-running the whole sequence. All rows advance together; a row that has
finished (it sampled eos, or reached its own length limit) keeps receiving padding that nobody
reads, which is cheaper than shrinking the batch on the fly.

Sampling (Holtzman et al. 2019 for top-p), applied to the last position's logits [B, V] in this
order, as transformers does: / temperature -> keep the top_k largest -> keep the smallest set of
tokens whose probability sums to >= top_p -> draw from the softmax (or argmax when greedy).
top_k = 0 and top_p = 1.0 switch those filters off: PPO samples from the model's own
distribution, since the log-probs it trains on are of that distribution.

Returns the new tokens [B, N] and a response mask [B, N] (1 = a real response token, the eos
token included; 0 = padding after the row finished).
"""

import torch

from .neox import KVCache


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [B, V] -> the same with filtered-out tokens set to -inf."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability mass of the tokens ranked above each one
        drop_sorted = before >= top_p  # the first token is never dropped (before = 0)
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, generator: torch.Generator | None = None,
           u: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row from softmax(logits) [B, V] -> [B], by inverting the CDF with one uniform number
    per row: token = first index whose cumulative probability exceeds u. (torch.multinomial draws V
    exponentials per row instead: V times the random numbers, slow at Pythia's 50k vocabulary.) Tokens of probability 0
    (filtered to -inf) can never be drawn: their CDF step is flat. u [B] in [0, 1): given, or drawn from
    generator."""
    probs = logits.softmax(-1)
    cdf = probs.cumsum(-1)  # [B, V]
    if u is None:
        u = torch.rand(probs.shape[0], generator=generator, device=probs.device)
    total = cdf[:, -1:].contiguous()  # [B, 1] (searchsorted copies, and warns about, a strided value tensor)
    token = torch.searchsorted(cdf, u[:, None].to(cdf.dtype) * total, right=True).squeeze(1)  # [B]
    # guards u * total rounding up to the total: the first index where the CDF reaches its total holds a token
    # of positive probability (the CDF rose there), and every u * total below the total lands at or before it
    last_possible = torch.searchsorted(cdf, total).squeeze(1)  # [B]
    return torch.minimum(token, last_possible)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens,
             min_new_tokens: int = 0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             do_sample: bool = True, eos_token_id: int | None = None, pad_token_id: int = 0,
             generator: torch.Generator | None = None, noise: torch.Tensor | None = None):
    """Continue left-padded prompts input_ids [B, P] (mask [B, P]).

    max_new_tokens: an int, or a LongTensor [B] of per-row limits (PPO draws response lengths
    per row). eos_token_id=None never stops early. generator seeds the sampling; or noise
    [B, >= max_new_tokens] gives the uniform numbers themselves, noise[i, n] for row i's n-th token, so
    a row's tokens depend only on its own numbers, not on which other rows share the batch (data
    parallel ranks sample their slice of a global batch exactly as one process would; distributed.py).
    Returns (tokens [B, N], mask [B, N]) with N <= max(max_new_tokens).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature} (use do_sample=False for greedy)")
    B, P = input_ids.shape
    device = input_ids.device
    limits = torch.as_tensor(max_new_tokens, device=device).expand(B)
    N = int(limits.max())
    if N < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    dtype = model.gpt_neox.embed_in.weight.dtype
    cache = KVCache(model.config, B, P + N, device=device, dtype=dtype)
    tokens = torch.full((B, N), pad_token_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    mask = attention_mask
    step_input = input_ids
    n = 0
    for n in range(N):
        logits = model(step_input, mask, cache=cache, logits_positions=slice(-1, None)).logits[:, -1].float()
        if eos_token_id is not None and n < min_new_tokens:
            logits[:, eos_token_id] = float("-inf")
        if do_sample:
            u = None if noise is None else noise[:, n]
            scaled = logits / temperature if temperature != 1.0 else logits  # x / 1.0 is x: skip the pass
            token = sample(filter_logits(scaled, top_k, top_p), generator, u)
        else:
            token = logits.argmax(-1)
        token = torch.where(done, pad_token_id, token)
        tokens[:, n] = token
        done = done | (n + 1 >= limits)
        if eos_token_id is not None:
            done = done | (token == eos_token_id)
        if bool(done.all()):
            break
        step_input = token[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    tokens = tokens[:, :n + 1]
    return tokens, response_mask(tokens, limits, eos_token_id)


def response_mask(tokens: torch.Tensor, limits: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """[B, N] 1 for tokens up to and including the first eos and within each row's limit, else 0."""
    N = tokens.shape[1]
    within = torch.arange(N, device=tokens.device)[None, :] < limits[:, None]
    if eos_token_id is None:
        return within.long()
    is_eos = (tokens == eos_token_id).long()
    after_eos = (is_eos.cumsum(1) - is_eos) > 0  # strictly after the first eos
    return (within & ~after_eos).long()
