"""GPT-NeoX, the Pythia family's architecture, in one file.

A decoder-only transformer (Black et al. 2022, arXiv 2204.06745). For a batch of token ids [B, T]:

    x = embed_in(ids)                                        [B, T, C]
    for each block:                                          pre-LayerNorm blocks
        a = attention(input_layernorm(x))
        parallel residual (Pythia, NeoX-20B):   x = x + a + mlp(post_attention_layernorm(x))
        sequential residual (GPT-2 style):      x = x + a;  x = x + mlp(post_attention_layernorm(x))
    h = final_layer_norm(x)                                  [B, T, C]  <- the PPO value head reads this
    logits = embed_out(h)                                    [B, T, V]  (tied to embed_in or not)

Attention details that matter for matching checkpoints bit for bit:
  * Fused QKV. `query_key_value` is one Linear C -> 3C whose output rows are grouped per head:
    [q_h0, k_h0, v_h0, q_h1, k_h1, v_h1, ...], each D = C / H wide. So the output reshapes to
    [B, T, H, 3D] and splits into q, k, v along the last axis (not into three [B, T, C] blocks).
  * Partial rotary embeddings (RoPE, Su et al. 2021, arXiv 2104.09864). Only the first
    rotary_ndims = D * rotary_pct dims of each head are rotated (Pythia: 25%), "rotate-half" style:
        q_rot = q * cos + rotate_half(q) * sin,   rotate_half([a, b]) = [-b, a]
    with angle(pos, i) = pos * base^(-2i / rotary_ndims). The remaining dims pass through.
  * Positions come from the attention mask, not the column index: with left padding a prompt
    "<pad> <pad> Hello world" must see "Hello" at position 0. position = cumsum(mask) - 1.
  * Causal + padding mask: query i may attend key j when j <= i and key j is a real token.
    A padding query row would attend nothing (softmax of all -inf is NaN), so each query may
    always attend itself; those rows are junk that nobody reads.
  * KV cache for sampling: keys/values of past positions are kept in preallocated buffers
    [B, H, max_len, D] so each new token costs one position's worth of compute.

Gradient checkpointing (Chen et al. 2016, arXiv 1604.06174), `GPTNeoX.gradient_checkpointing = True`:
a training forward normally keeps every block's intermediate activations (layer-norm outputs, q/k/v,
the MLP's [B, T, 4C] hidden layer, ...) until the backward pass needs them: memory that grows with
layers x tokens. With checkpointing each block keeps only its input [B, T, C]; the backward pass runs
the block's forward again to rebuild what it needs, one block at a time. About one extra forward of
compute buys activation memory of ~one block instead of all of them. The random state is saved and
restored around the recomputation, so dropout draws the same masks twice and the gradients are unchanged.

Module names equal transformers' GPTNeoXForCausalLM / GPTNeoXForSequenceClassification, so the
state_dict keys are the Hub checkpoint keys (checkpoint.py spells the mapping out), and LoRA
adapter keys equal PEFT's.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ACTIVATIONS, NeoXConfig
from .kernels.onednn_linear import PackedHead


@dataclass
class Output:
    logits: torch.Tensor | None  # causal LM: [B, T', V] for the chosen positions; classifier: [B, num_labels]
    hidden_states: torch.Tensor  # last hidden states after final_layer_norm, [B, T, C]


class KVCache:
    """Keys and values of all past positions, one preallocated pair of buffers per layer.

    k[layer], v[layer]: [B, H, max_len, D]. `length` positions are filled; a forward pass over
    T new tokens writes positions length .. length+T-1 in every layer, then advances `length`.
    """

    def __init__(self, config: NeoXConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, config.num_attention_heads, max_len, config.head_size)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.length = 0
        self.max_len = max_len


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_cos_sin(config: NeoXConfig, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos, sin: [B, 1, T, rotary_ndims], computed in fp32 then cast (as transformers does)."""
    dim = config.rotary_ndims
    inv_freq = 1.0 / (config.rotary_emb_base ** (torch.arange(0, dim, 2, device=position_ids.device).float() / dim))
    angles = position_ids[..., None].float() * inv_freq  # [B, T, dim/2]
    angles = torch.cat((angles, angles), dim=-1)  # [B, T, dim]: the same angle for both halves
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; rotates the first cos.shape[-1] dims of each head, passes the rest through."""
    n = cos.shape[-1]
    x_rot, x_pass = x[..., :n], x[..., n:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: NeoXConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_size = config.head_size
        self.dropout = config.attention_dropout
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, layer: int = 0):
        B, T, C = x.shape
        qkv = self.query_key_value(x).view(B, T, self.num_heads, 3 * self.head_size).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)  # each [B, H, T, D]: per-head interleaved layout
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            start = cache.length
            cache.k[layer][:, :, start:start + T] = k
            cache.v[layer][:, :, start:start + T] = v
            k, v = cache.k[layer][:, :, :start + T], cache.v[layer][:, :, :start + T]  # [B, H, S, D]
        y = attend(q, k, v, mask, self.dropout if self.training else 0.0)
        return self.dense(y.transpose(1, 2).reshape(B, T, C))


def attend(q, k, v, mask, dropout_p: float = 0.0):
    """softmax(q k^T / sqrt(D) masked) v: q [B, H, T, D], k and v [B, H, S, D], mask [B, 1, T, S] bool -> [B, H, T, D].

    torch's fused scaled_dot_product_attention, except for bf16/fp16 on a CPU without dropout: there its fused
    kernel's backward is many times slower than these few plain ops (benchmarks/bench_ppo.py's profile; the
    [T, S] score matrices of RLHF's short sequences are small). The plain version computes in fp32 and rounds
    once, as the fused kernels accumulate in fp32.
    """
    if q.device.type != "cpu" or q.dtype == torch.float32 or dropout_p > 0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5  # [B, H, T, S] fp32
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return (weights @ v.float()).to(v.dtype)


class MLP(nn.Module):
    def __init__(self, config: NeoXConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)
        name, kwargs = ACTIVATIONS[config.hidden_act]
        self.act_name, self.act_kwargs = name, kwargs

    def forward(self, x):
        h = getattr(F, self.act_name)(self.dense_h_to_4h(x), **self.act_kwargs)
        return self.dense_4h_to_h(h)


class Block(nn.Module):
    def __init__(self, config: NeoXConfig):
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Attention(config)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.hidden_dropout)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        a = self.drop(self.attention(self.input_layernorm(x), cos, sin, mask, cache, layer))
        if self.use_parallel_residual:
            return x + a + self.drop(self.mlp(self.post_attention_layernorm(x)))
        x = x + a
        return x + self.drop(self.mlp(self.post_attention_layernorm(x)))


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, S] 0/1 mask -> [B, S] positions: 0 at the first real token, counting only real tokens."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def attention_mask_4d(attention_mask: torch.Tensor, T: int) -> torch.Tensor:
    """[B, S] key mask over all S = past + T positions -> [B, 1, T, S] bool, True = may attend.

    The T queries are the last T of the S positions. Each query may attend real keys at or before
    it, and always itself (so padding rows never softmax over nothing).
    """
    S = attention_mask.shape[1]
    q_pos = torch.arange(S - T, S, device=attention_mask.device)[:, None]  # [T, 1]
    k_pos = torch.arange(S, device=attention_mask.device)[None, :]  # [1, S]
    causal = k_pos <= q_pos  # [T, S]
    mask = causal & attention_mask.bool()[:, None, :]  # [B, T, S]
    return (mask | (k_pos == q_pos))[:, None]


class GPTNeoX(nn.Module):
    """The backbone: embeddings, blocks, final LayerNorm. Returns hidden states [B, T, C]."""

    def __init__(self, config: NeoXConfig):
        super().__init__()
        self.config = config
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False  # recompute each block in the backward pass (see the top of this file)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None):
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if cache is not None and past + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {past} used, {T} more requested")
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=input_ids.device)
        if attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask must be [batch, past + new] = [{B}, {past + T}], "
                             f"got {list(attention_mask.shape)}")
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)[:, past:]
        x = self.drop(self.embed_in(input_ids))
        cos, sin = rotary_cos_sin(self.config, position_ids, x.dtype)
        mask = attention_mask_4d(attention_mask, T)
        # only when a backward pass will come: never while sampling (no_grad, KV cache)
        checkpointing = self.gradient_checkpointing and torch.is_grad_enabled() and cache is None
        for i, block in enumerate(self.layers):
            if checkpointing:
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)  # keeps x [B, T, C] only
            else:
                x = block(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.length += T
        return self.final_layer_norm(x)


class CausalLM(nn.Module):
    """GPT-NeoX with its language-model head: GPTNeoXForCausalLM's layout."""

    def __init__(self, config: NeoXConfig):
        super().__init__()
        self.config = config
        self.gpt_neox = GPTNeoX(config)
        # nn.Linear; a frozen bf16 head on a CPU multiplies with its weight packed once (kernels/onednn_linear.py)
        self.embed_out = PackedHead(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.embed_out.weight = self.gpt_neox.embed_in.weight

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, logits_positions=None):
        """input_ids [B, T] -> Output(logits [B, T', V], hidden_states [B, T, C]).

        logits_positions picks which positions get logits (a slice or index tensor on the time
        axis): the LM head is a [C, V] matmul per position, and PPO only needs the response's
        positions, sampling only the last one. None = all positions.
        """
        h = self.gpt_neox(input_ids, attention_mask, position_ids, cache)
        # A time slice of h is a strided view; F.linear on a strided 3-D input falls back to a batched
        # matmul with the [V, C] weight expanded per row (far slower than one GEMM), so make it contiguous first.
        picked = h if logits_positions is None else h[:, logits_positions].contiguous()
        return Output(logits=self.embed_out(picked), hidden_states=h)


class SequenceClassifier(nn.Module):
    """GPT-NeoX with a `score` head read at each sequence's last real token: a reward model.

    This is GPTNeoXForSequenceClassification's layout, and its rule for "last": the rightmost token
    whose id is not config.pad_token_id (so left and right padding alike), whatever the attention mask
    says. When pad_token_id == eos_token_id (many Pythia reward models) a real trailing eos is skipped
    too, and the score is read at the token before it: that is what such a model was trained to
    score. Without a pad_token_id transformers refuses batches of more than one row; we read the last
    position the attention mask marks real (the last position without a mask).
    """

    def __init__(self, config: NeoXConfig):
        super().__init__()
        self.config = config
        self.gpt_neox = GPTNeoX(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        """input_ids [B, T] -> Output(logits [B, num_labels], hidden_states [B, T, C])."""
        h = self.gpt_neox(input_ids, attention_mask, position_ids)
        B, T = input_ids.shape
        if self.config.pad_token_id is not None:
            real = input_ids != self.config.pad_token_id  # [B, T], as transformers computes it
        elif attention_mask is not None:
            real = attention_mask.bool()
        else:
            real = torch.ones_like(input_ids, dtype=torch.bool)
        last = (torch.arange(T, device=input_ids.device) * real.long()).argmax(-1)  # [B]; 0 for an all-pad row
        pooled = h[torch.arange(B, device=h.device), last]  # [B, C]
        return Output(logits=self.score(pooled), hidden_states=h)


def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """Fresh weights for training from scratch, as transformers initialises GPT-NeoX:
    Linear and Embedding ~ N(0, std), biases 0, LayerNorm weight 1 and bias 0."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def count_params(model: nn.Module) -> int:
    """Distinct parameters (a tied head counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def perplexity(model: CausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy) over real tokens; input_ids, attention_mask: [B, T]."""
    logits = model(input_ids, attention_mask).logits[:, :-1].float()
    target_mask = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    nll = F.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
    return math.exp(nll[target_mask].mean().item())
