"""Will this RLHF run fit? The memory of one PPO run, planned from config.json alone, against the device's.

`python train.py --model EleutherAI/gpt-neox-20b --plan-memory` answers before you download 40 GB:
it reads config.json (nothing else; for a Hub id only that file is fetched), builds the model on
PyTorch's "meta" device (shapes, no memory) with the same code that will load it, and adds up what
the run holds. The seed's rule "about 1 GB per billion parameters in int8" (half that in 4 bits), done exactly.

Notation: L blocks, C hidden size, H heads, D = C / H, F MLP width, V vocabulary; s bytes per
float of the run's dtype (fp32 4, bf16/fp16 2; train.py's --dtype auto is bf16 on a GPU, fp32 on
a CPU: config.json's torch_dtype only says how the *file* stores the weights). B rollouts sampled
together (--generation-batch-size, else --batch-size, for rollouts and evaluation alike), b rows per
minibatch (--mini-batch-size), P = --max-prompt-tokens, N = --max-new-tokens, T = P + N.
MB = 1e6 bytes and GB = 1e9 bytes (a "24 GB" card has 24 GiB = 25.8 GB).

Held for the whole run
    int8 weights      every block's query_key_value, attention.dense, dense_h_to_4h, dense_4h_to_h:
                      L * (4C^2 + 2CF) params * 1 byte                          (int8.py)
    int8 row scales   one fp32 absmax per output row: L * (5C + F) * 4 bytes
    int8 packed copy  on a CPU with int8 units, oneDNN's prepacked copy of the codes (kernels/onednn_int8.py,
                      made by each layer's first forward): the int8 weights once more
    or, in 4 bits (--quantization nf4|fp4, nf4.py: blocks of 64, double quantization), n = L * (4C^2 + 2CF):
    4-bit weights     two codes per byte: n / 2 bytes
    4-bit absmax      one per 64-block: uint8 codes n / 64 bytes, and per layer one fp32 nested absmax per
                      256 blocks + one fp32 offset: 4 * (n / (64 * 256) + 4L) bytes (without double
                      quantization the absmax would be fp32: 4n / 64)
    code books        NF4's (or FP4's) 16 fp32 values and the 256-value dynamic map, shared by every layer
    float parts       embed_in [V, C] and embed_out [V, C] (once if tied), LayerNorms, biases, in s
                      bytes: checkpoint.py keeps them in floating point, as load_in_8bit does
    head packed copy  on a CPU in bf16, the frozen head's weight packed for oneDNN (kernels/onednn_linear.py):
                      V * C * 2 bytes more
    LoRA A, B         r * (in + out) per adapted layer, fp32 whatever the base (lora.py)
    AdamW state       exp_avg + exp_avg_sq: 2 * 4 bytes per trainable parameter (LoRA + value head)
    value head        Linear(C, 1), fp32: PPO only (--algorithm rloo / grpo have none; their K samples per
                      prompt are just rows of --batch-size, which every row below already counts)
    reward model      a GPT-NeoX reward model (--reward default or a folder / Hub id) in fp32
    runtime (CPU)     the interpreter, torch and the libraries a run imports, RUNTIME_CPU_MB below

Peaks that come and go; only the largest adds to the total
    loading           quantizing one layer: its fp32 copy, |W| or the scaled W, and the int8 codes,
                      9 bytes per parameter of the largest layer [F, C]; in 4 bits (kernels/
                      nf4_reference.quantize_4bit) the fp32 copy 4, the scaled W 4 while its clamped
                      copy 4 is made, then the clamped W 4 + bucketize's int64 indices 8 + their int64
                      gather through the code order 8, beside the empty module's packed weight 0.5:
                      24.5 bytes per parameter. On a CPU the checkpoint
                      file is memory-mapped by safetensors and its pages count in RSS while loading;
                      when the file already holds the run's dtype (fp32 file, fp32 run) the float
                      tensors are views of the mapping, so it stays, with the pages the int8 layers
                      were quantized from: then those count for the whole run.
    generation        KV cache 2 * L * [B, H, T, D] * s, plus the prompt's forward pass (one block
                      at a time, no gradients: ~(9C + 2F) * B * P values) and the sampling of each
                      token from [B, V] fp32 logits (~5 copies: softmax, cumsum, masks).
                      4 bits: every forward dequantizes one layer at a time (below), on a GPU too.
    update            one minibatch forward + backward:
      activations     what autograd keeps for backward, per token of a block whose input needs a
                      gradient (every block from the first adapted one on), in s bytes:
                        block input C (both LayerNorms) + fused qkv 3C (v is a view of it)
                        + rotated q, k 2C + attention output C + GELU input F      = 7C + F
                        + the causal mask SDPA keeps as a float bias, T per token
                        + each adapted layer's input in fp32 (the adapter runs in fp32) + r
                      The first adapted block keeps only the part behind its adapters; the final
                      LayerNorm keeps its input (C) and the value head its fp32 input. Frozen
                      Int8Linear layers keep no input: their weight gets no gradient. (Checked
                      against torch.autograd.graph.saved_tensors_hooks in tests/test_memory.py.)
                      With gradient checkpointing each block keeps only its input (C per token)
                      and recomputes the rest during backward, one block at a time.
      logits          [b, N, V] at response positions only (trainer.forward_pass), in the model's
                      dtype: the logits and their gradient (ppo.token_logprobs works in fp32 a few
                      rows at a time). With --kl-estimator full, 4 fp32 copies: the logits, the
                      softmax, the log-softmax it keeps, and the gradient.
      int8 backward   dL/dx = dL/dy @ W (int8.input_grad), one layer at a time: in bf16, the
                      codes cast to bf16 (2 bytes per parameter of the largest layer); in fp32 with
                      int8 units, SwitchBack (the gradient quantized to int8, no copy of W); in fp32
                      elsewhere, W dequantized: fp32 codes times scales, 8 bytes per parameter.
      4-bit dequant   On a CPU, NF4Linear's forward and backward both rebuild W in the compute dtype (s bytes
                      per parameter of the largest layer) from its dequantized fp32 absmax (4 per 64
                      weights), a chunk at a time (kernels/nf4_reference.dequantize_4bit_pairs: 12 bytes
                      per packed byte of one chunk, CHUNK bytes), one layer at a time; in generation as
                      in the update. On CUDA the Triton kernels decode tiles in registers: no such row.
      gradients       of one block's activations while backward runs through it (~ what it
                      kept), and of the trainable parameters (4 bytes each; AdamW's foreach step
                      on a GPU makes one more parameter-sized temporary).

Total = held + the largest of the three phases, with and without gradient checkpointing.

What is estimated, honestly: activation and working-set counts follow the code's tensors, not a
trace of the allocator. On a CPU the measured number is the process's peak RSS (VmHWM), which also
holds the runtime (RUNTIME_CPU_MB) and the C library's free-but-kept heap, so tests/test_memory.py
checks the plan's tensors (totals["tensors"], the total less the runtime) against the measured peak
RSS less a bare process's, and the totals against the peak RSS, at the tolerances the README states.
On a GPU the comparable number is torch.cuda.max_memory_allocated, which excludes the CUDA context
(a few hundred MB, outside the allocator) and the caching allocator's fragmentation.
Not counted: a `module:function` reward's own memory, and the scoring passes of the rollout
(no gradients; they need less than the update).
"""

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch

from . import cpu
from .checkpoint import resolve, stored_quantization
from .config import ConfigError, NeoXConfig
from .embedded import DEFAULT_DIR
from .int8 import Int8Linear, uses_onednn
from .kernels import onednn_linear
from .kernels.nf4_reference import CHUNK
from .lora import add_lora, lora_modules, parse_targets
from .model_tree import format_tree
from .neox import CausalLM, SequenceClassifier, count_params
from .nf4 import NF4Linear
from .quantize import QUANTIZED_LINEARS, quantize_on_meta

MB, GB = 1e6, 1e9
# Peak RSS (MB) of `train.py` on a model too small to matter (measure_runtime_mb below): Python,
# torch (including what torch imports the first time a module is built on the meta device), tokenizers,
# tqdm, VADER and matplotlib. It depends on the environment (the README's planner section says where it
# was measured); re-measure after upgrading torch:
#     python -c "from minirlhf.memory import measure_runtime_mb; print(measure_runtime_mb())"
RUNTIME_CPU_MB = 458.0
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# The row of NF4Linear's transient: one layer's weight rebuilt in the compute dtype, forward and backward.
DEQUANT_4BIT = "4-bit fwd/bwd: one dequantized weight"


class PlanError(ValueError):
    """A model, config.json or flag the planner cannot use; the message names it."""


# ------------------------------------------------------------------------------------------------
# Reading config.json: a folder, a config.json path, "default", or a Hub id (config.json only)
# ------------------------------------------------------------------------------------------------

def config_path(name_or_path: str) -> str:
    """The local config.json of a model folder, a config.json path, or a Hub id (checkpoint.resolve fetches that
    one file into the Hugging Face cache; HF_HUB_OFFLINE=1 reads the cache only)."""
    if os.path.isfile(name_or_path):
        return name_or_path
    path = os.path.join(resolve(name_or_path, files=("config.json",)), "config.json")
    if not os.path.isfile(path):
        raise PlanError(f"{path}: file not found (a model folder needs config.json)")
    return path


def read_config(name_or_path: str) -> tuple[NeoXConfig, dict, str]:
    """(NeoXConfig, the raw JSON, its path) of a folder, config.json path or Hub id."""
    path = config_path(name_or_path)
    config = NeoXConfig.from_json(path)  # ConfigError names the file
    with open(path, encoding="utf-8") as f:
        return config, json.load(f), path


def file_bytes_per_param(raw: dict, config_file: str, n_params: int) -> int:
    """Bytes per float in the checkpoint file: config.json's torch_dtype (transformers 5: dtype); else
    the size of the safetensors files beside it (their sizes, never their contents); else 4 (fp32)."""
    name = raw.get("torch_dtype") or raw.get("dtype")
    if name in BYTES:
        return BYTES[name]
    folder = os.path.dirname(config_file)
    size = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith(".safetensors"))
    return 2 if 0 < size <= 2.5 * n_params else 4


# ------------------------------------------------------------------------------------------------
# The model on the meta device: the exact parameters the run will hold
# ------------------------------------------------------------------------------------------------

def meta_model(config: NeoXConfig, cfg, dtype: torch.dtype):
    """CausalLM with quantized blocks (cfg.base.quantized(): int8, nf4, fp4) and cfg's LoRA adapters, on the meta
    device: every parameter has its real shape and dtype and no storage. Same code as train.run: load_model's
    layer choice and add_lora's target rules (so a bad --lora-targets fails here the same way)."""

    with torch.device("meta"):
        model = CausalLM(config).to(dtype)
    if cfg.base.quantized() != "none":
        quantize_on_meta(model, dtype, cfg.base.quantized())
    add_lora(model, r=cfg.lora.lora_r, alpha=cfg.lora.lora_alpha, dropout=cfg.lora.lora_dropout,
             target_modules=parse_targets(cfg.lora.lora_targets), layers=cfg.lora.lora_layers or None)
    return model


def _param_bytes(model) -> dict:
    """Bytes per kind of tensor, each tensor once (a tied head is embed_in's matrix). "quantized" is the bytes of
    the int8 or packed 4-bit weights, "quantized_params" the parameters they stand for (in * out each)."""

    out = dict(quantized=0, quantized_params=0, scales=0, nested=0, embeddings=0, other_float=0, lora=0,
               lora_params=0, largest_quantized=0, blocks=0)
    embed_ids = {id(model.gpt_neox.embed_in.weight), id(model.embed_out.weight)}
    quantized_ids = {id(m.weight) for m in model.modules() if isinstance(m, QUANTIZED_LINEARS)}
    for name, p in {id(p): (n, p) for n, p in model.named_parameters()}.values():
        nbytes = p.numel() * p.element_size()
        if id(p) in quantized_ids:
            out["quantized"] += nbytes
        elif p.requires_grad:
            out["lora"] += nbytes
            out["lora_params"] += p.numel()
        elif id(p) in embed_ids:
            out["embeddings"] += nbytes
        else:
            out["other_float"] += nbytes
    for m in model.modules():
        if isinstance(m, Int8Linear):
            out["scales"] += m.weight_scale.numel() * 4
        elif isinstance(m, NF4Linear):
            held = m.nbytes()  # absmax: uint8 codes (double quantization) or fp32; nested: fp32 + the offset
            out["scales"] += held["absmax"]
            out["nested"] += held["nested"]
            out["blocks"] += m.absmax.numel()
        if isinstance(m, QUANTIZED_LINEARS):
            out["quantized_params"] += m.in_features * m.out_features
            out["largest_quantized"] = max(out["largest_quantized"], m.in_features * m.out_features)
    return out


def _adapted(model, config: NeoXConfig) -> list[set]:
    """Per block, the set of its linear layers that carry an adapter ("query_key_value", ...)."""

    per_block = [set() for _ in range(config.num_hidden_layers)]
    for name, _ in lora_modules(model):
        parts = name.split(".")  # gpt_neox.layers.{i}.{attention|mlp}.{layer}
        if len(parts) > 3 and parts[1] == "layers":
            per_block[int(parts[2])].add(parts[-1])
    return per_block


def saved_per_token(config: NeoXConfig, adapted: set, grad_in: bool, s: int, r: int, dropout: float,
                    T: int, plain_attention: bool = False) -> float:
    """Bytes that autograd keeps for backward per token of one block (no checkpointing), T tokens a row.

    grad_in: the block's input needs a gradient (an earlier block has adapters). The adapter path
    runs in fp32 (4 bytes) whatever s is, and dropout on it keeps a 1-byte mask too. plain_attention:
    bf16 on a CPU, where neox.attend computes attention in fp32 plain ops instead of SDPA.
    """
    C, F, H = config.hidden_size, config.intermediate_size, config.num_attention_heads
    lora_in = {"query_key_value": C, "dense": C, "dense_h_to_4h": C, "dense_4h_to_h": F}
    total = 0.0
    if grad_in:
        total += C * s + 2 * 8  # the block input, kept by both LayerNorms, + their fp32 mean and 1/std
        if not config.use_parallel_residual:
            total += C * s + 8  # x + attention: the second LayerNorm's own input
    if grad_in or "query_key_value" in adapted:
        if plain_attention:  # neox.attend's fp32 ops keep their own copies, nothing of the bf16 ones
            total += 3 * C * 4 + H * T * 4 + T  # fp32 q, k, v, the softmax weights [b, H, T, T], the inverted mask
        else:
            total += 6 * C * s  # fused qkv [.., 3C] (v is a view of it), rotated q and k, attention output
            total += T * s + H * 4  # SDPA keeps the causal mask as a float bias [b, 1, T, T] and a logsumexp
    if grad_in or "dense_h_to_4h" in adapted:
        total += F * s  # GELU's input
    for name in adapted:
        total += lora_in[name] * (4 + (1 if dropout > 0 else 0)) + r * 4  # adapter input, mask, A's output
    return total


# ------------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------------

def target(cfg) -> tuple[str, str]:
    """(device type, float dtype name) the run would use: the run's own policy (TrainConfig.device), except that
    `--device cuda` may be planned on a machine without CUDA (that is the point)."""
    device, dtype = cfg.device(present=False)
    return device.type, str(dtype).removeprefix("torch.")


def budget_bytes(cfg, device: str) -> tuple[float, str]:
    """(bytes, where the number comes from): --memory-gb, else the GPU's memory, else the RAM."""
    if cfg.run.memory_gb > 0:
        return cfg.run.memory_gb * GB, "--memory-gb"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise PlanError("--device cuda on a machine without CUDA: give the GPU's memory with --memory-gb")
        index = 0 if cfg.run.device == "auto" else (torch.device(cfg.run.device).index or 0)
        props = torch.cuda.get_device_properties(index)
        return float(props.total_memory), f"{props.name}, torch.cuda total_memory"
    with open("/proc/meminfo") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    return kb * 1024.0, "this machine's RAM, /proc/meminfo MemTotal"


def reward_model_params(spec: str) -> tuple[int, str] | None:
    """(parameters, name) of a GPT-NeoX reward model the run would load (fp32), or None."""
    if spec == "vader" or ":" in spec and not os.path.exists(spec):
        return None
    if spec == "default":
        spec = os.path.join(DEFAULT_DIR, "rm")
    config, _, _ = read_config(spec)
    with torch.device("meta"):
        return count_params(SequenceClassifier(config)), spec


@dataclass
class Sizes:
    """The numbers every row of the plan is made of (the notation of the module docstring)."""
    L: int  # blocks
    C: int  # hidden size
    H: int  # heads
    D: int  # head size
    F: int  # MLP width
    V: int  # vocabulary
    B: int  # rows sampled together: a chunk of a rollout or of the evaluation (they hold the KV cache)
    b: int  # rows per minibatch
    P: int  # prompt tokens (the bound)
    N: int  # response tokens (the bound)
    s: int  # bytes per float of the run's dtype
    fb: int  # bytes per float in the checkpoint file
    trainable: int  # adapters + value head parameters

    @property
    def T(self) -> int:
        return self.P + self.N


class Rows(list):
    """The plan's rows: (phase, component, shape, bytes without / with gradient checkpointing)."""

    def add(self, phase, name, shape, plain, ckpt=None):
        self.append(dict(phase=phase, name=name, shape=shape, plain=float(plain),
                         ckpt=float(plain if ckpt is None else ckpt)))


def plan_memory(config: NeoXConfig, cfg, file_bytes: int = 0, budget: tuple[float, str] | None = None,
                reward: tuple[int, str] | None = None, model_name: str = "") -> dict:
    """The plan: rows (component, shape, bytes without / with gradient checkpointing, phase) and
    totals["plain" | "ckpt"] = held, phases, peak_phase, total, runtime (the CPU runtime row, 0 on a
    GPU) and tensors (total - runtime). file_bytes: bytes per float in the checkpoint file (0 = fp32)."""
    device, dtype_name = target(cfg)
    model = meta_model(config, cfg, getattr(torch, dtype_name))
    pb = _param_bytes(model)
    batch = cfg.ppo.batch_size
    z = Sizes(L=config.num_hidden_layers, C=config.hidden_size, H=config.num_attention_heads, D=config.head_size,
              F=config.intermediate_size, V=config.vocab_size,
              B=min(max(batch, cfg.data.eval_size), cfg.sampling.generation_batch_size or batch),
              b=cfg.ppo.mini_batch_size, P=cfg.sampling.max_prompt_tokens, N=cfg.sampling.max_new_tokens,
              s=BYTES[dtype_name], fb=file_bytes or 4, trainable=pb["lora_params"] + value_head_params(cfg, config))
    quant, on_cpu = cfg.base.quantized(), device == "cpu"
    # same dtype in file and run, on a CPU: the float tensors are views of the memory-mapped file
    aliased = on_cpu and z.fb == z.s
    runtime = RUNTIME_CPU_MB * MB if on_cpu else 0.0  # a constant, not the run's tensors
    n_params = pb["quantized_params"] + (pb["embeddings"] + pb["other_float"]) // z.s  # what the file holds
    rows = Rows()
    held_rows(rows, z, pb, cfg, config, dtype_name, reward, aliased, runtime, on_cpu)
    loading_rows(rows, z, pb, n_params, quant, on_cpu, aliased)
    generation_rows(rows, z, pb, quant, on_cpu)
    update_rows(rows, z, pb, cfg, config, model, device)
    return dict(model=model_name, device=device, dtype=dtype_name, rows=rows, totals=totals(rows, runtime),
                tree=format_tree(model),  # the module tree a run prints at start, from the same meta model
                quantization=quant, checkpointing=cfg.base.gradient_checkpointing, budget=budget,
                settings=dict(batch=batch, generation_batch=z.B, mini_batch=z.b, prompt=z.P, response=z.N,
                              lora_r=cfg.lora.lora_r, lora_targets=cfg.lora.lora_targets,
                              quantized_params=pb["quantized_params"], params=n_params))


def value_head_params(cfg, config) -> int:
    """Parameters of the value head: Linear(C, 1) for PPO; rloo and grpo have no critic."""
    return config.hidden_size + 1 if cfg.algorithm.algorithm == "ppo" else 0


def held_rows(rows, z: Sizes, pb, cfg, config, dtype_name, reward, aliased, runtime, on_cpu: bool) -> None:
    """What the run holds from start to end: weights, adapters, optimizer state, the reward model."""
    n_quant, quant = pb["quantized_params"], cfg.base.quantized()
    if quant == "int8":
        rows.add("held", "int8 weights (blocks' linear layers)", f"{n_quant / 1e6:,.1f}M params x 1 B", pb["quantized"])
        rows.add("held", "int8 row scales", f"{z.L} x (5C + F) x fp32", pb["scales"])
        if on_cpu and uses_onednn(torch.empty(0)):
            rows.add("held", "int8 weights packed for oneDNN (CPU int8 units)", f"{n_quant / 1e6:,.1f}M params x 1 B",
                     pb["quantized"])
    elif quant != "none":
        four_bit_held_rows(rows, pb, quant)
    rows.add("held", f"float parts: embeddings + head ({dtype_name})",
             f"[{z.V}, {z.C}] x {1 if config.tie_word_embeddings else 2}", pb["embeddings"])
    rows.add("held", f"float parts: norms, biases{', linear layers' if quant == 'none' else ''} ({dtype_name})",
             f"{(pb['other_float'] // z.s) / 1e6:,.2f}M params", pb["other_float"])
    if on_cpu and dtype_name == "bfloat16" and onednn_linear.available():
        rows.add("held", "output head packed for oneDNN (CPU, bf16)", f"[{z.V}, {z.C}] x 2 B", 2 * z.V * z.C)
    rows.add("held", "LoRA A, B (fp32)", f"{pb['lora_params'] / 1e6:,.2f}M params, r={cfg.lora.lora_r}", pb["lora"])
    rows.add("held", "AdamW state (exp_avg, exp_avg_sq)", f"2 x {z.trainable / 1e6:,.2f}M x fp32", 8 * z.trainable)
    if value_head_params(cfg, config):
        rows.add("held", "value head (fp32)", f"Linear({z.C}, 1)", 4 * value_head_params(cfg, config))
    if reward:
        rows.add("held", "reward model (fp32)", f"{reward[0] / 1e6:,.2f}M params", 4 * reward[0])
    if aliased and quant != "none":
        # the mapping stays, and the pages the quantized layers were quantized from stay resident with it
        rows.add("held", "checkpoint pages still mapped (CPU)", f"{n_quant / 1e6:,.1f}M x {z.fb} B", n_quant * z.fb)
    if runtime:
        rows.add("held", "runtime: python + torch (CPU process)", "measured, RUNTIME_CPU_MB", runtime)


def four_bit_held_rows(rows, pb, quant: str) -> None:
    """4-bit weights (two codes a byte), their per-block absmax and the double-quantization state, the code books."""
    n, blocks = pb["quantized_params"], pb["blocks"]
    absmax = "1 B (uint8, double quant)" if pb["nested"] else "4 B (fp32)"
    rows.add("held", f"4-bit weights ({quant}, blocks' linear layers)", f"{n / 1e6:,.1f}M params x 0.5 B",
             pb["quantized"])
    rows.add("held", "4-bit absmax, one per 64-block", f"{blocks / 1e6:,.2f}M blocks x {absmax}", pb["scales"])
    if pb["nested"]:
        rows.add("held", "4-bit nested absmax + offsets (fp32)", "1 per 256 blocks + 1 per layer", pb["nested"])
    rows.add("held", "4-bit code books (fp32, shared by layers)", "[16] + dynamic map [256]", 4 * (16 + 256))


def loading_rows(rows, z: Sizes, pb, n_params: int, quant: str, on_cpu: bool, aliased: bool) -> None:
    """The peak while loading: the mapped file (CPU), and quantizing the largest layer (its fp32 copy is a view of
    the mapped file when aliased: 4 bytes a parameter fewer)."""
    if on_cpu and not aliased:
        rows.add("loading", "checkpoint file, memory-mapped (CPU)", f"{n_params / 1e6:,.1f}M x {z.fb} B",
                 n_params * z.fb)
    if quant != "none":
        per = (9 if quant == "int8" else 24.5) - (4 if aliased else 0)
        rows.add("loading", "quantizing the largest layer", f"[{z.F}, {z.C}] x {per:g} B",
                 per * pb["largest_quantized"])


def generation_rows(rows, z: Sizes, pb, quant: str, on_cpu: bool) -> None:
    """The peak while sampling: the KV cache of B rows, and the larger of the prompt's pass and sampling."""
    L, B, H, T, D, P, C, F, V, s = z.L, z.B, z.H, z.T, z.D, z.P, z.C, z.F, z.V, z.s
    rows.add("generation", "KV cache", f"2 x {L} x [{B}, {H}, {T}, {D}] x {s} B", 2 * L * B * H * T * D * s)
    prefill = B * P * (9 * C + 2 * F) * s
    if on_cpu:
        prefill += B * H * P * P * 4  # attention scores of the prompt
        if quant == "int8":  # the int8 product runs as an fp32 GEMM: codes, int32 result, fp32 output, fp32 W copy
            prefill += B * P * (5 * C + 8 * F) + 4 * pb["largest_quantized"]
    sampling = 5 * B * V * 4
    rows.add("generation", "prompt forward pass or token sampling", f"[{B}, {P}] or 5 x [{B}, {V}] fp32",
             max(prefill, sampling))
    if quant in ("nf4", "fp4") and on_cpu:  # on CUDA the Triton kernels decode tiles in registers (nf4_matmul.py)
        dequant_row(rows, "generation", z, pb)


def dequant_row(rows, phase: str, z: Sizes, pb) -> None:
    """NF4Linear's transient: the largest layer's weight in the compute dtype (s), its absmax dequantized to fp32
    (with double quantization: 4 bytes per 64 weights), and one chunk's int32 indices + fp32 values."""
    absmax = 4 / 64 if pb["nested"] else 0
    rows.add(phase, DEQUANT_4BIT, f"[{z.F}, {z.C}] x {z.s + absmax:g} B + 12 x {CHUNK:,} B",
             (z.s + absmax) * pb["largest_quantized"] + 12 * CHUNK)


def update_rows(rows, z: Sizes, pb, cfg, config, model, device: str) -> None:
    """The peak of one minibatch's forward + backward, with and without gradient checkpointing."""
    L, b, T, N, C, V, s = z.L, z.b, z.T, z.N, z.C, z.V, z.s
    adapted = _adapted(model, config)
    first = next(i for i, a in enumerate(adapted) if a)
    plain = device == "cpu" and s == 2 and not config.attention_dropout  # neox.attend's rule in a training forward
    per_block = [saved_per_token(config, adapted[i], i > first, s, cfg.lora.lora_r, cfg.lora.lora_dropout, T, plain)
                 for i in range(L)]
    head = b * T * (C * s + 8)  # final LayerNorm's input
    if value_head_params(cfg, config):
        head += b * N * C * 4  # the value head's fp32 input
    kept = b * T * sum(per_block) + head
    kept_ckpt = b * T * ((L - first) * C * s + max(per_block)) + head
    rows.add("update", "activations kept for backward", f"{L - first} blocks x [{b}, {T}] (ckpt: inputs + 1 block)",
             kept, kept_ckpt)
    if cfg.ppo.kl_estimator == "full":  # every token's log-prob, in fp32 (trainer.forward_pass)
        rows.add("update", "logits at response positions", f"4 x [{b}, {N}, {V}] fp32", 4 * b * N * V * 4)
    else:  # the logits and their gradient in the model's dtype; ppo.token_logprobs' fp32 work is a few rows at a time
        rows.add("update", "logits at response positions", f"2 x [{b}, {N}, {V}] x {s} B", 2 * b * N * V * s)
    rows.add("update", "gradients through one block", f"[{b}, {T}] x one block's activations",
             b * T * max(per_block))
    if cfg.base.quantized() == "int8":  # int8.input_grad's three paths
        if s == 2:
            rows.add("update", "int8 backward: one layer's codes in bf16", f"[{z.F}, {C}] x 2 B", 2 * pb["largest_quantized"])
        elif device == "cuda" or cpu.FAST_INT8:
            rows.add("update", "int8 backward (SwitchBack): the gradient in int8", f"[{b}, {T}, {z.F}] x 9 B",
                     9 * b * T * z.F)
        else:
            rows.add("update", "int8 backward: one dequantized weight", f"[{z.F}, {C}] x 8 B", 8 * pb["largest_quantized"])
    elif cfg.base.quantized() != "none" and device == "cpu":  # CUDA: no dequantized weight (nf4_matmul.py)
        dequant_row(rows, "update", z, pb)
    temps = 2 if device == "cuda" else 1  # gradients, + AdamW's foreach temporaries on a GPU
    rows.add("update", "parameter gradients (+ AdamW temporaries)", f"{temps} x {z.trainable / 1e6:,.2f}M fp32",
             4 * temps * z.trainable)


def totals(rows, runtime: float) -> dict:
    """held + the largest phase, without ("plain") and with ("ckpt") gradient checkpointing; "tensors" is the
    total less the runtime row, the part this module plans from config.json."""
    result = {}
    for key in ("plain", "ckpt"):
        held = sum(r[key] for r in rows if r["phase"] == "held")
        phases = {ph: sum(r[key] for r in rows if r["phase"] == ph) for ph in ("loading", "generation", "update")}
        peak = max(phases, key=phases.get)
        total = held + phases[peak]
        result[key] = dict(held=held, phases=phases, peak_phase=peak, total=total, runtime=runtime,
                           tensors=total - runtime)
    return result


def verdict(total: float, budget: float) -> str:
    if total <= budget:
        return f"fits in {budget / GB:.1f} GB with {(budget - total) / GB:.1f} GB to spare"
    return f"does not fit: needs {total / GB:.1f} GB, {(total - budget) / GB:.1f} GB over {budget / GB:.1f} GB"


def format_plan(plan: dict) -> str:
    """The plan as an aligned text table, totals, budget and verdict."""
    st = plan["settings"]
    lines = [f"Memory plan for {plan['model'] or 'the model'} on {plan['device']}: "
             f"{'' if plan['quantization'] == 'none' else plan['quantization'] + ' blocks, '}"
             f"{plan['dtype']} float parts, "
             f"{st['params'] / 1e6:,.1f}M parameters",
             f"batch {st['batch']} (generation {st['generation_batch']}), mini-batch {st['mini_batch']}, "
             f"prompt <= {st['prompt']} + response <= {st['response']} tokens, "
             f"LoRA r={st['lora_r']} on {st['lora_targets']}", ""]
    w = (46, 44, 12, 12)
    head = f"{'component':<{w[0]}}{'shape':<{w[1]}}{'MB':>{w[2]}}{'MB, ckpt':>{w[3]}}"
    lines += [head, "-" * len(head)]
    titles = {"held": "held for the whole run", "loading": "peak while loading",
              "generation": "peak while generating", "update": "peak of a minibatch update"}
    for phase in ("held", "loading", "generation", "update"):
        lines.append(f"[{titles[phase]}]")
        for r in (r for r in plan["rows"] if r["phase"] == phase):
            lines.append(f"  {r['name']:<{w[0] - 2}}{r['shape']:<{w[1]}}{r['plain'] / MB:>{w[2]},.1f}"
                         f"{r['ckpt'] / MB:>{w[3]},.1f}")
        if phase != "held":
            a, c = plan["totals"]["plain"]["phases"][phase], plan["totals"]["ckpt"]["phases"][phase]
            lines.append(f"  {'= ' + phase:<{w[0] + w[1] - 2}}{a / MB:>{w[2]},.1f}{c / MB:>{w[3]},.1f}")
    lines.append("-" * len(head))
    a, c = plan["totals"]["plain"], plan["totals"]["ckpt"]
    lines.append(f"{'total = held + largest peak':<{w[0] + w[1]}}{a['total'] / MB:>{w[2]},.1f}{c['total'] / MB:>{w[3]},.1f}")
    lines.append(f"  largest peak: {a['peak_phase']} without gradient checkpointing, {c['peak_phase']} with it")
    if plan["device"] == "cuda":
        lines.append("  not counted on a GPU: the CUDA context (a few hundred MB) and allocator fragmentation")
    if plan["budget"]:
        budget, source = plan["budget"]
        lines.append(f"budget: {budget / GB:.1f} GB ({source})")
        mode = "with" if plan["checkpointing"] else "without"
        other = "without" if plan["checkpointing"] else "with"
        main, alt = (c, a) if plan["checkpointing"] else (a, c)
        lines.append(f"verdict: {verdict(main['total'], budget)} ({mode} gradient checkpointing, as configured); "
                     f"{other} it: {verdict(alt['total'], budget)}")
    return "\n".join(lines)


def plan_for(cfg) -> dict:
    """train.py --plan-memory: read config.json of cfg.base.model (and of a reward model), plan, no weights."""
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, plan_memory=True))
    cfg.validate()  # every flag's domain (a plan may name a GPU this machine lacks)
    name = os.path.join(DEFAULT_DIR, "lm") if cfg.base.model == "default" else cfg.base.model
    config, raw, path = read_config(name)
    cfg = dataclasses.replace(cfg, base=cfg.base.following(stored_quantization(os.path.dirname(path))))  # as load_model
    device, _ = target(cfg)
    budget = budget_bytes(cfg, device)
    fb = file_bytes_per_param(raw, path, _count_params(config))
    try:
        return plan_memory(config, cfg, fb, budget, reward_model_params(cfg.data.reward), cfg.base.model)
    except ValueError as e:  # add_lora's target / layer errors on the meta model
        if isinstance(e, (PlanError, ConfigError)):
            raise
        raise PlanError(f"--lora-targets / --lora-layers: {e}") from None


def _count_params(config: NeoXConfig) -> int:
    C, F, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    return V * C * (1 if config.tie_word_embeddings else 2) + L * (4 * C * C + 2 * C * F)


# ------------------------------------------------------------------------------------------------
# Measuring the runtime constant
# ------------------------------------------------------------------------------------------------

RUNTIME_PROBE = r"""
import os, sys
from minirlhf.checkpoint import save_model
from minirlhf.config import NeoXConfig
from minirlhf.neox import CausalLM, init_weights
from minirlhf.embedded import DEFAULT_DIR
from minirlhf.train import TrainConfig, run
folder = sys.argv[1]
lm = os.path.join(DEFAULT_DIR, "lm")
config = NeoXConfig(vocab_size=4096, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32, max_position_embeddings=128, eos_token_id=0, bos_token_id=0, pad_token_id=1)
model = CausalLM(config)
init_weights(model)
save_model(model, os.path.join(folder, "m"), tokenizer_folder=lm)
del model
open("/proc/self/clear_refs", "w").write("5")  # forget the peak of building it
run(TrainConfig.from_flags(model=os.path.join(folder, "m"), reward="vader", steps=1, batch_size=2, mini_batch_size=1,
                ppo_epochs=1, eval_size=2, min_new_tokens=2, max_new_tokens=4, out=os.path.join(folder, "run"),
                algorithm="ppo"),
    progress=False)
print([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
"""


def measure_runtime_mb() -> float:
    """Peak RSS (MB) of a real `train.run` on a 70k-parameter model in a fresh process: what the
    interpreter, torch and the libraries cost before any tensor of note. RUNTIME_CPU_MB is this."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this minirlhf, not another install
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-c", RUNTIME_PROBE, tmp], capture_output=True, text=True, env=env,
                             cwd=tmp, timeout=300)
    if out.returncode:
        raise RuntimeError(f"runtime probe failed: {out.stderr.strip().splitlines()[-1:]}")
    return int(out.stdout.split()[-1]) * 1024 / MB


__all__ = ["PlanError", "RUNTIME_CPU_MB", "read_config", "meta_model", "saved_per_token", "plan_memory",
           "format_plan", "plan_for", "verdict", "measure_runtime_mb"]
