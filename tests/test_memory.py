"""The memory planner against measurements: peak RSS of real runs, bytes autograd really saves, and
gpt-neox-20b's weights counted by hand. Expected numbers never come from the planner itself."""

import json
import os
import subprocess
import sys

import pytest
import torch

from minirlhf.memory import _adapted, format_plan, measure_runtime_mb, plan_for, saved_per_token, verdict
from minirlhf.train import TrainConfig
from tiny import save_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_LM = os.path.join(ROOT, "minirlhf", "default", "lm")
# What train.py does, in a fresh process, then its peak resident set (VmHWM) in MB.
PEAK_RSS = ("import json, sys\n"
            "from minirlhf.train import TrainConfig, run\n"
            "run(TrainConfig.from_flags(**json.loads(sys.argv[1])), progress=False)\n"
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])\n")
NEOX_20B = {  # EleutherAI/gpt-neox-20b's config.json, the fields that matter, written by hand
    "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_size": 6144, "num_hidden_layers": 44,
    "num_attention_heads": 64, "intermediate_size": 24576, "vocab_size": 50432, "rotary_pct": 0.25,
    "rotary_emb_base": 10000, "max_position_embeddings": 2048, "use_parallel_residual": True,
    "tie_word_embeddings": False, "torch_dtype": "float16", "hidden_act": "gelu_fast", "bos_token_id": 0,
    "eos_token_id": 0}
# TRL's gpt-neox-20b sentiment example (the "20B on a 24 GB consumer GPU" blog): LoRA r=16, alpha 32,
# dropout 0.05 on query_key_value; PPO batch 256, mini-batch 16; prompts of 2-8 tokens, responses 4-16.
SEED_20B = dict(algorithm="ppo", reward="vader", device="cuda", memory_gb=24.0, batch_size=256, mini_batch_size=16,
                max_prompt_tokens=8, min_new_tokens=4, max_new_tokens=16, lora_r=16, lora_alpha=32.0,
                lora_dropout=0.05, lora_targets="query_key_value")


def peak_rss_mb(settings: dict, cwd) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, json.dumps(settings)], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1]) * 1024 / 1e6


@pytest.fixture(scope="module")
def pythia70m(tmp_path_factory):
    """A Pythia-70m-shaped random model stored in fp16, as Pythia's own files are. Built with our
    CausalLM and save_model (the same safetensors layout transformers writes): importing transformers
    alone takes longer than this whole test, and the values of the weights do not matter here."""
    from minirlhf.checkpoint import save_model
    from minirlhf.config import NeoXConfig
    from minirlhf.neox import CausalLM, init_weights

    folder = tmp_path_factory.mktemp("pythia70m")
    config = NeoXConfig(vocab_size=50304, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                        intermediate_size=2048, max_position_embeddings=2048, rotary_pct=0.25,
                        use_parallel_residual=True, tie_word_embeddings=False, eos_token_id=0, bos_token_id=0,
                        pad_token_id=1)
    model = CausalLM(config)
    init_weights(model)
    save_model(model, str(folder), dtype=torch.float16)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "torch_dtype": "float16"}))  # as Pythia's says
    save_tokenizer(folder)
    return str(folder)


@pytest.fixture(scope="module")
def runtime_mb(tmp_path_factory):
    """What the interpreter, torch and the libraries cost in *this* environment (590 MB in the dev venv, ~535 MB
    in a fresh CI venv, 458 MB with the system Python: the plan's RUNTIME_CPU_MB): the peak RSS of train.py on
    a model too small to matter (1 block of width 16, vocabulary 4096: ~1 MB of tensors), measured by this test
    with the same harness as the real runs. memory.measure_runtime_mb(), which users run to re-measure
    RUNTIME_CPU_MB, must measure the same (measured: 589.4-590.1 MB vs 590.1 MB; identical runs differ < 1 MB)."""
    from minirlhf.checkpoint import save_model
    from minirlhf.config import NeoXConfig
    from minirlhf.neox import CausalLM, init_weights

    folder = tmp_path_factory.mktemp("bare")
    model = CausalLM(NeoXConfig(vocab_size=4096, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=128, eos_token_id=0, bos_token_id=0,
                                pad_token_id=1))
    init_weights(model)
    save_model(model, str(folder / "m"), tokenizer_folder=DEFAULT_LM)
    bare = peak_rss_mb(dict(model=str(folder / "m"), reward="vader", steps=1, batch_size=2, mini_batch_size=1,
                            ppo_epochs=1, eval_size=2, min_new_tokens=2, max_new_tokens=4, out=str(folder / "run"),
                            algorithm="ppo"),
                       folder)
    assert abs(measure_runtime_mb() - bare) <= 5, bare
    return bare


def test_shipped_prompts_are_at_most_23_tokens():
    """The default's prompts: the longest is 23 tokens, so --max-prompt-tokens 23 and the default 64 give the
    same run (no prompt is cut) and differ only in the plan, which bounds every prompt by the flag."""
    from minirlhf.tokenizer import load_tokenizer

    tok = load_tokenizer(DEFAULT_LM)
    longest = {}
    for name in ("prompts.txt", "eval_prompts.txt"):
        with open(os.path.join(ROOT, "minirlhf", "default", name), encoding="utf-8") as f:
            _, mask = tok.encode_batch(f.read().splitlines())  # mask [n, longest]: 1 for each real token
        longest[name] = mask.sum(1).max().item()
    assert longest == {"prompts.txt": 23, "eval_prompts.txt": 20}


# The plan's tensors (plan total less its runtime row) against the measured tensors (peak RSS less the bare
# process's): within 25% + 15 MB, as the README says. The 15 MB: identical runs differ in peak RSS by up to
# 20, 31 and 50 MB (the three cases below, on one machine: measured tensors 42-62, 44-75 and 300-350 MB), which
# no plan can follow; the plan should sit inside that spread. The 25%: the plan is 8-25% high for the
# 70m-shaped run (planned 376.7 MB: it holds the whole memory-mapped fp16 file resident while loading; a run at
# 300.7 MB measured missed a 20% bound by 1 MB). The totals (runtime included) within 11%, the README's other
# number.
TENSOR_TOL, TENSOR_NOISE_MB, TOTAL_TOL = 0.25, 15.0, 0.11


@pytest.mark.parametrize("which, quantization", [("default", "auto"), ("default_eval", "auto"), ("pythia70m", "auto"),
                                                  ("default", "nf4"), ("pythia70m", "nf4")])
def test_plan_matches_measured_peak_rss(which, quantization, tmp_path, request, runtime_mb):
    bound = None
    if which == "default":  # train.py's defaults (batch 32, mini-batch 8, the reward model), one step
        settings = dict(steps=1, eval_size=4)
        bound = TrainConfig.from_flags(**settings).sampling.max_prompt_tokens  # 64: the plan's bound on a prompt
        settings["max_prompt_tokens"] = 23  # the longest shipped prompt: the same run, a plan for what happens
    elif which == "default_eval":  # ... with the default 512 eval prompts (sampled 32 at a time)
        settings = dict(steps=1, max_prompt_tokens=23)
    else:  # prompts longer than --max-prompt-tokens and fixed-length responses: the plan's worst case happens
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("the movie was wonderful and the actors were great, I loved every minute\n" * 8)
        settings = dict(model=request.getfixturevalue("pythia70m"), reward="vader", prompts=str(prompts), steps=1, batch_size=8,
                        mini_batch_size=4, ppo_epochs=1, eval_size=2, max_prompt_tokens=16, min_new_tokens=16,
                        max_new_tokens=16)
    settings["out"] = str(tmp_path / "run")
    settings["quantization"] = quantization  # auto: int8; nf4: 4-bit blocks of 64 with double quantization
    measured = peak_rss_mb(settings, tmp_path)
    plan = plan_for(TrainConfig.from_flags(**settings))["totals"]["plain"]
    planned_tensors, measured_tensors = plan["tensors"] / 1e6, measured - runtime_mb
    planned = planned_tensors + runtime_mb  # the plan's total with this environment's runtime
    print(f"{which} {quantization}: tensors planned {planned_tensors:.1f} MB, measured {measured_tensors:.1f} MB "
          f"(peak RSS {measured:.1f} MB less {runtime_mb:.1f} MB of runtime); totals ratio {planned / measured:.3f}")
    assert plan["total"] - plan["runtime"] == plan["tensors"] and plan["runtime"] > 0  # CPU: a runtime row
    assert abs(planned_tensors - measured_tensors) <= TENSOR_TOL * measured_tensors + TENSOR_NOISE_MB
    assert abs(planned - measured) <= TOTAL_TOL * measured, (planned, measured)
    if bound:  # the plan at the default bound (84.9 MB of tensors int8, 61.1 MB nf4): a bound of the same run, to
        # the RSS measurement's noise floor (the heap glibc keeps moves identical runs by 10-20 MB: NF4 measured
        # 57-66 MB here, above the bound's 61.1 once)
        loose = plan_for(TrainConfig.from_flags(**{**settings, "max_prompt_tokens": bound}))["totals"]["plain"]
        assert loose["tensors"] / 1e6 + TENSOR_NOISE_MB >= measured_tensors, (loose["tensors"] / 1e6, measured_tensors)


@pytest.mark.parametrize("targets, layers, dropout, parallel, quantized, dtype", [
    (("query_key_value",), None, 0.0, True, "int8", torch.float32),
    ("all-linear", None, 0.0, True, "int8", torch.float32),
    (("dense",), 2, 0.1, True, "int8", torch.float32),
    (("dense_h_to_4h", "dense_4h_to_h"), None, 0.0, False, "int8", torch.float32),
    ("all-linear", None, 0.0, True, "int8", torch.bfloat16),  # bf16 on a CPU: neox.attend's fp32 plain attention
    (("dense",), 2, 0.1, True, "int8", torch.bfloat16),
    (("query_key_value",), None, 0.05, True, "nf4", torch.float32),  # NF4Linear keeps its stored tensors only
    ("all-linear", None, 0.0, False, "nf4", torch.float32),
])
def test_activation_count_equals_what_autograd_saves(targets, layers, dropout, parallel, quantized, dtype):
    """Count the bytes autograd keeps for backward (saved_tensors_hooks, weights excluded)."""
    from minirlhf.config import NeoXConfig
    from minirlhf.int8 import Int8Linear
    from minirlhf.lora import add_lora
    from minirlhf.neox import CausalLM
    from minirlhf.nf4 import NF4Linear

    config = NeoXConfig(vocab_size=320, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=256, use_parallel_residual=parallel)
    model = CausalLM(config)
    for name, module in list(model.named_modules()):
        if name.startswith("gpt_neox.layers.") and isinstance(module, torch.nn.Linear):
            parent, _, leaf = name.rpartition(".")
            layer = Int8Linear if quantized == "int8" else NF4Linear
            setattr(model.get_submodule(parent), leaf, layer.from_linear(module))
    model.to(dtype)
    add_lora(model, r=4, alpha=8, dropout=dropout, target_modules=targets, layers=layers)
    model.train()
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    b, T = 3, 40
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.gpt_neox(torch.randint(0, 320, (b, T)), torch.ones(b, T, dtype=torch.long))
    adapted = _adapted(model, config)
    first = next(i for i, a in enumerate(adapted) if a)
    s = dtype.itemsize
    per_token = sum(saved_per_token(config, adapted[i], i > first, s, 4, dropout, T, plain_attention=s == 2)
                    for i in range(3))
    planned = b * T * (per_token + 64 * s + 8)  # + the final LayerNorm's input and statistics
    assert abs(planned - sum(saved.values())) <= 0.05 * sum(saved.values()), (planned, sum(saved.values()))


@pytest.fixture(scope="module")
def neox20b(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt-neox-20b")
    (folder / "config.json").write_text(json.dumps(NEOX_20B))
    return str(folder)


# gpt-neox-20b at the seed's settings, by hand: C hidden, L blocks, H heads of D, F MLP width, V vocabulary;
# bf16 float parts on a GPU (2 bytes), LoRA r = 16 on query_key_value only; B = 256 rollouts sampled together,
# b = 16 rows a minibatch, P = 8 prompt + N = 16 response tokens, T = 24.
C, L, H, D, F, V, R = 6144, 44, 64, 96, 24576, 50432, 16
P, N, T, b = 8, 16, 24, 16
INT8_PARAMS = L * (3 * C * C + C * C + C * F + F * C)  # query_key_value, dense, dense_h_to_4h, dense_4h_to_h
LORA_PARAMS = L * R * (C + 3 * C)  # A [r, C] + B [3C, r] on every query_key_value
TRAINABLE = LORA_PARAMS + C + 1  # + the value head Linear(C, 1)
HELD = {
    "int8 weights (blocks' linear layers)": INT8_PARAMS * 1,
    "int8 row scales": L * (3 * C + C + F + C) * 4,  # one fp32 absmax per output row
    "float parts: embeddings + head (bfloat16)": 2 * V * C * 2,  # untied embed_in and embed_out
    # per block 2 LayerNorms (weight + bias: 4C) + biases 3C + C + F + C; the final LayerNorm 2C
    "float parts: norms, biases (bfloat16)": (L * (4 * C + 3 * C + C + F + C) + 2 * C) * 2,
    "LoRA A, B (fp32)": LORA_PARAMS * 4,
    "AdamW state (exp_avg, exp_avg_sq)": 2 * TRAINABLE * 4,
    "value head (fp32)": (C + 1) * 4,
}
LOADING = 9 * F * C  # quantizing dense_h_to_4h [F, C]: fp32 copy 4 + |W| or scaled W 4 + int8 codes 1 byte


def generation_bytes(B):
    kv = 2 * L * B * H * T * D * 2  # K and V of every block, [B, H, T, D] bf16
    prefill = B * P * (9 * C + 2 * F) * 2  # the prompt's forward pass, one block at a time
    sampling = 5 * B * V * 4  # ~5 fp32 copies of the [B, V] logits
    return kv, max(prefill, sampling)


# activations autograd keeps, per token of a block (memory.py's list, counted here for these settings):
# block 0 has no input gradient: fused qkv 3C + rotated q, k 2C + attention output C, in bf16; SDPA's causal
# mask T bf16 and logsumexp H fp32; the adapter's fp32 input C, its 1-byte dropout mask C and A's output r fp32
BLOCK0 = 6 * C * 2 + (T * 2 + H * 4) + C * (4 + 1) + R * 4
# blocks 1..43 also keep their input C bf16 + 2 LayerNorms' fp32 mean and 1/std (16 bytes) and GELU's input F
BLOCK = BLOCK0 + C * 2 + 16 + F * 2
HEAD = b * T * (C * 2 + 8) + b * N * C * 4  # the final LayerNorm's input + stats; the value head's fp32 input
UPDATE_COMMON = (2 * b * N * V * 2  # logits at the response positions and their gradient, bf16
                 + b * T * BLOCK  # gradients through one block
                 + 2 * F * C  # int8 backward: dense_h_to_4h's codes cast to bf16
                 + 2 * TRAINABLE * 4)  # parameter gradients + AdamW's foreach temporaries (GPU)
UPDATE = b * T * (BLOCK0 + (L - 1) * BLOCK) + HEAD + UPDATE_COMMON
UPDATE_CKPT = b * T * (L * C * 2 + BLOCK) + HEAD + UPDATE_COMMON  # every block's input + one block at a time


def test_rloo_and_grpo_plans_have_no_value_head(neox20b):
    """--algorithm rloo / grpo: the 20B plan by hand less the value head (C + 1 parameters): its row, its AdamW
    moments and gradient, and its fp32 input in the update; every other row as for PPO (K samples per prompt are
    rows of --batch-size, which the plan counts already)."""
    ppo = {r["name"]: (r["plain"], r["ckpt"]) for r in plan_for(TrainConfig.from_flags(model=neox20b, **SEED_20B))["rows"]}
    head = C + 1
    for algorithm in ("rloo", "grpo"):
        plan = plan_for(TrainConfig.from_flags(model=neox20b, **{**SEED_20B, "algorithm": algorithm}))
        rows = {r["name"]: (r["plain"], r["ckpt"]) for r in plan["rows"]}
        less = {"AdamW state (exp_avg, exp_avg_sq)": 2 * head * 4, "activations kept for backward": b * N * C * 4,
                "parameter gradients (+ AdamW temporaries)": 2 * head * 4}
        expected = {k: (v[0] - less.get(k, 0), v[1] - less.get(k, 0)) for k, v in ppo.items() if k != "value head (fp32)"}
        assert rows == expected


@pytest.mark.parametrize("int8_units", [True, False])
def test_cpu_int8_plan_holds_onednns_packed_copy_with_int8_units(monkeypatch, int8_units):
    """On a CPU with int8 units every Int8Linear keeps oneDNN's packed copy of its codes beside them
    (kernels/onednn_int8.py): one more byte per int8 weight, held for the whole run; without them, no copy."""
    from minirlhf.kernels import onednn_int8
    from minirlhf.kernels import reference

    monkeypatch.setattr(reference, "CPU_FAST_INT_MM", int8_units)
    monkeypatch.delenv("MINIRLHF_INT8_BACKEND", raising=False)
    rows = {r["name"]: r["plain"] for r in plan_for(TrainConfig.from_flags(quantization="int8", device="cpu"))["rows"]}
    packed = rows.get("int8 weights packed for oneDNN (CPU int8 units)")
    if int8_units and onednn_int8.available():
        assert packed == rows["int8 weights (blocks' linear layers)"] > 0
    else:
        assert packed is None


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cpu_bf16_plan_holds_the_packed_head(dtype):
    """In bf16 on a CPU the frozen head keeps a copy of its weight packed for oneDNN (kernels/onednn_linear.py):
    V * C * 2 bytes, the embedded default's [V, C]; fp32 runs multiply it plainly."""
    from minirlhf.config import NeoXConfig
    from minirlhf.embedded import DEFAULT_DIR
    from minirlhf.kernels import onednn_linear

    config = NeoXConfig.from_json(os.path.join(DEFAULT_DIR, "lm", "config.json"))
    rows = {r["name"]: r["plain"] for r in plan_for(TrainConfig.from_flags(device="cpu", dtype=dtype))["rows"]}
    packed = rows.get("output head packed for oneDNN (CPU, bf16)")
    if dtype == "bfloat16" and onednn_linear.available():
        assert packed == config.vocab_size * config.hidden_size * 2
    else:
        assert packed is None


def test_gpt_neox_20b_plan_by_hand(neox20b):
    """Every row of the README's 20B plan printout, and its totals, against the arithmetic above."""
    plan = plan_for(TrainConfig.from_flags(model=neox20b, **SEED_20B))
    rows = {r["name"]: (r["plain"], r["ckpt"]) for r in plan["rows"]}
    kv, prefill = generation_bytes(256)
    expected = {**{k: (v, v) for k, v in HELD.items()},
                "quantizing the largest layer": (LOADING, LOADING),
                "KV cache": (kv, kv), "prompt forward pass or token sampling": (prefill, prefill),
                "activations kept for backward": (b * T * (BLOCK0 + (L - 1) * BLOCK) + HEAD,
                                                  b * T * (L * C * 2 + BLOCK) + HEAD),
                "logits at response positions": (2 * b * N * V * 2,) * 2,
                "gradients through one block": (b * T * BLOCK,) * 2,
                "int8 backward: one layer's codes in bf16": (2 * F * C,) * 2,
                "parameter gradients (+ AdamW temporaries)": (2 * TRAINABLE * 4,) * 2}
    assert rows == expected  # exactly these rows (a GPU plan has no runtime or mapped-file row), to the byte
    # ... which are the README's printout, MB to one decimal
    readme_mb = {"int8 weights (blocks' linear layers)": 19_931.3, "int8 row scales": 9.7,
                 "float parts: embeddings + head (bfloat16)": 1_239.4, "float parts: norms, biases (bfloat16)": 7.1,
                 "LoRA A, B (fp32)": 69.2, "AdamW state (exp_avg, exp_avg_sq)": 138.5, "value head (fp32)": 0.0,
                 "quantizing the largest layer": 1_359.0, "KV cache": 6_643.8,
                 "prompt forward pass or token sampling": 427.8, "activations kept for backward": 2_796.7,
                 "logits at response positions": 51.6, "gradients through one block": 63.8,
                 "int8 backward: one layer's codes in bf16": 302.0, "parameter gradients (+ AdamW temporaries)": 138.5}
    assert {k: round(v[0] / 1e6, 1) for k, v in expected.items()} == readme_mb
    assert round(expected["activations kept for backward"][1] / 1e6, 1) == 282.5  # its ckpt column
    assert INT8_PARAMS == 19_931_332_608 and round(UPDATE / 1e6, 1) == 3_352.7 and round(UPDATE_CKPT / 1e6, 1) == 838.4

    held = sum(HELD.values())
    for key, update in (("plain", UPDATE), ("ckpt", UPDATE_CKPT)):
        totals = plan["totals"][key]
        assert totals["phases"] == {"loading": LOADING, "generation": kv + prefill, "update": update}
        assert totals["peak_phase"] == "generation"  # 256 rollouts' KV cache at once
        assert totals["total"] == held + kv + prefill == 28_466_823_180  # README: 28,466.8 MB, 28.5 GB
        assert totals["runtime"] == 0 and totals["tensors"] == totals["total"]
    assert verdict(held + kv + prefill, 24e9) == "does not fit: needs 28.5 GB, 4.5 GB over 24.0 GB"


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gpt_neox_20b_generating_16_at_a_time(neox20b, checkpointing):
    """README: --generation-batch-size 16 moves the peak to the update: 24.7 GB without gradient checkpointing
    (0.7 GB over 24); with it the update needs 22.2 GB and the peak is loading's 22.8 GB (fits, 1.2 GB to spare)."""
    plan = plan_for(TrainConfig.from_flags(model=neox20b, **SEED_20B, generation_batch_size=16,
                                gradient_checkpointing=checkpointing))
    kv, prefill = generation_bytes(16)  # the KV cache and prompt pass of 16 rows, not 256
    assert {r["name"]: r["plain"] for r in plan["rows"] if r["phase"] == "generation"} == {
        "KV cache": kv, "prompt forward pass or token sampling": prefill}
    held = sum(HELD.values())
    for key, phase, peak in (("plain", "update", UPDATE), ("ckpt", "loading", LOADING)):
        assert plan["totals"][key]["phases"]["update"] == (UPDATE if key == "plain" else UPDATE_CKPT)
        assert plan["totals"][key]["peak_phase"] == phase
        assert plan["totals"][key]["total"] == held + peak
    assert held + UPDATE == 24_747_914_260 and held + UPDATE_CKPT == 22_233_648_148 < held + LOADING
    assert verdict(held + UPDATE, 24e9) == "does not fit: needs 24.7 GB, 0.7 GB over 24.0 GB"
    assert verdict(held + LOADING, 24e9) == "fits in 24.0 GB with 1.2 GB to spare"
    mode = "with" if checkpointing else "without"
    assert plan["checkpointing"] == checkpointing and f"({mode} gradient checkpointing, as configured)" in format_plan(plan)


# The same run in NF4 (--quantization nf4: blocks of 64, double quantization, as QLoRA), by hand. Per block
# linear layer of n weights: n / 2 bytes of packed codes (two a byte), n / 64 uint8 absmax codes, and fp32
# n / (64 * 256) nested absmaxes + 1 offset; every layer of gpt-neox-20b holds a whole number of 64 * 256 blocks.
HELD_NF4 = {
    "4-bit weights (nf4, blocks' linear layers)": INT8_PARAMS // 2,
    "4-bit absmax, one per 64-block": INT8_PARAMS // 64 * 1,
    "4-bit nested absmax + offsets (fp32)": INT8_PARAMS // (64 * 256) * 4 + 4 * L * 4,  # 4 layers a block
    "4-bit code books (fp32, shared by layers)": (16 + 256) * 4,
    **{k: v for k, v in HELD.items() if not k.startswith("int8")},  # float parts, LoRA, AdamW, value head
}
# quantizing dense_h_to_4h [F, C] (kernels/nf4_reference.quantize_4bit): its fp32 copy 4 + the clamped scaled W 4
# + bucketize's int64 indices 8 + their int64 gather through the code order 8 + the empty module's packed weight
# 0.5 bytes per weight
LOADING_NF4 = (4 + 4 + 8 + 8) * F * C + F * C // 2
# On a GPU NF4Linear's Triton kernels decode the weight's tiles in registers (kernels/nf4_matmul.py): no layer is
# rebuilt in memory, so the update is int8's less its backward's bf16 codes (2 bytes a weight of dense_h_to_4h)
UPDATE_NF4, UPDATE_NF4_CKPT = (u - 2 * F * C for u in (UPDATE, UPDATE_CKPT))


def test_gpt_neox_20b_nf4_plan_by_hand(neox20b):
    """README: in NF4 the seed's run fits 24 GB as configured (all 256 rollouts sampled at once, no gradient
    checkpointing): 18.8 GB, 5.2 GB to spare; every row against the arithmetic above."""
    plan = plan_for(TrainConfig.from_flags(model=neox20b, **SEED_20B, quantization="nf4"))
    rows = {r["name"]: (r["plain"], r["ckpt"]) for r in plan["rows"]}
    kv, prefill = generation_bytes(256)
    expected = {**{k: (v, v) for k, v in HELD_NF4.items()},
                "quantizing the largest layer": (LOADING_NF4,) * 2,
                "KV cache": (kv, kv), "prompt forward pass or token sampling": (prefill, prefill),
                "activations kept for backward": (b * T * (BLOCK0 + (L - 1) * BLOCK) + HEAD,
                                                  b * T * (L * C * 2 + BLOCK) + HEAD),
                "logits at response positions": (2 * b * N * V * 2,) * 2,
                "gradients through one block": (b * T * BLOCK,) * 2,
                "parameter gradients (+ AdamW temporaries)": (2 * TRAINABLE * 4,) * 2}
    assert rows == expected  # no dequantized-weight row: on a GPU the tiles are decoded in registers
    readme_mb = {"4-bit weights (nf4, blocks' linear layers)": 9_965.7, "4-bit absmax, one per 64-block": 311.4,
                 "4-bit nested absmax + offsets (fp32)": 4.9, "4-bit code books (fp32, shared by layers)": 0.0,
                 "quantizing the largest layer": 3_699.4}
    assert {k: round(expected[k][0] / 1e6, 1) for k in readme_mb} == readme_mb

    held = sum(HELD_NF4.values())
    assert held == 11_736_123_148  # README: 11,736.1 MB held (int8: 21,395.2)
    for key, update in (("plain", UPDATE_NF4), ("ckpt", UPDATE_NF4_CKPT)):
        totals = plan["totals"][key]
        assert totals["phases"] == {"loading": LOADING_NF4, "generation": kv + prefill, "update": update}
        assert totals["peak_phase"] == "generation"
        assert totals["total"] == held + kv + prefill == 18_807_719_692  # 18,807.7 MB
    assert verdict(held + kv + prefill, 24e9) == "fits in 24.0 GB with 5.2 GB to spare"
    assert "nf4 blocks, bfloat16 float parts" in format_plan(plan)

    # --generation-batch-size 16: the update (14.8 GB) falls below loading, quantizing dense_h_to_4h: 15.4 GB either way
    small = plan_for(TrainConfig.from_flags(model=neox20b, **SEED_20B, quantization="nf4", generation_batch_size=16))
    assert [small["totals"][k]["peak_phase"] for k in ("plain", "ckpt")] == ["loading", "loading"]
    assert held + UPDATE_NF4 == 14_786_820_884 < held + LOADING_NF4
    assert small["totals"]["plain"]["total"] == small["totals"]["ckpt"]["total"] == held + LOADING_NF4 == 15_435_499_276


# The transients the plan counts per parameter of one layer, measured: the process's peak RSS (VmHWM, reset
# with clear_refs) less its RSS before, with glibc returning every block of 64 KB or more at once
# (MALLOC_MMAP_THRESHOLD_), so that the peak is the live tensors'. Quantizing from an fp16 checkpoint tensor.
TRANSIENT = ("import sys, torch\n"
             "from minirlhf.quantize import quantize_linear\n"
             "def status(key):\n"
             "    return [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(key)][0]\n"
             "def peak(fn):\n"
             "    base = status('VmRSS'); open('/proc/self/clear_refs', 'w').write('5'); out = fn()\n"
             "    return out, (status('VmHWM') - base) / n\n"
             "N, K = 4096, 2048; n = N * K\n"
             "w = (torch.randn(N, K) * 0.02).half()\n"
             "quantize = lambda: quantize_linear({'weight': w}, 6.0, torch.float32, 'cpu', sys.argv[1])\n"
             "quantize()  # warm up\n"
             "layer, load = peak(quantize)\n"
             "dtypes = (torch.float32, torch.bfloat16) if sys.argv[1] == 'nf4' else ()\n"
             "print(load, *(peak(lambda: layer.dequantize(d))[1] for d in dtypes))\n")


@pytest.mark.parametrize("quantization, loading, dequant", [("nf4", 24.5, (4, 2)), ("int8", 9, None)])
def test_loading_and_dequantization_transients_are_the_planned_bytes_per_parameter(quantization, loading, dequant):
    """memory.py's per-parameter counts, written out here: quantizing a layer, int8 9 B (fp32 copy 4 + |W| or the
    scaled W 4 + codes 1), nf4 24.5 B (fp32 copy 4 + clamped W 4 + int64 bucket indices 8 + their int64 gather 8
    + the empty module's packed weight 0.5); NF4Linear's dequantization: the weight in fp32 4 B or bf16 2 B, its
    absmax dequantized to fp32 4 B per 64 weights, and 12 B for each of a chunk's 65,536 packed bytes. Measured:
    24.62-24.64, 4.17, 2.18 and 8.97-9.06 (the rest of the loading peak is absmax and the like; within 3%)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", TRANSIENT, quantization], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    measured = [float(v) for v in out.stdout.splitlines()[-1].split()]  # loading [, dequant fp32, bf16]
    assert abs(measured[0] - loading) <= 0.03 * loading, measured
    if dequant:  # NF4Linear's forward and backward rebuild W in the compute dtype, fp32 or bf16
        planned = [s + 4 / 64 + 12 * 65_536 / (4096 * 2048) for s in dequant]
        assert len(measured) == 3 and all(abs(m - p) <= 0.03 * p for m, p in zip(measured[1:], planned)), measured


def cli(*args, cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)


def test_cli_plans_gpt_neox_20b_against_24_gb(neox20b, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(NEOX_20B))
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not a safetensors file")  # never opened
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SEED_20B.items()]
    result = cli("--plan-memory", "--model", str(tmp_path / "m"), *flags, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "int8 weights" in result.stdout and "KV cache" in result.stdout
    assert "budget: 24.0 GB (--memory-gb)" in result.stdout
    lines = result.stdout.splitlines()
    # the README's printout: 28.5 GB either way (the peak is generation, which checkpointing does not touch)
    assert [line for line in lines if line.startswith("verdict: ")] == [
        "verdict: does not fit: needs 28.5 GB, 4.5 GB over 24.0 GB (without gradient checkpointing, as configured); "
        "with it: does not fit: needs 28.5 GB, 4.5 GB over 24.0 GB"]
    assert "total = held + largest peak" in result.stdout and "28,466.8    28,466.8" in result.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model"], "/nonexistent/model: no such folder"),
    (["--model", "EMPTYDIR"], "config.json: file not found"),
    (["--memory-gb", "-1"], "--memory-gb must be >= 0"),
    (["--lora-targets", "nope"], "--lora-targets must be all-linear or a comma-separated list of"),
])
def test_cli_bad_input_is_one_line(args, message, tmp_path, capsys):
    """train.py's main in this process (the subprocess above shows the real CLI): exit 2, one line."""
    sys.path.insert(0, ROOT)
    from train import main

    (tmp_path / "empty").mkdir()
    args = [str(tmp_path / "empty") if a == "EMPTYDIR" else a for a in args]
    assert main(["--plan-memory", *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("train.py: error: "), captured.err
    assert captured.out == ""
