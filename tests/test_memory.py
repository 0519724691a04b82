"""The memory planner against measurements: peak RSS of real runs, bytes autograd really saves, and
gpt-neox-20b's weights counted by hand. Expected numbers never come from the planner itself."""

import json
import os
import subprocess
import sys

import pytest
import torch

from minirlhf.memory import RUNTIME_CPU_MB, _adapted, measure_runtime_mb, plan_for, saved_per_token
from minirlhf.train import TrainConfig
from tiny import save_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_LM = os.path.join(ROOT, "minirlhf", "default", "lm")
# What train.py does, in a fresh process, then its peak resident set (VmHWM) in MB.
PEAK_RSS = ("import json, sys\n"
            "from minirlhf.train import TrainConfig, run\n"
            "run(TrainConfig(**json.loads(sys.argv[1])), progress=False)\n"
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])\n")
NEOX_20B = {  # EleutherAI/gpt-neox-20b's config.json, the fields that matter, written by hand
    "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_size": 6144, "num_hidden_layers": 44,
    "num_attention_heads": 64, "intermediate_size": 24576, "vocab_size": 50432, "rotary_pct": 0.25,
    "rotary_emb_base": 10000, "max_position_embeddings": 2048, "use_parallel_residual": True,
    "tie_word_embeddings": False, "torch_dtype": "float16", "hidden_act": "gelu_fast", "bos_token_id": 0,
    "eos_token_id": 0}
# TRL's gpt-neox-20b sentiment example (the "20B on a 24 GB consumer GPU" blog): LoRA r=16, alpha 32,
# dropout 0.05 on query_key_value; PPO batch 256, mini-batch 16; prompts of 2-8 tokens, responses 4-16.
SEED_20B = dict(reward="vader", device="cuda", memory_gb=24.0, batch_size=256, mini_batch_size=16,
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
def runtime_mb():
    """What the interpreter, torch and the libraries cost in *this* environment. The plan's runtime row is a
    constant measured once (RUNTIME_CPU_MB, 458 MB); a fresh CI venv of the same packages measures ~535 MB.
    The planner's subject is the run's tensors, so the comparison swaps in this environment's runtime."""
    return measure_runtime_mb()


@pytest.mark.parametrize("which", ["default", "default_eval", "pythia70m"])
def test_plan_is_within_15_percent_of_measured_peak_rss(which, tmp_path, request, runtime_mb):
    if which == "default":  # train.py's defaults (batch 32, mini-batch 8, the reward model), one step
        settings = dict(steps=1, eval_size=4)
    elif which == "default_eval":  # ... with the default 512 eval prompts (sampled 32 at a time), and the prompt
        # bound set to the longest shipped prompt (23 tokens): the plan assumes every prompt is that long
        settings = dict(steps=1, max_prompt_tokens=23)
    else:  # prompts longer than --max-prompt-tokens and fixed-length responses: the plan's worst case happens
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("the movie was wonderful and the actors were great, I loved every minute\n" * 8)
        settings = dict(model=request.getfixturevalue("pythia70m"), reward="vader", prompts=str(prompts), steps=1, batch_size=8,
                        mini_batch_size=4, ppo_epochs=1, eval_size=2, max_prompt_tokens=16, min_new_tokens=16,
                        max_new_tokens=16)
    settings["out"] = str(tmp_path / "run")
    measured = peak_rss_mb(settings, tmp_path)
    plan = plan_for(TrainConfig(**settings))
    planned = plan["totals"]["plain"]["total"] / 1e6 - RUNTIME_CPU_MB + runtime_mb
    print(f"{which}: planned {planned:.1f} MB (runtime {runtime_mb:.1f} MB measured here), measured peak RSS "
          f"{measured:.1f} MB, ratio {planned / measured:.3f}")
    assert abs(planned - measured) <= 0.15 * measured, (planned, measured)


@pytest.mark.parametrize("targets, layers, dropout, parallel", [
    (("query_key_value",), None, 0.0, True),
    ("all-linear", None, 0.0, True),
    (("dense",), 2, 0.1, True),
    (("dense_h_to_4h", "dense_4h_to_h"), None, 0.0, False),
])
def test_activation_count_equals_what_autograd_saves(targets, layers, dropout, parallel):
    """Count the bytes autograd keeps for backward (saved_tensors_hooks, weights excluded)."""
    from minirlhf.config import NeoXConfig
    from minirlhf.int8 import Int8Linear
    from minirlhf.lora import add_lora
    from minirlhf.neox import CausalLM

    config = NeoXConfig(vocab_size=320, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=256, use_parallel_residual=parallel)
    model = CausalLM(config)
    for name, module in list(model.named_modules()):
        if name.startswith("gpt_neox.layers.") and isinstance(module, torch.nn.Linear):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, Int8Linear.from_linear(module))
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
    per_token = sum(saved_per_token(config, adapted[i], i > first, 4, 4, dropout, T) for i in range(3))
    planned = b * T * (per_token + 64 * 4 + 8)  # + the final LayerNorm's input and statistics
    assert abs(planned - sum(saved.values())) <= 0.05 * sum(saved.values()), (planned, sum(saved.values()))


@pytest.fixture(scope="module")
def neox20b(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt-neox-20b")
    (folder / "config.json").write_text(json.dumps(NEOX_20B))
    return str(folder)


def test_gpt_neox_20b_weights_by_hand(neox20b):
    plan = plan_for(TrainConfig(model=neox20b, **SEED_20B))
    rows = {r["name"]: r["plain"] for r in plan["rows"]}
    C, F, L, V, r = 6144, 24576, 44, 50432, 16
    int8_params = L * (C * 3 * C + C * C + C * F + F * C)  # qkv, dense, h->4h, 4h->h
    assert int8_params == 19_931_332_608
    assert rows["int8 weights (blocks' linear layers)"] == int8_params  # 1 byte each
    assert rows["int8 row scales"] == L * (3 * C + C + F + C) * 4
    assert rows["float parts: embeddings + head (bfloat16)"] == 2 * V * C * 2  # untied, bf16 on a GPU
    assert rows["LoRA A, B (fp32)"] == L * r * (C + 3 * C) * 4
    assert rows["KV cache"] == 2 * L * 256 * 64 * (8 + 16) * 96 * 2
    for key in ("plain", "ckpt"):
        assert plan["totals"][key]["total"] >= int8_params + 2 * V * C * 2


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
    verdict = next(line for line in result.stdout.splitlines() if line.startswith("verdict: "))
    assert "24.0 GB" in verdict and ("fits in" in verdict or "does not fit" in verdict)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model"], "/nonexistent/model: no such folder or file"),
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
