"""The main job: RLHF a GPT-NeoX with PPO, an int8 base and LoRA adapters. `python train.py` runs it.

    TrainConfig (every flag of train.py is one field here, documented by the string below it)
      -> load the base model (int8 by default) + tokenizer, add LoRA adapters, build the reward function
      -> evaluate on fixed prompts (before)
      -> for each step: PPOTrainer.step(batch of prompts) (trainer.py), log, checkpoint
      -> evaluate again (after); write the run folder:

    runs/<name>/metrics.jsonl          one line of statistics per step (trl's names)
                reward.png             reward and KL per step
                samples.md             before/after responses on the eval prompts, with their rewards
                summary.json           before/after eval metrics, final KL, time
                adapter/               the trained LoRA adapter, in PEFT's format
                value_head.safetensors
                checkpoints/step-N/    everything needed to resume exactly (--resume runs/<name>)

Under `torchrun --nproc_per_node=W train.py ...` every process runs this same job on its share of each
batch (distributed.py): --batch-size stays the global batch, rank 0 writes the run folder, and every rank
evaluates the same eval prompts (side by side, so it costs no time) to stay in step without waiting.
"""

import ast
import dataclasses
import inspect
import json
import math
import os
import time
from dataclasses import dataclass

import torch

from . import distributed as dist

DEFAULT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default")


@dataclass
class TrainConfig:
    model: str = "default"
    """Base model: a Hub id (EleutherAI/pythia-410m) or a folder with config.json + safetensors. "default" is
    the small movie-review GPT-NeoX shipped inside the package."""
    reward: str = "default"
    """Reward: "default" (the shipped reward model trained on human-rated reviews), "vader" (VADER sentiment),
    "module:function" (your own reward_fn(prompts, responses) -> scores), or a reward-model folder / Hub id."""
    prompts: str = "default"
    """Text file with one prompt per line. "default": openings of held-out movie-review snippets."""
    eval_prompts: str = "default"
    """Text file of prompts for the before/after evaluation. "default": the shipped eval prompts when the prompts
    are the default ones, else the first --eval-size lines of --prompts."""
    eval_size: int = 512
    """How many eval prompts to sample and score before and after training (the shipped default has 512:
    one sample each, so a share like rm_positive_frac is measured to about +-0.02)."""
    steps: int = 100
    """PPO steps (each samples --batch-size prompts)."""
    batch_size: int = 32
    """Rollouts per PPO step, in all: under torchrun each of the W processes samples --batch-size / W of them."""
    mini_batch_size: int = 8
    """Rollouts per gradient step; must divide --batch-size (and be divisible by torchrun's process count)."""
    ppo_epochs: int = 4
    """Passes over each batch of rollouts."""
    generation_batch_size: int = 0
    """Rows sampled at once, in rollouts and in the before/after evaluation (0: --batch-size). Smaller chunks
    bound the KV cache, the biggest thing generation holds (--plan-memory shows it); trl's
    PPOTrainer.generate samples 4 at a time. The samples do not depend on it."""
    lr: float = 5e-4
    """AdamW learning rate for the adapters and the value head."""
    weight_decay: float = 0.0
    """AdamW weight decay (0 makes it trl's Adam)."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm of the trainable parameters to this (0 = no clipping)."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator: the update is (alpha / r) * B @ A."""
    lora_dropout: float = 0.0
    """Dropout on the adapter input during updates. Off by default: PPO's ratio compares two passes of the same
    weights and dropout makes them differ by noise (trl never applies it either: its passes run in eval mode)."""
    lora_targets: str = "query_key_value"
    """Comma-separated module-name suffixes that get adapters (query_key_value, dense, dense_h_to_4h,
    dense_4h_to_h) or "all-linear"."""
    lora_layers: int = 0
    """Adapters only in the last N blocks (trlX's num_layers_unfrozen); 0 = every block."""
    int8: bool = True
    """Hold the frozen base in int8 and run LLM.int8() (--no-int8 keeps it in floating point)."""
    int8_threshold: float = 6.0
    """LLM.int8() outlier threshold: activation columns with any |x| >= this run in floating point."""
    kl_estimator: str = "kl"
    """Per-token KL estimate in the reward: kl (log p - log q), abs, mse (half squared), full (exact, whole vocab)."""
    init_kl_coef: float = 0.15
    """Initial KL coefficient beta. trl's default is 0.2; why the embedded default uses 0.15: the README's
    notes on that run."""
    adaptive_kl: bool = True
    """Adapt beta so the KL per sequence tracks --target-kl (Ziegler et al. 2019); --no-adaptive-kl keeps it fixed."""
    target_kl: float = 6.0
    """KL per sequence (nats) that the adaptive controller aims for."""
    horizon: float = 10000.0
    """Adaptive KL controller horizon: larger = slower beta changes."""
    early_stop_kl: float = 0.0
    """Stop a step's PPO epochs when a minibatch's policy KL exceeds 1.5x this (trl's early_stopping); 0 = off."""
    ratio_threshold: float = 10.0
    """Skip (zero the loss of) a minibatch whose mean probability ratio exceeds this."""
    gamma: float = 1.0
    """Discount factor."""
    lam: float = 0.95
    """GAE lambda."""
    cliprange: float = 0.2
    """PPO policy-ratio clip range."""
    cliprange_value: float = 0.2
    """Value-prediction clip range."""
    vf_coef: float = 0.1
    """Value loss weight."""
    min_new_tokens: int = 4
    """Response lengths are drawn uniformly from [min, max] per rollout (trl's LengthSampler); no eos before min.
    4-16 are the lengths of trl's sentiment example."""
    max_new_tokens: int = 16
    """Longest response (and the length of every evaluation response)."""
    max_prompt_tokens: int = 64
    """Prompts longer than this keep their last tokens."""
    temperature: float = 1.0
    """Sampling temperature (log-probs use the same temperature)."""
    top_k: int = 0
    """Sample among the k most likely tokens; 0 = all."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 = off."""
    seed: int = 0
    """Seed for prompts, lengths, sampling, minibatch order and dropout."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (cuda when available)."""
    dtype: str = "auto"
    """Float parts of the model: float32, bfloat16, float16, or auto (bfloat16 on GPU, float32 on CPU)."""
    gradient_checkpointing: bool = False
    """Recompute each transformer block in the backward pass instead of keeping its activations: less memory
    for long responses and big models, at the cost of about one more forward pass per update."""
    out: str = ""
    """Run folder; default: a new folder under runs/."""
    resume: str = ""
    """Continue the run in this folder from its latest checkpoint."""
    save_every: int = 50
    """Write a checkpoint every N steps (and at the end)."""
    plan_memory: bool = False
    """Print how much memory this run needs (int8 weights, float parts, LoRA, AdamW, KV cache, activations, with and
    without gradient checkpointing) against the device's memory, reading only config.json, and exit."""
    memory_gb: float = 0.0
    """Memory budget in GB (1e9 bytes) for --plan-memory; 0 = this device's memory (the GPU's, else the RAM)."""


def add_dataclass_flags(parser, cls) -> None:
    """One --flag per dataclass field (bools get --x / --no-x), its help text the string under the field."""
    import argparse

    docs = {name: doc.replace("%", "%%") for name, doc in field_docs(cls).items()}  # argparse formats help with %
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=docs[f.name])
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=docs[f.name],
                                metavar=f.name.upper())


def field_docs(cls) -> dict[str, str]:
    """The string under each dataclass field: the help text of its flag."""
    tree = ast.parse(inspect.getsource(cls))
    body, docs = tree.body[0].body, {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


class UsageError(ValueError):
    """A flag or input file the run cannot use; the message names it."""


KL_ESTIMATORS = ("kl", "abs", "mse", "full")


def validate(cfg: TrainConfig) -> None:
    positive = ("steps", "batch_size", "mini_batch_size", "ppo_epochs", "lora_r", "eval_size", "min_new_tokens",
                "max_new_tokens", "max_prompt_tokens", "save_every")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.batch_size % cfg.mini_batch_size:
        raise UsageError(f"--batch-size {cfg.batch_size} is not divisible by --mini-batch-size {cfg.mini_batch_size}")
    world = dist.world_size()  # every minibatch is shared equally by the processes torchrun started
    if cfg.mini_batch_size % world:
        raise UsageError(f"--mini-batch-size {cfg.mini_batch_size} is not divisible by the {world} processes "
                         "torchrun started (each takes an equal share of every minibatch)")
    if cfg.generation_batch_size < 0:
        raise UsageError(f"--generation-batch-size must be positive (or 0 for all at once), got {cfg.generation_batch_size}")
    if cfg.min_new_tokens > cfg.max_new_tokens:
        raise UsageError(f"--min-new-tokens {cfg.min_new_tokens} is above --max-new-tokens {cfg.max_new_tokens}")
    if cfg.kl_estimator not in KL_ESTIMATORS:
        raise UsageError(f"--kl-estimator must be one of {', '.join(KL_ESTIMATORS)}, got {cfg.kl_estimator!r}")
    for name in ("lr", "temperature", "lora_alpha", "target_kl", "horizon"):
        if not getattr(cfg, name) > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    if not 0 < cfg.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {cfg.top_p}")
    if not cfg.memory_gb >= 0:  # also refuses NaN
        raise UsageError(f"--memory-gb must be positive (or 0 for this device's memory), got {cfg.memory_gb}")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UsageError(f"--dtype must be auto, float32, bfloat16 or float16, got {cfg.dtype!r}")


def default_path(name: str) -> str:
    path = os.path.join(DEFAULT_DIR, name)
    if not os.path.exists(path):
        raise UsageError(f"the embedded default ({path}) is not built in this install: run "
                         "`python -m minirlhf.build_default`, or pass --model, --reward and --prompts")
    return path


def read_prompts(path: str, flag: str) -> list[str]:
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: file not found")
    with open(path, encoding="utf-8") as f:
        prompts = [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise UsageError(f"{flag} {path}: no prompts (the file is empty)")
    return prompts


def pick_device(cfg):
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {cfg.device}: CUDA is not available here")
    name = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    if device.type == "cpu" and name == "float16":
        raise UsageError("--dtype float16 on CPU: fp16 matmuls are ~500x slower than fp32 there; use float32 or bfloat16")
    return device, getattr(torch, name)


def lora_target_modules(cfg: TrainConfig):
    """--lora-targets as add_lora takes it: "all-linear", or a tuple of layer-name suffixes."""
    return "all-linear" if cfg.lora_targets == "all-linear" else tuple(cfg.lora_targets.split(","))


def load_reward(spec: str, device):
    from .rewards import checked_reward_fn, load_reward_fn, reward_model_fn

    if spec == "default":
        # The response alone: the default prompts are openings of real reviews, and scored together with
        # them most of a batch's reward variance would be the prompts' sentiment, which the policy cannot
        # change; the response's own contribution would drown in it.
        fn = reward_model_fn(default_path("rm"), device, include_prompt=False)
        return checked_reward_fn(fn, "default reward model")
    return load_reward_fn(spec, device)


def run_meta(cfg: TrainConfig) -> dict:
    """What must match for --resume to make sense."""
    keys = ("model", "reward", "lora_r", "lora_alpha", "lora_targets", "lora_layers", "int8", "int8_threshold",
            "batch_size", "mini_batch_size")
    return {k: getattr(cfg, k) for k in keys}


def evaluate(trainer, prompts: list[str], judges: dict, seed: int) -> dict:
    """Sample once per eval prompt with a fixed seed and score with every judge."""
    gen = torch.Generator(device=trainer.device).manual_seed(seed)
    *_, responses = trainer.sample(prompts, trainer.cfg.max_new_tokens, gen)
    scores = {name: dist.guarded(fn, prompts, responses).tolist() for name, fn in judges.items()}
    result = {"prompts": prompts, "responses": responses, "scores": scores}
    for name, values in scores.items():
        key = "rm" if name == "reward" else name
        result[f"{name}_mean"] = sum(values) / len(values)
        result[f"{key}_positive_frac"] = sum(v > 0 for v in values) / len(values)
    return result


def latest_checkpoint(run_dir: str) -> str | None:
    folder = os.path.join(run_dir, "checkpoints")
    steps = [int(n.split("-")[1]) for n in os.listdir(folder) if n.startswith("step-")] if os.path.isdir(folder) else []
    return os.path.join(folder, f"step-{max(steps):06d}") if steps else None


def run(cfg: TrainConfig, progress: bool = True) -> dict:
    """Train; returns summary.json's content."""
    from tqdm import tqdm

    from .checkpoint import load_model
    from .lora import add_lora, save_adapter
    from .report import append_metrics, atomic_write, plot_curve, read_metrics, samples_markdown
    from .rewards import checked_reward_fn, vader_reward
    from .tokenizer import load_tokenizer
    from .trainer import PPOTrainer

    validate(cfg)
    if cfg.plan_memory:  # the answer comes from config.json alone: no weights are read
        from .memory import format_plan, plan_for

        plan = plan_for(cfg)
        print(format_plan(plan))
        return {"plan": plan}
    main = dist.is_main()  # rank 0 writes the run folder (every rank in one process)
    out = cfg.resume or cfg.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    if cfg.resume and not os.path.isdir(cfg.resume):
        raise UsageError(f"--resume {cfg.resume}: no such run folder")
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and ckpt is None:
        raise UsageError(f"--resume {cfg.resume}: no checkpoint in {os.path.join(cfg.resume, 'checkpoints')}")
    if ckpt:
        with open(os.path.join(ckpt, "trainer_state.json")) as f:
            saved = json.load(f)
        for key, value in run_meta(cfg).items():
            if saved.get(key) != value:
                raise UsageError(f"--resume {cfg.resume}: the run used {key}={saved.get(key)!r}, "
                                 f"this command has {key}={value!r}")

    device, dtype = pick_device(cfg)
    device = dist.init(device)  # under torchrun: join the process group, one GPU per rank; else nothing
    torch.manual_seed(cfg.seed)
    model_path = default_path("lm") if cfg.model == "default" else cfg.model
    default_prompts = cfg.prompts == "default"
    prompts = read_prompts(default_path("prompts.txt") if default_prompts else cfg.prompts, "--prompts")
    if cfg.eval_prompts != "default":
        eval_prompts = read_prompts(cfg.eval_prompts, "--eval-prompts")[:cfg.eval_size]
    elif default_prompts:
        eval_prompts = read_prompts(default_path("eval_prompts.txt"), "--eval-prompts")[:cfg.eval_size]
    else:
        eval_prompts = prompts[:cfg.eval_size]
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, dtype=dtype, device=device, int8=cfg.int8, threshold=cfg.int8_threshold)
    add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
             target_modules=lora_target_modules(cfg), layers=cfg.lora_layers or None)
    reward_fn = load_reward(cfg.reward, device)
    judges = {"reward": reward_fn}
    if cfg.reward != "vader":  # an independent judge of what the policy wrote (the response alone),
        judges["vader"] = checked_reward_fn(vader_reward(include_prompt=False), "vader")  # against reward hacking

    trainer = PPOTrainer(model, tokenizer, reward_fn, cfg, device)
    metrics_path = os.path.join(out, "metrics.jsonl")
    eval_seed = cfg.seed + 1_000_003
    if ckpt:
        trainer.load_checkpoint(ckpt)  # every rank reads it (several machines: put the run folder on shared storage)
        before = None
        if main:
            kept = [m for m in read_metrics(metrics_path) if m["step"] <= trainer.step_count]
            atomic_write(metrics_path, "".join(json.dumps(m) + "\n" for m in kept))
            with open(os.path.join(out, "eval_before.json")) as f:
                before = json.load(f)
    else:
        if os.path.exists(metrics_path):
            raise UsageError(f"--out {out}: already holds a run (metrics.jsonl); use --resume {out} or a new folder")
        before = evaluate(trainer, eval_prompts, judges, eval_seed)
        if main:
            os.makedirs(out, exist_ok=True)
            atomic_write(os.path.join(out, "eval_before.json"), json.dumps(before, indent=2))
            atomic_write(os.path.join(out, "config.json"), json.dumps(dataclasses.asdict(cfg), indent=2))

    meta = run_meta(cfg)
    start = time.time()
    bar = tqdm(range(trainer.step_count, cfg.steps), initial=trainer.step_count, total=cfg.steps,
               desc="PPO", disable=not (progress and main), dynamic_ncols=True)
    for step in bar:
        rows = torch.randperm(len(prompts), generator=trainer.gen, device=trainer.device)[:cfg.batch_size]
        if len(prompts) < cfg.batch_size:  # fewer prompts than rollouts: draw with replacement
            rows = torch.randint(len(prompts), (cfg.batch_size,), generator=trainer.gen, device=trainer.device)
        stats, _ = trainer.step([prompts[i] for i in rows.tolist()])  # the same global batch on every rank
        if not main:
            continue
        stats = {"step": step + 1, **stats}
        append_metrics(metrics_path, stats)
        bar.set_postfix(reward=f"{stats['env/reward_mean']:+.3f}", kl=f"{stats['objective/kl']:.2f}",
                        beta=f"{stats['objective/kl_coef']:.3f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            trainer.save_checkpoint(os.path.join(out, "checkpoints", f"step-{step + 1:06d}"), meta)

    after = evaluate(trainer, eval_prompts, judges, eval_seed)
    if not main:
        return {"out": out}
    metrics = read_metrics(metrics_path)
    last = metrics[-5:]
    summary = {
        "model": cfg.model, "reward": cfg.reward, "steps": cfg.steps,
        "before": {k: v for k, v in before.items() if k not in ("prompts", "responses", "scores")},
        "after": {k: v for k, v in after.items() if k not in ("prompts", "responses", "scores")},
        "kl_final": sum(m["objective/kl"] for m in last) / len(last) if last else math.nan,
        "kl_final_is": "mean of objective/kl over the last 5 steps",
        "kl_target": cfg.target_kl if cfg.adaptive_kl else None,
        "train_seconds_this_invocation": round(time.time() - start, 1),
    }
    save_adapter(model, os.path.join(out, "adapter"), base_model_name_or_path=cfg.model)
    trainer.save_value_head(os.path.join(out, "value_head.safetensors"))
    plot_curve(metrics, os.path.join(out, "reward.png"), summary["kl_target"])
    atomic_write(os.path.join(out, "samples.md"), samples_markdown(before, after, list(judges)))
    atomic_write(os.path.join(out, "summary.json"), json.dumps(summary, indent=2))
    summary["out"] = out
    return summary
