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

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from . import devices, distributed as dist, resume
from .atomic import write_text
from .checkpoint import load_model
from .cli import UsageError, about, flag
from .embedded import default_path
from .lora import add_lora, parse_targets, save_adapter
from .memory import format_plan, plan_for
from .report import append_metrics, plot_curve, read_metrics, samples_markdown
from .rewards import checked_reward_fn, load_reward_fn, reward_model_fn, vader_reward
from .tokenizer import load_tokenizer
from .trainer import PPOTrainer


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
    """How many eval prompts to sample and score before and after training, >= 1 (the shipped default has 512:
    one sample each, so a share like rm_positive_frac is measured to about +-0.02)."""
    steps: int = 100
    """PPO steps, >= 1 (each samples --batch-size prompts)."""
    batch_size: int = 32
    """Rollouts per PPO step in all, >= 1: under torchrun each of the W processes samples --batch-size / W."""
    mini_batch_size: int = 8
    """Rollouts per gradient step, >= 1; must divide --batch-size (and be divisible by torchrun's process count)."""
    ppo_epochs: int = 4
    """Passes over each batch of rollouts, >= 1."""
    generation_batch_size: int = 0
    """Rows sampled at once, in rollouts and in the before/after evaluation, >= 0 (0: --batch-size). Smaller chunks
    bound the KV cache, the biggest thing generation holds (--plan-memory shows it); trl's
    PPOTrainer.generate samples 4 at a time. The samples do not depend on it."""
    lr: float = 5e-4
    """AdamW learning rate for the adapters and the value head, > 0."""
    weight_decay: float = 0.0
    """AdamW weight decay, >= 0 (0 makes it trl's Adam)."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm of the trainable parameters to this, >= 0 (0 = no clipping)."""
    lora_r: int = 8
    """LoRA rank, >= 1."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator, > 0: the update is (alpha / r) * B @ A."""
    lora_dropout: float = 0.0
    """Dropout on the adapter input during updates, in [0, 1). Off by default: PPO's ratio compares two passes of the same
    weights and dropout makes them differ by noise (trl never applies it either: its passes run in eval mode)."""
    lora_targets: str = "query_key_value"
    """Comma-separated layer names that get adapters (query_key_value, dense, dense_h_to_4h,
    dense_4h_to_h) or "all-linear"."""
    lora_layers: int = 0
    """Adapters only in the last N blocks (trlX's num_layers_unfrozen), >= 0; 0 = every block."""
    int8: bool = True
    """Hold the frozen base in int8 and run LLM.int8() (--no-int8 keeps it in floating point)."""
    int8_threshold: float = 6.0
    """LLM.int8() outlier threshold, >= 0: activation columns with any |x| >= this run in floating point."""
    kl_estimator: str = "kl"
    """Per-token KL estimate in the reward, one of: kl (log p - log q), abs, mse (half squared), full (exact, whole vocab)."""
    init_kl_coef: float = 0.15
    """Initial KL coefficient beta, >= 0. trl's default is 0.2; why the embedded default uses 0.15: the README's
    notes on that run."""
    adaptive_kl: bool = True
    """Adapt beta so the KL per sequence tracks --target-kl (Ziegler et al. 2019); --no-adaptive-kl keeps it fixed."""
    target_kl: float = 6.0
    """KL per sequence (nats) that the adaptive controller aims for, > 0."""
    horizon: float = 10000.0
    """Adaptive KL controller horizon, > 0: larger = slower beta changes."""
    early_stop_kl: float = 0.0
    """Stop a step's PPO epochs when a minibatch's policy KL exceeds 1.5x this (trl's early_stopping), >= 0; 0 = off."""
    ratio_threshold: float = 10.0
    """Skip (zero the loss of) a minibatch whose mean probability ratio exceeds this, > 1."""
    gamma: float = 1.0
    """Discount factor, in [0, 1]."""
    lam: float = 0.95
    """GAE lambda, in [0, 1]."""
    cliprange: float = 0.2
    """PPO policy-ratio clip range, in (0, 1): the ratio is clipped to [1 - c, 1 + c]."""
    cliprange_value: float = 0.2
    """Value-prediction clip range, > 0."""
    vf_coef: float = 0.1
    """Value loss weight, >= 0."""
    min_new_tokens: int = 4
    """Response lengths are drawn uniformly from [min, max] per rollout (trl's LengthSampler), 1 <= min <= max; no eos before min.
    4-16 are the lengths of trl's sentiment example."""
    max_new_tokens: int = 16
    """Longest response (and the length of every evaluation response), >= --min-new-tokens."""
    max_prompt_tokens: int = 64
    """Prompts longer than this keep their last tokens, >= 1."""
    temperature: float = 1.0
    """Sampling temperature, > 0 (log-probs use the same temperature)."""
    top_k: int = 0
    """Sample among the k most likely tokens, >= 0; 0 = all."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]; 1.0 = off."""
    seed: int = 0
    """Seed for prompts, lengths, sampling, minibatch order and dropout, in [0, 2**63)."""
    device: str = "auto"
    """cpu, cuda, cuda:N (a GPU this machine has), or auto (cuda when available)."""
    dtype: str = "auto"
    """Float parts of the model: float32, bfloat16, float16 (GPU only), or auto (bfloat16 on GPU, float32 on CPU)."""
    gradient_checkpointing: bool = False
    """Recompute each transformer block in the backward pass instead of keeping its activations: less memory
    for long responses and big models, at the cost of about one more forward pass per update."""
    out: str = ""
    """Run folder (new, or one holding no run yet); default: a new folder under runs/."""
    resume: str = ""
    """Continue the run in this folder from its latest checkpoint, to the numbers it would have had. A flag that
    would change the run is refused; these may differ: --steps (not below the run's), --save-every,
    --generation-batch-size, --gradient-checkpointing, --plan-memory, --memory-gb."""
    save_every: int = 50
    """Write a checkpoint every N steps (and at the end), >= 1."""
    plan_memory: bool = False
    """Print how much memory this run needs (int8 weights, float parts, LoRA, AdamW, KV cache, activations, with and
    without gradient checkpointing) against the device's memory, reading only config.json, and exit."""
    memory_gb: float = 0.0
    """Memory budget in GB (1e9 bytes) for --plan-memory, >= 0; 0 = this device's memory (the GPU's, else the RAM)."""


KL_ESTIMATORS = ("kl", "abs", "mse", "full")
LORA_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
# Fields that may differ on --resume: they extend the run or change how it is computed, never its numbers
# (chunked sampling and recomputed activations give the same values: tests/test_trainer.py and
# tests/test_gradient_checkpointing.py). "steps" may only grow.
RESUME_MAY_DIFFER = ("steps", "save_every", "generation_batch_size", "gradient_checkpointing", "plan_memory",
                     "memory_gb", "out", "resume")


def _check(ok: bool, name: str, value, domain: str) -> None:
    """One rule of a flag's domain: --name must be `domain`, else a UsageError naming the flag and the value."""
    if not ok:
        raise UsageError(f"{flag(name)} must be {domain}, got {value!r}")


def validate(cfg: TrainConfig) -> None:
    """Every field's domain, as its doc states it, and the relations between fields. Comparisons are written
    so that NaN fails them, and every float must be finite."""
    for f in dataclasses.fields(cfg):
        if f.type in (float, "float"):
            _check(math.isfinite(getattr(cfg, f.name)), f.name, getattr(cfg, f.name), "a finite number")
    for name in ("steps", "batch_size", "mini_batch_size", "ppo_epochs", "lora_r", "eval_size", "min_new_tokens",
                 "max_prompt_tokens", "save_every"):
        _check(getattr(cfg, name) >= 1, name, getattr(cfg, name), ">= 1")
    for name in ("generation_batch_size", "lora_layers", "top_k"):
        _check(getattr(cfg, name) >= 0, name, getattr(cfg, name), ">= 0")
    for name in ("lr", "lora_alpha", "target_kl", "horizon", "cliprange_value", "temperature"):
        _check(getattr(cfg, name) > 0, name, getattr(cfg, name), "> 0")
    for name in ("weight_decay", "max_grad_norm", "int8_threshold", "init_kl_coef", "early_stop_kl", "vf_coef",
                 "memory_gb"):
        _check(getattr(cfg, name) >= 0, name, getattr(cfg, name), ">= 0")
    for name in ("gamma", "lam"):
        _check(0 <= getattr(cfg, name) <= 1, name, getattr(cfg, name), "in [0, 1]")
    _check(0 <= cfg.lora_dropout < 1, "lora_dropout", cfg.lora_dropout, "in [0, 1)")
    _check(0 < cfg.cliprange < 1, "cliprange", cfg.cliprange, "in (0, 1)")
    _check(0 < cfg.top_p <= 1, "top_p", cfg.top_p, "in (0, 1]")
    _check(cfg.ratio_threshold > 1, "ratio_threshold", cfg.ratio_threshold, "> 1")
    _check(0 <= cfg.seed < 2**63, "seed", cfg.seed, "in [0, 2**63)")
    _check(cfg.kl_estimator in KL_ESTIMATORS, "kl_estimator", cfg.kl_estimator, "one of " + ", ".join(KL_ESTIMATORS))
    _check(cfg.lora_targets == "all-linear" or all(t.split(".")[-1] in LORA_TARGETS for t in cfg.lora_targets.split(",")),
           "lora_targets", cfg.lora_targets, "all-linear or a comma-separated list of " + ", ".join(LORA_TARGETS))
    for name in ("model", "reward", "prompts", "eval_prompts"):
        _check(getattr(cfg, name).strip() != "", name, getattr(cfg, name), 'a name, a path or "default"')
    if cfg.min_new_tokens > cfg.max_new_tokens:
        raise UsageError(f"--min-new-tokens {cfg.min_new_tokens} is above --max-new-tokens {cfg.max_new_tokens}")
    if cfg.batch_size % cfg.mini_batch_size:
        raise UsageError(f"--batch-size {cfg.batch_size} is not divisible by --mini-batch-size {cfg.mini_batch_size}")
    world = dist.world_size()  # every minibatch is shared equally by the processes torchrun started
    if cfg.mini_batch_size % world:
        raise UsageError(f"--mini-batch-size {cfg.mini_batch_size} is not divisible by the {world} processes "
                         "torchrun started (each takes an equal share of every minibatch)")
    if cfg.out and os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise UsageError(f"--out {cfg.out}: exists and is not a folder")
    if cfg.resume and cfg.out and os.path.abspath(cfg.out) != os.path.abspath(cfg.resume):
        raise UsageError(f"--out {cfg.out} with --resume {cfg.resume}: a resumed run stays in its own folder")
    pick_device(cfg)  # the device exists here, and the dtype suits it


def read_prompts(path: str, flag: str) -> list[str]:
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: file not found")
    with open(path, encoding="utf-8") as f:
        prompts = [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise UsageError(f"{flag} {path}: no prompts (the file is empty)")
    return prompts


def pick_device(cfg: TrainConfig) -> tuple[torch.device, torch.dtype]:
    """The run's device and float dtype (devices.py); a memory plan may name a GPU this machine lacks."""
    return devices.pick(cfg.device, cfg.dtype, present=not cfg.plan_memory)


def load_reward(spec: str, device):
    if spec == "default":
        # The response alone: the default prompts are openings of real reviews, and scored together with
        # them most of a batch's reward variance would be the prompts' sentiment, which the policy cannot
        # change; the response's own contribution would drown in it.
        fn = reward_model_fn(default_path("rm"), device, include_prompt=False)
        return checked_reward_fn(fn, "default reward model")
    return load_reward_fn(spec, device)


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


def resolved_config(cfg: TrainConfig) -> dict:
    """Every flag of the run, with --device and --dtype as they were resolved here: what a checkpoint stores."""
    device, dtype = pick_device(cfg)
    return {**dataclasses.asdict(cfg), "device": str(device), "dtype": str(dtype).removeprefix("torch.")}


@dataclass
class Job:
    """What a run builds before it trains: the pieces every later step uses."""
    out: str  # the run folder
    checkpoint: str | None  # the checkpoint to resume from (None: a new run)
    prompts: list[str]
    eval_prompts: list[str]
    trainer: PPOTrainer
    judges: dict  # name -> reward function, for the before/after evaluation


def run(cfg: TrainConfig, progress: bool = True) -> dict:
    """Train; returns summary.json's content ({"plan": ...} with --plan-memory, which loads no weights)."""
    validate(cfg)
    if cfg.plan_memory:
        return plan_only(cfg)
    out, checkpoint = run_folder(cfg)
    job = build(cfg, out, checkpoint)
    before = restore_or_evaluate_before(cfg, job)
    start = time.time()
    train_loop(cfg, job, progress)
    after = evaluate(job.trainer, job.eval_prompts, job.judges, eval_seed(cfg))
    summary = dist.on_main(write_artifacts, cfg, job, before, after, time.time() - start)  # rank 0 writes them
    return summary or {"out": out}


def plan_only(cfg: TrainConfig) -> dict:
    plan = plan_for(cfg)
    print(format_plan(plan))
    return {"plan": plan}


def run_folder(cfg: TrainConfig) -> tuple[str, str | None]:
    """(the run folder, the checkpoint to resume from): a new run needs a folder without a run in it; a resumed
    one, a checkpoint whose flags this command repeats."""
    if not cfg.resume:
        out = cfg.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
        if os.path.exists(os.path.join(out, "metrics.jsonl")):
            raise UsageError(f"--out {out}: already holds a run (metrics.jsonl); use --resume {out} or a new folder")
        return out, None
    if not os.path.isdir(cfg.resume):
        raise UsageError(f"--resume {cfg.resume}: no such run folder")
    checkpoint = resume.latest_checkpoint(cfg.resume)
    if checkpoint is None:
        raise UsageError(f"--resume {cfg.resume}: no checkpoint in {os.path.join(cfg.resume, 'checkpoints')}")
    resume.check_flags(resume.read_config(checkpoint), resolved_config(cfg), RESUME_MAY_DIFFER, cfg.resume)
    return cfg.resume, checkpoint


def build(cfg: TrainConfig, out: str, checkpoint: str | None) -> Job:
    """Device, prompts, tokenizer, the model (quantized base + LoRA), the reward and the judges, the trainer."""
    device, dtype = pick_device(cfg)
    device = dist.init(device)  # under torchrun: join the process group, one GPU per rank; else nothing
    torch.manual_seed(cfg.seed)
    prompts, eval_prompts = load_prompts(cfg)
    model_path = default_path("lm") if cfg.model == "default" else cfg.model
    with about("--model"):
        tokenizer = load_tokenizer(model_path)
        model = load_model(model_path, dtype=dtype, device=device, int8=cfg.int8, threshold=cfg.int8_threshold)
    with about("--lora-layers"):  # the other LoRA flags' domains are checked by validate()
        add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                 target_modules=parse_targets(cfg.lora_targets), layers=cfg.lora_layers or None)
    with about("--reward"):
        reward_fn = load_reward(cfg.reward, device)
    judges = {"reward": reward_fn}
    if cfg.reward != "vader":  # an independent judge of what the policy wrote (the response alone),
        judges["vader"] = checked_reward_fn(vader_reward(include_prompt=False), "vader")  # against reward hacking
    trainer = PPOTrainer(model, tokenizer, reward_fn, cfg, device)
    return Job(out, checkpoint, prompts, eval_prompts, trainer, judges)


def load_prompts(cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """(training prompts, eval prompts) as --prompts, --eval-prompts and --eval-size say."""
    default_prompts = cfg.prompts == "default"
    prompts = read_prompts(default_path("prompts.txt") if default_prompts else cfg.prompts, "--prompts")
    if cfg.eval_prompts != "default":
        return prompts, read_prompts(cfg.eval_prompts, "--eval-prompts")[:cfg.eval_size]
    if default_prompts:
        return prompts, read_prompts(default_path("eval_prompts.txt"), "--eval-prompts")[:cfg.eval_size]
    return prompts, prompts[:cfg.eval_size]


def eval_seed(cfg: TrainConfig) -> int:
    """The before and after evaluations sample with the same seed: the same noise, so a change is the policy's."""
    return cfg.seed + 1_000_003


def restore_or_evaluate_before(cfg: TrainConfig, job: Job) -> dict | None:
    """A resumed run: the checkpoint's state, and the before-eval it wrote. A new run: evaluate the base and
    start the run folder. Returns the before-eval on rank 0 (None elsewhere)."""
    metrics_path = os.path.join(job.out, "metrics.jsonl")
    main = dist.is_main()
    if job.checkpoint:
        resume.load_checkpoint(job.checkpoint, job.trainer)  # every rank reads it (several machines: shared storage)
        if not main:
            return None
        kept = [m for m in read_metrics(metrics_path) if m["step"] <= job.trainer.step_count]
        write_text(metrics_path, "".join(json.dumps(m) + "\n" for m in kept))  # steps after the checkpoint rerun
        with open(os.path.join(job.out, "eval_before.json")) as f:
            return json.load(f)
    before = evaluate(job.trainer, job.eval_prompts, job.judges, eval_seed(cfg))
    dist.on_main(start_run_folder, cfg, job.out, before)
    return before


def start_run_folder(cfg: TrainConfig, out: str, before: dict) -> None:
    write_text(os.path.join(out, "eval_before.json"), json.dumps(before, indent=2))
    write_text(os.path.join(out, "config.json"), json.dumps(resolved_config(cfg), indent=2))


def train_loop(cfg: TrainConfig, job: Job, progress: bool) -> None:
    """PPO steps from the checkpoint's step (or 0) to --steps; rank 0 logs each step and writes checkpoints."""
    trainer, main = job.trainer, dist.is_main()
    metrics_path = os.path.join(job.out, "metrics.jsonl")
    config = resolved_config(cfg)
    bar = tqdm(range(trainer.step_count, cfg.steps), initial=trainer.step_count, total=cfg.steps,
               desc="PPO", disable=not (progress and main), dynamic_ncols=True)
    for step in bar:
        stats, _ = trainer.step(pick_prompts(job.prompts, cfg.batch_size, trainer))  # the same batch on every rank
        stats = {"step": step + 1, **stats}
        if main:
            append_metrics(metrics_path, stats)
            bar.set_postfix(reward=f"{stats['env/reward_mean']:+.3f}", kl=f"{stats['objective/kl']:.2f}",
                            beta=f"{stats['objective/kl_coef']:.3f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            folder = os.path.join(job.out, "checkpoints", f"step-{step + 1:06d}")
            dist.on_main(resume.save_checkpoint, folder, trainer, config)


def pick_prompts(prompts: list[str], batch_size: int, trainer) -> list[str]:
    """One step's prompts, drawn from the trainer's generator (so a resumed run draws the same ones)."""
    rows = torch.randperm(len(prompts), generator=trainer.gen, device=trainer.device)[:batch_size]
    if len(prompts) < batch_size:  # fewer prompts than rollouts: draw with replacement
        rows = torch.randint(len(prompts), (batch_size,), generator=trainer.gen, device=trainer.device)
    return [prompts[i] for i in rows.tolist()]


def write_artifacts(cfg: TrainConfig, job: Job, before: dict, after: dict, seconds: float) -> dict:
    """adapter/, value_head.safetensors, reward.png, samples.md and summary.json; returns the summary."""
    metrics = read_metrics(os.path.join(job.out, "metrics.jsonl"))
    last = metrics[-5:]
    summary = {
        "model": cfg.model, "reward": cfg.reward, "steps": cfg.steps,
        "before": {k: v for k, v in before.items() if k not in ("prompts", "responses", "scores")},
        "after": {k: v for k, v in after.items() if k not in ("prompts", "responses", "scores")},
        "kl_final": sum(m["objective/kl"] for m in last) / len(last) if last else math.nan,
        "kl_final_is": "mean of objective/kl over the last 5 steps",
        "kl_target": cfg.target_kl if cfg.adaptive_kl else None,
        "train_seconds_this_invocation": round(seconds, 1),
    }
    save_adapter(job.trainer.model, os.path.join(job.out, "adapter"), base_model_name_or_path=cfg.model)
    resume.save_value_head(job.trainer.value_head, os.path.join(job.out, "value_head.safetensors"))
    plot_curve(metrics, os.path.join(job.out, "reward.png"), summary["kl_target"])
    write_text(os.path.join(job.out, "samples.md"), samples_markdown(before, after, list(job.judges)))
    write_text(os.path.join(job.out, "summary.json"), json.dumps(summary, indent=2))
    return {**summary, "out": job.out}
