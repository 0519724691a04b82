"""One full PPO step, ours vs trl 0.11.4 + peft, side by side on CPU: seconds per step and peak memory.

    python benchmarks/bench_ppo.py                        # all seven rows, 1 warmup + 5 timed steps each
    python benchmarks/bench_ppo.py --steps 3 --rows trl-bf16,ours-default
    python benchmarks/bench_ppo.py --threads 2 --out results.md
    python benchmarks/bench_ppo.py --rows ours-default --profile   # + torch.profiler of one of our steps
    python benchmarks/bench_ppo.py --threads 1 --steps 3 --rounds 3    # each row 3 times, order alternating

The setting (equal on both sides)
---------------------------------
* One Pythia-70m-shaped GPT-NeoX with random weights (hidden 512, 6 layers, 8 heads, ffn 2048, vocab 50304,
  rotary_pct 0.25, parallel residual, untied head), built once by transformers' GPTNeoXForCausalLM(config)
  with a fixed seed and saved with save_pretrained, beside a byte-level BPE tokenizer whose vocabulary is
  also 50304 tokens (procedurally generated merges, so every sampled id decodes to real text).
* LoRA r = 8, alpha 16, no dropout, on query_key_value; the reference policy is the same model with the
  adapters switched off (trl: ref_model=None with a peft model).
* batch 16, mini-batch 4, 4 PPO epochs, lr 1.41e-5, adaptive KL (init 0.2, target 6, horizon 10000),
  no grad clipping, no early stopping.
* Queries: 16 rows of exactly 8 random token ids per step (ids chosen so that decode -> encode gives them
  back, because our trainer takes text). trl gets the same ids as tensors.
* Responses: exactly 16 tokens, pure sampling (top_k 0, top_p 1, temperature 1; eos forbidden before
  16 tokens). trl generates all 16 rows in one batched `generate` call (its fastest path).
* Reward: a fixed random score per row and step, computed up front, so neither side pays for a reward model.
* Rows (ROWS below): trl in each of its configurations, so the fastest one is the reference —
    trl-fp32   the model in fp32
    trl-bf16   from_pretrained(torch_dtype=torch.bfloat16): every weight and activation in bf16
    trl-int8   BitsAndBytesConfig(load_in_8bit=True): bitsandbytes' Linear8bitLt blocks, fp32 elsewhere
  and ours, each a pair of train.py flags:
    ours-fp32        --quantization none --dtype float32
    ours-bf16        --quantization none --dtype bfloat16
    ours-int8-fp32   --quantization int8 --dtype float32   (LLM.int8() blocks, fp32 float parts)
    ours-int8-bf16   --quantization int8 --dtype bfloat16
    ours-default     no flags: what `python train.py` resolves on this machine (printed in the table)
  Every row of ours runs PPO with a constant learning rate (--algorithm ppo --lr-schedule constant), whatever
  train.py's default algorithm: the peer is trl's PPOTrainer, and the step compared is its step.

Every row runs in its own subprocess (imports and allocations never mix): the time of each step is the wall
clock around the whole step (trl: `generate` + `step`; ours: `PPOTrainer.step`), reported as the median over
--steps steps after --warmup untimed ones. Peak memory is the child's VmHWM (peak resident set) from
/proc/self/status, read at its end; it includes imports. (`getrusage(RUSAGE_SELF).ru_maxrss` is also recorded,
but it can carry the forking parent's RSS across exec, so VmHWM is the number in the table.) This parent
process imports nothing heavy.

Phases. trl: generation = wall time around `ppo_trainer.generate`; scoring = its `time/ppo/forward_pass` (policy
and reference no-grad passes); update = `time/ppo/optimize_step` (minibatch forwards + backward + Adam).
Ours: scoring = time inside `PPOTrainer.score_pass` (policy and reference passes), generation = the rest of
`time/ppo/rollout` (tokenize, sample, decode, reward), update = `time/ppo/optimize_step`.

The machine is shared and noisy: the ratio measured within one run is the honest claim, not the absolute times.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The workload
BATCH, MINI_BATCH, PPO_EPOCHS = 16, 4, 4
QUERY_TOKENS, RESPONSE_TOKENS = 8, 16
LR = 1.41e-5
INIT_KL, TARGET_KL, HORIZON = 0.2, 6.0, 10000.0
LORA_R, LORA_ALPHA = 8, 16
MODEL = dict(vocab_size=50304, hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048,
             max_position_embeddings=2048, rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True,
             tie_word_embeddings=False, hidden_act="gelu", layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=0,
             pad_token_id=1)
EOS, PAD = "<|endoftext|>", "<|padding|>"
SEED = 0

# Each row: trl's from_pretrained options, or our TrainConfig flags (train.py's, as fields). The order is the
# order they run in: the rows that are compared sit next to each other in time (the machine's load drifts).
ROWS = {
    "trl-fp32": {},
    "trl-bf16": {"torch_dtype": "bfloat16"},
    "ours-default": {},
    "ours-int8-bf16": {"quantization": "int8", "dtype": "bfloat16"},
    "ours-bf16": {"quantization": "none", "dtype": "bfloat16"},
    "ours-int8-fp32": {"quantization": "int8", "dtype": "float32"},
    "ours-fp32": {"quantization": "none", "dtype": "float32"},
    "trl-int8": {"load_in_8bit": True},
}


# ------------------------------------------------------------------------------------------------
# Small helpers (stdlib only: the parent uses them too)
# ------------------------------------------------------------------------------------------------

def proc_status_mb(field: str) -> float:
    """VmHWM / VmRSS of this process in MB (1e6 bytes), from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / 1e6
    return float("nan")


def maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6  # KiB on Linux


def median(xs):
    return statistics.median(xs) if xs else float("nan")


# ------------------------------------------------------------------------------------------------
# Child: build the shared checkpoint, tokenizer, queries and scores
# ------------------------------------------------------------------------------------------------

def build_tokenizer(vocab_size: int, seed: int):
    """A byte-level BPE with Pythia's two special tokens (<|endoftext|> = 0, <|padding|> = 1) and exactly
    vocab_size tokens: the 256 byte symbols, then random merges of existing tokens (at most 8 symbols)."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    rng = random.Random(seed)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate([EOS, PAD] + alphabet)}
    pieces, merges = list(alphabet), []
    while len(vocab) < vocab_size:
        a, b = rng.choice(pieces), rng.choice(pieces)
        if len(a) + len(b) > 8 or a + b in vocab:
            continue
        vocab[a + b] = len(vocab)
        merges.append((a, b))
        pieces.append(a + b)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS, PAD])
    assert tok.get_vocab_size() == vocab_size and tok.token_to_id(EOS) == 0 and tok.token_to_id(PAD) == 1
    return tok


def round_trip_query(tok, rng, n_tokens: int, vocab_size: int) -> list[int]:
    """n_tokens random non-special ids whose decoded text encodes back to exactly those ids."""
    ids: list[int] = []
    while len(ids) < n_tokens:
        for _ in range(1000):
            cand = ids + [rng.randrange(2, vocab_size)]
            text = tok.decode(cand, skip_special_tokens=True)
            if tok.encode(text, add_special_tokens=False).ids == cand:
                ids = cand
                break
        else:
            ids = []  # dead end: start the row again
    return ids


def child_build(args) -> dict:
    import random

    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    folder = args.folder
    torch.manual_seed(SEED)
    config = GPTNeoXConfig(**MODEL)
    model = GPTNeoXForCausalLM(config).eval()
    model.save_pretrained(folder)
    n_params = sum(p.numel() for p in model.parameters())

    tok = build_tokenizer(MODEL["vocab_size"], SEED)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": EOS,
                   "unk_token": EOS, "pad_token": PAD}, f, indent=2)

    rng = random.Random(SEED)
    n_steps = args.warmup + args.steps
    queries = [[round_trip_query(tok, rng, QUERY_TOKENS, MODEL["vocab_size"]) for _ in range(BATCH)]
               for _ in range(n_steps)]
    texts = [[tok.decode(q, skip_special_tokens=True) for q in step] for step in queries]
    scores = [[rng.uniform(-1.0, 1.0) for _ in range(BATCH)] for _ in range(n_steps)]
    with open(os.path.join(folder, "bench_inputs.json"), "w") as f:
        json.dump({"queries": queries, "texts": texts, "scores": scores}, f)
    from minirlhf import cpu

    return {"params": n_params, "machine": cpu.describe()}


# ------------------------------------------------------------------------------------------------
# Child: our PPO step
# ------------------------------------------------------------------------------------------------

def child_ours(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import minirlhf
    from minirlhf.lora import add_lora
    from minirlhf.rewards import checked_reward_fn
    from minirlhf.train import TrainConfig
    from minirlhf.trainer import PPOTrainer

    rss_imports = proc_status_mb("VmRSS")
    with open(os.path.join(args.folder, "bench_inputs.json")) as f:
        inputs = json.load(f)
    torch.manual_seed(SEED)
    cfg = TrainConfig.from_flags(batch_size=BATCH, mini_batch_size=MINI_BATCH, ppo_epochs=PPO_EPOCHS, lr=LR,
                      min_new_tokens=RESPONSE_TOKENS, max_new_tokens=RESPONSE_TOKENS, init_kl_coef=INIT_KL,
                      adaptive_kl=True, target_kl=TARGET_KL, horizon=HORIZON, top_k=0, top_p=1.0,
                      temperature=1.0, max_grad_norm=0.0, early_stop_kl=0.0, seed=SEED, algorithm="ppo",
                      lr_schedule="constant", **ROWS[args.row])  # trl's PPOTrainer: PPO, a constant lr
    device, dtype = cfg.device()  # "auto" resolved exactly as train.py resolves it
    model = minirlhf.load_model(args.folder, dtype=dtype, device=device, quantization=cfg.base.quantized())
    add_lora(model, r=LORA_R, alpha=LORA_ALPHA, dropout=0.0, target_modules=("query_key_value",))
    tok = minirlhf.load_tokenizer(args.folder)
    resolved = f"--quantization {cfg.base.quantized()} --dtype {str(dtype).removeprefix('torch.')}"
    current = {"step": 0}

    def reward(prompts, responses):  # constant time: the precomputed scores of this step
        return torch.tensor(inputs["scores"][current["step"]])

    trainer = PPOTrainer.for_config(model, tok, checked_reward_fn(reward, "dummy"), cfg)
    rss_loaded = proc_status_mb("VmRSS")

    # time the scoring passes: wrap this instance's score_pass (the library is not touched)
    inner_score_pass, score_time = trainer.score_pass, [0.0]

    def timed_score_pass(*a, **k):
        t = time.perf_counter()
        with torch.profiler.record_function("bench/score_pass"):
            out = inner_score_pass(*a, **k)
        score_time[0] += time.perf_counter() - t
        return out

    trainer.score_pass = timed_score_pass
    inner_update = trainer.update

    def labelled_update(*a, **k):
        with torch.profiler.record_function("bench/update"):
            return inner_update(*a, **k)

    trainer.update = labelled_update

    steps = []
    for i in range(args.warmup + args.steps):
        current["step"] = i
        score_time[0] = 0.0
        t0 = time.perf_counter()
        stats, rollout = trainer.step(inputs["texts"][i])
        total = time.perf_counter() - t0
        assert tuple(rollout.query_ids.shape) == (BATCH, QUERY_TOKENS), rollout.query_ids.shape
        assert bool(rollout.query_mask.all()), "a query was padded: not 8 tokens"
        assert rollout.query_ids.tolist() == inputs["queries"][i], "the queries did not tokenize to the chosen ids"
        assert tuple(rollout.response_ids.shape) == (BATCH, RESPONSE_TOKENS), rollout.response_ids.shape
        assert bool(rollout.response_mask.all()), "a response is shorter than 16 tokens"
        steps.append({"total": total, "generation": stats["time/ppo/rollout"] - score_time[0],
                      "scoring": score_time[0], "update": stats["time/ppo/optimize_step"],
                      "other": total - stats["time/ppo/rollout"] - stats["time/ppo/optimize_step"],
                      "kl": stats["objective/kl"]})
        print(f"  [{args.row}] step {i}{' (warmup)' if i < args.warmup else ''}: {total:.2f} s", file=sys.stderr,
              flush=True)

    peak_rss, ru_peak = proc_status_mb("VmHWM"), maxrss_mb()  # before profiling: its records would count
    profile = None
    if args.profile:
        current["step"] = args.warmup + args.steps - 1  # reuse the last step's inputs
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            trainer.step(inputs["texts"][current["step"]])
        profile = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60)
        labels = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key.startswith("bench/")}
        profile = f"phases inside the profiled step (s, profiler overhead included): {labels}\n" + profile
    return {"steps": steps[args.warmup:], "warmup_steps": steps[:args.warmup], "rss_imports_mb": rss_imports,
            "rss_loaded_mb": rss_loaded, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "profile": profile, "peak_rss_mb": peak_rss, "ru_maxrss_mb": ru_peak, "resolved": resolved}


# ------------------------------------------------------------------------------------------------
# Child: trl 0.11.4 + peft
# ------------------------------------------------------------------------------------------------

def child_trl(args) -> dict:
    import logging
    import warnings

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import transformers
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig, PreTrainedTokenizerFast
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    transformers.logging.set_verbosity_error()
    import peft
    import trl

    versions = {"trl": trl.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    rss_imports = proc_status_mb("VmRSS")
    with open(os.path.join(args.folder, "bench_inputs.json")) as f:
        inputs = json.load(f)
    torch.manual_seed(SEED)
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(args.folder, "tokenizer.json"), eos_token=EOS,
                                  bos_token=EOS, unk_token=EOS, pad_token=PAD)
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=["query_key_value"],
                      bias="none", task_type="CAUSAL_LM")
    kwargs = {}
    if ROWS[args.row].get("load_in_8bit"):
        import bitsandbytes

        versions["bitsandbytes"] = bitsandbytes.__version__
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if ROWS[args.row].get("torch_dtype"):
        kwargs["torch_dtype"] = getattr(torch, ROWS[args.row]["torch_dtype"])
    model = AutoModelForCausalLMWithValueHead.from_pretrained(args.folder, peft_config=lora, **kwargs)
    if ROWS[args.row].get("load_in_8bit"):
        n8 = sum(p.numel() for p in model.parameters() if p.dtype == torch.int8)
        assert n8 > 0, "bitsandbytes did not quantize anything"
    config = PPOConfig(batch_size=BATCH, mini_batch_size=MINI_BATCH, ppo_epochs=PPO_EPOCHS, learning_rate=LR,
                       adap_kl_ctrl=True, init_kl_coef=INIT_KL, target=TARGET_KL, horizon=HORIZON,
                       kl_penalty="kl", early_stopping=False, max_grad_norm=None, seed=SEED, log_with=None)
    ppo = PPOTrainer(config=config, model=model, ref_model=None, tokenizer=tok)
    gen_kwargs = dict(min_new_tokens=RESPONSE_TOKENS, max_new_tokens=RESPONSE_TOKENS, do_sample=True, top_k=0,
                      top_p=1.0, temperature=1.0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    rss_loaded = proc_status_mb("VmRSS")

    steps = []
    for i in range(args.warmup + args.steps):
        queries = [torch.tensor(q) for q in inputs["queries"][i]]
        scores = [torch.tensor(s) for s in inputs["scores"][i]]
        t0 = time.perf_counter()
        responses = ppo.generate(queries, batch_size=BATCH, return_prompt=False, **gen_kwargs)
        t1 = time.perf_counter()
        stats = ppo.step(queries, responses, scores)
        total = time.perf_counter() - t0
        lengths = [len(r) for r in responses]
        assert lengths == [RESPONSE_TOKENS] * BATCH, f"trl responses are not all 16 tokens: {lengths}"
        steps.append({"total": total, "generation": t1 - t0, "scoring": stats["time/ppo/forward_pass"],
                      "update": stats["time/ppo/optimize_step"],
                      "other": total - (t1 - t0) - stats["time/ppo/forward_pass"] - stats["time/ppo/optimize_step"],
                      "kl": float(stats["objective/kl"])})
        print(f"  [{args.row}] step {i}{' (warmup)' if i < args.warmup else ''}: {total:.2f} s", file=sys.stderr,
              flush=True)
    return {"steps": steps[args.warmup:], "warmup_steps": steps[:args.warmup], "rss_imports_mb": rss_imports,
            "rss_loaded_mb": rss_loaded, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "versions": versions, "resolved": ", ".join(f"{k}={v}" for k, v in ROWS[args.row].items()) or "fp32"}


def child_main(args) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, ROOT)
    fn = {"build": child_build, "ours": child_ours, "trl": child_trl}[args.child]
    result = fn(args)
    result.setdefault("peak_rss_mb", proc_status_mb("VmHWM"))
    result.setdefault("ru_maxrss_mb", maxrss_mb())
    with open(args.result, "w") as f:
        json.dump(result, f)


# ------------------------------------------------------------------------------------------------
# Parent: run the children, print the table
# ------------------------------------------------------------------------------------------------

def run_child(kind: str, row: str | None, folder: str, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = f.name
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--folder", folder, "--result", result_path,
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if row:
        cmd += ["--row", row]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.profile and kind == "ours":
        cmd += ["--profile"]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - t
    progress = [line for line in proc.stderr.splitlines() if line.startswith("  [")]
    if proc.returncode != 0:
        print(proc.stderr[-6000:], file=sys.stderr)
        os.unlink(result_path)
        return {"error": f"exit {proc.returncode}: " + (proc.stderr.strip().splitlines() or ["?"])[-1]}
    with open(result_path) as f:
        result = json.load(f)
    os.unlink(result_path)
    result["wall_s"] = elapsed
    for line in progress:
        print(line, flush=True)
    return result


def merge_rounds(row: str, runs: list[dict]) -> dict:
    """One table row from a row's runs (one per --rounds): every timed step of every run, the largest peak RSS,
    and each run's median (how far the host drifted between rounds)."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return {"row": row, "error": failed[0]["error"]}
    merged = dict(runs[0], row=row)
    merged["steps"] = [s for r in runs for s in r["steps"]]
    merged["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    merged["rss_imports_mb"] = max(r["rss_imports_mb"] for r in runs)
    merged["round_medians"] = [median([s["total"] for s in r["steps"]]) for r in runs]
    return merged


def fmt(x, digits=2):
    return "-" if x is None or x != x else f"{x:.{digits}f}"


def table(rows, args, machine: str, versions: dict) -> str:
    timed = [r for r in rows if "steps" in r]
    trl_rows = [r for r in timed if r["row"].startswith("trl")]
    ref = min(trl_rows, key=lambda r: median([s["total"] for s in r["steps"]]), default=None)  # trl's fastest
    ref_s = median([s["total"] for s in ref["steps"]]) if ref else None
    lines = [f"### PPO step on CPU: minirlhf vs trl {versions.get('trl', '?')} + peft {versions.get('peft', '?')}",
             "",
             f"Machine: {machine}; torch {versions.get('torch', '?')}, {versions.get('threads', '?')} threads"
             + "".join(f"; {k} {versions[k]}" for k in ("transformers", "bitsandbytes") if k in versions) + ".",
             f"Workload: Pythia-70m-shaped random GPT-NeoX (vocab 50304), LoRA r=8 on query_key_value, batch "
             f"{BATCH}, mini-batch {MINI_BATCH}, {PPO_EPOCHS} PPO epochs, {QUERY_TOKENS}-token queries, exactly "
             f"{RESPONSE_TOKENS}-token responses; median of {args.steps} steps after {args.warmup} warmup"
             + (f", in each of {args.rounds} rounds (rows in alternating order; the median is over all "
                f"{args.rounds * args.steps} steps)." if args.rounds > 1 else "."),
             "",
             "| row | settings | s/step (median) | min-max | generation | scoring | update | peak RSS MB "
             f"| RSS after imports MB | speedup vs {ref['row'] if ref else 'trl'} (trl's fastest) |"
             + (" each round's median |" if args.rounds > 1 else ""),
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if args.rounds > 1 else "")]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | | failed: {r['error'][:120]} | | | | | | | |")
            continue
        totals = [s["total"] for s in r["steps"]]
        med = median(totals)
        phase = {k: median([s[k] for s in r["steps"]]) for k in ("generation", "scoring", "update")}
        speedup = f"{ref_s / med:.2f}x" if ref_s else "-"
        rounds = f" {' / '.join(fmt(m) for m in r['round_medians'])} |" if args.rounds > 1 else ""
        lines.append(f"| {r['row']} | {r['resolved']} | {fmt(med)} | {fmt(min(totals))}-{fmt(max(totals))} "
                     f"| {fmt(phase['generation'])} | {fmt(phase['scoring'])} | {fmt(phase['update'])} "
                     f"| {r['peak_rss_mb']:.0f} | {r['rss_imports_mb']:.0f} | {speedup} |{rounds}")
    lines += ["",
              "Phases are medians in seconds (so they need not sum to the median step). generation: trl = wall time "
              "of `ppo_trainer.generate` (one batched call); ours = `time/ppo/rollout` minus the scoring passes "
              "(tokenize + sample + decode + reward). scoring: policy + reference no-grad passes (trl "
              "`time/ppo/forward_pass`). update: `time/ppo/optimize_step` (16 minibatch forwards + backward + "
              "Adam). Peak RSS = the subprocess's VmHWM, imports included."]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5, help="timed PPO steps per row (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed PPO steps first")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every row this many times, every other round in reverse order (a noisy shared host)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows to run, of: {', '.join(ROWS)}")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in each child (default: torch's)")
    p.add_argument("--out", help="also write the markdown table to this file")
    p.add_argument("--profile", action="store_true", help="torch.profiler of one extra step of ours; print top ops")
    # internal: one row in a subprocess
    p.add_argument("--child", choices=["build", "ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--row", choices=list(ROWS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child_main(args)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        p.error("--steps and --rounds must be >= 1 and --warmup >= 0")
    plan = [r.strip() for r in args.rows.split(",") if r.strip()]
    if not plan or any(r not in ROWS for r in plan):
        p.error(f"--rows: expected a comma-separated subset of {','.join(ROWS)}, got {args.rows!r}")

    with tempfile.TemporaryDirectory(prefix="bench_ppo-") as folder:
        t = time.perf_counter()
        built = run_child("build", None, folder, args)
        if "error" in built:
            sys.exit(f"building the model failed: {built['error']}")
        machine = built["machine"]  # the CPU and its int8 / bf16 instructions (minirlhf/cpu.py), read by the child
        print(f"machine: {machine}", flush=True)
        print(f"built the model ({built['params'] / 1e6:.1f}M parameters) and tokenizer in "
              f"{time.perf_counter() - t:.0f} s", flush=True)

        results, versions = {row: [] for row in plan}, {}
        for k in range(args.rounds):  # every other round in reverse order: a slow drift of the host hits all rows
            for row in (plan if k % 2 == 0 else plan[::-1]):
                print(f"running {row}{f' (round {k + 1} of {args.rounds})' if args.rounds > 1 else ''} ...", flush=True)
                r = run_child(row.split("-")[0], row, folder, args)
                results[row].append(r)
                if "error" in r:
                    print(f"  {row} failed: {r['error']}", flush=True)
                    continue
                versions.update(r.get("versions", {}), torch=r["torch"], threads=r["threads"])
                print(f"  done in {r['wall_s']:.0f} s ({r['resolved']}); median "
                      f"{median([s['total'] for s in r['steps']]):.2f} s/step, peak RSS {r['peak_rss_mb']:.0f} MB "
                      f"(ru_maxrss {r['ru_maxrss_mb']:.0f} MB)", flush=True)
                if r.get("profile"):
                    print(f"\ntorch.profiler, one step of {row}, top ops by self CPU time:\n{r['profile']}\n", flush=True)
        rows = [merge_rounds(row, results[row]) for row in plan]

    text = table(rows, args, machine, versions)
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
