"""The job that `python train.py` runs: build the pieces, train (RLOO, GRPO or PPO), write the run folder.

    run(cfg)                          cfg: options.TrainConfig, one flag per field, one section per concern
      validate                        every flag's domain, or one line naming the flag
      run_folder                      a new folder, or a checkpoint whose flags this command repeats (resume.py)
      build                           device, prompts, tokenizer, the base model (int8 by default) + LoRA,
                                      the reward and the judges, the trainer (trainer.py)
      restore_or_evaluate_before      the checkpoint's state, or the base model's eval on fixed prompts
      train_loop                      PPOTrainer.step per batch of prompts; log; checkpoint
      evaluate (after), write_artifacts

    runs/<name>/metrics.jsonl          one line of statistics per step (trl's names)
                reward.png             reward and KL per step
                samples.md             before/after responses on the eval prompts, with their rewards
                summary.json           before/after eval metrics, final KL, time
                config.json            every flag of the run, "auto" resolved
                tensorboard/, wandb/   with --log-with: the same scalars per step, and the samples (tracking.py)
                adapter/               the trained LoRA adapter, in PEFT's format
                tokenizer.json         the base's tokenizer (and tokenizer_config.json), for export.py
                value_head.safetensors (PPO only: rloo and grpo have no value head)
                checkpoints/step-N/    everything needed to resume exactly (--resume runs/<name>)

Under `torchrun --nproc_per_node=W train.py ...` every process runs this same job on its share of each
batch (distributed.py): --batch-size stays the global batch, rank 0 writes the run folder (through
distributed.on_main, so a failed write stops every rank), and every rank evaluates the same eval prompts
(side by side, so it costs no time) to stay in step without waiting.
"""

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from . import distributed as dist, resume
from .atomic import write_text
from .checkpoint import load_model, resolve, stored_quantization
from .cli import UsageError, about
from .embedded import default_path
from .export import write_tokenizer
from .lora import add_lora, parse_targets, save_adapter
from .memory import format_plan, plan_for
from .model_tree import format_tree
from .options import DataConfig, TrainConfig
from .report import append_metrics, plot_curve, read_metrics, samples_markdown
from .rewards import checked_reward_fn, load_reward_fn, reward_model_fn, vader_reward
from .tokenizer import load_tokenizer
from .tracking import NoTracker, open_tracker
from .trainer import PPOTrainer


def read_prompts(path: str, flag: str) -> list[str]:
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: file not found")
    with open(path, encoding="utf-8") as f:
        prompts = [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise UsageError(f"{flag} {path}: no prompts (the file is empty)")
    return prompts


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
    responses = trainer.sample(prompts, trainer.sampling.max_new_tokens, gen).responses
    scores = {name: dist.guarded(fn, prompts, responses).tolist() for name, fn in judges.items()}
    result = {"prompts": prompts, "responses": responses, "scores": scores}
    for name, values in scores.items():
        key = "rm" if name == "reward" else name
        result[f"{name}_mean"] = sum(values) / len(values)
        result[f"{key}_positive_frac"] = sum(v > 0 for v in values) / len(values)
    return result


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
    cfg.validate()
    if cfg.run.plan_memory:
        return plan_only(cfg)  # plan_for follows a 4-bit folder's quantization itself
    cfg = follow_stored_quantization(cfg)
    out, checkpoint = run_folder(cfg)
    job = build(cfg, out, checkpoint)
    before = restore_or_evaluate_before(cfg, job)
    start = time.time()
    first_step = job.trainer.step_count + 1  # a resumed run's checkpoint step + 1
    tracker = open_tracker(cfg.run.log_with, out, cfg.resolved(), first_step) if dist.is_main() else NoTracker()
    try:
        train_loop(cfg, job, progress, tracker)
        after = evaluate(job.trainer, job.eval_prompts, job.judges, eval_seed(cfg))
        summary = dist.on_main(write_artifacts, cfg, job, before, after, time.time() - start, tracker)  # rank 0
    finally:
        tracker.close()
    return summary or {"out": out}


def plan_only(cfg: TrainConfig) -> dict:
    plan = plan_for(cfg)
    print(plan["tree"] + "\n")  # the model the plan is for, as the run would print it at start
    print(format_plan(plan))
    return {"plan": plan}


def run_folder(cfg: TrainConfig) -> tuple[str, str | None]:
    """(the run folder, the checkpoint to resume from): a new run needs a folder without a run in it; a resumed
    one, a checkpoint whose flags this command repeats."""
    r = cfg.run
    if not r.resume:
        out = r.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
        if os.path.exists(os.path.join(out, "metrics.jsonl")):
            raise UsageError(f"--out {out}: already holds a run (metrics.jsonl); use --resume {out} or a new folder")
        return out, None
    if not os.path.isdir(r.resume):
        raise UsageError(f"--resume {r.resume}: no such run folder")
    checkpoint = resume.latest_checkpoint(r.resume)
    if checkpoint is None:
        raise UsageError(f"--resume {r.resume}: no checkpoint in {os.path.join(r.resume, 'checkpoints')}")
    resume.check_flags(resume.read_config(checkpoint), cfg.resolved(), cfg.resume_may_differ(), r.resume)
    return r.resume, checkpoint


def build(cfg: TrainConfig, out: str, checkpoint: str | None) -> Job:
    """Device, prompts, tokenizer, the model (quantized base + LoRA), the reward and the judges, the trainer."""
    device, dtype = cfg.device()
    device = dist.init(device)  # under torchrun: join the process group, one GPU per rank; else nothing
    torch.manual_seed(cfg.run.seed)
    prompts, eval_prompts = load_prompts(cfg.data)
    model = build_model(cfg, device, dtype)
    if dist.is_main():
        print(format_tree(model), flush=True)  # modules, shapes, int8 and LoRA layers, PEFT's trainable line
    with about("--model"):
        tokenizer = load_tokenizer(model_path(cfg))
    with about("--reward"):
        reward_fn = load_reward(cfg.data.reward, device)
    judges = {"reward": reward_fn}
    if cfg.data.reward != "vader":  # an independent judge of what the policy wrote (the response alone),
        judges["vader"] = checked_reward_fn(vader_reward(include_prompt=False), "vader")  # against reward hacking
    trainer = PPOTrainer.for_config(model, tokenizer, reward_fn, cfg, device)
    return Job(out, checkpoint, prompts, eval_prompts, trainer, judges)


def model_path(cfg: TrainConfig) -> str:
    return default_path("lm") if cfg.base.model == "default" else cfg.base.model


def follow_stored_quantization(cfg: TrainConfig) -> TrainConfig:
    """--quantization auto on a folder transformers saved in 4 bits: that folder's nf4 or fp4 (config.json)."""
    if cfg.base.quantization != "auto":
        return cfg
    with about("--model"):
        return dataclasses.replace(cfg, base=cfg.base.following(stored_quantization(model_path(cfg))))


def build_model(cfg: TrainConfig, device, dtype):
    """The policy: the frozen base (int8 blocks unless --no-int8) with LoRA adapters, the only trained part."""
    with about("--model"):
        model = load_model(model_path(cfg), dtype=dtype, device=device, quantization=cfg.base.quantized(),
                           threshold=cfg.base.int8_threshold)
    lo = cfg.lora
    with about("--lora-layers"):  # the other LoRA flags' domains are checked by validate()
        add_lora(model, r=lo.lora_r, alpha=lo.lora_alpha, dropout=lo.lora_dropout,
                 target_modules=parse_targets(lo.lora_targets), layers=lo.lora_layers or None)
    model.gpt_neox.gradient_checkpointing = cfg.base.gradient_checkpointing  # recompute blocks in backward
    return model


def load_prompts(data: DataConfig) -> tuple[list[str], list[str]]:
    """(training prompts, eval prompts) as --prompts, --eval-prompts and --eval-size say."""
    default_prompts = data.prompts == "default"
    prompts = read_prompts(default_path("prompts.txt") if default_prompts else data.prompts, "--prompts")
    if data.eval_prompts != "default":
        return prompts, read_prompts(data.eval_prompts, "--eval-prompts")[:data.eval_size]
    if default_prompts:
        return prompts, read_prompts(default_path("eval_prompts.txt"), "--eval-prompts")[:data.eval_size]
    return prompts, prompts[:data.eval_size]


def eval_seed(cfg: TrainConfig) -> int:
    """The before and after evaluations sample with the same seed: the same noise, so a change is the policy's."""
    return cfg.run.seed + 1_000_003


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
    write_text(os.path.join(out, "config.json"), json.dumps(cfg.resolved(), indent=2))


def train_loop(cfg: TrainConfig, job: Job, progress: bool, tracker) -> None:
    """PPO steps from the checkpoint's step (or 0) to --steps; rank 0 logs each step (metrics.jsonl and the
    --log-with tracker) and writes checkpoints."""
    trainer, main = job.trainer, dist.is_main()
    metrics_path = os.path.join(job.out, "metrics.jsonl")
    config, steps = cfg.resolved(), cfg.run.steps
    bar = tqdm(range(trainer.step_count, steps), initial=trainer.step_count, total=steps,
               desc=cfg.algorithm.algorithm.upper(), disable=not (progress and main), dynamic_ncols=True)
    for step in bar:
        K = trainer.K  # --group-size: K samples of each of --batch-size / K prompts, side by side
        prompts = repeat_each(pick_prompts(job.prompts, cfg.ppo.batch_size // K, trainer), K)
        stats, _ = trainer.step(prompts)  # the same batch on every rank
        stats = {"step": step + 1, **stats}
        if cfg.data.eval_every and (step + 1) % cfg.data.eval_every == 0:
            stats.update(eval_point(cfg, job))
        if main:
            append_metrics(metrics_path, stats)
            tracker.log(stats, step + 1)
            bar.set_postfix(reward=f"{stats['env/reward_mean']:+.3f}", kl=f"{stats['objective/kl']:.2f}",
                            beta=f"{stats['objective/kl_coef']:.3f}")
        if (step + 1) % cfg.run.save_every == 0 or step + 1 == steps:
            folder = os.path.join(job.out, "checkpoints", f"step-{step + 1:06d}")
            dist.on_main(resume.save_checkpoint, folder, trainer, config)


def eval_point(cfg: TrainConfig, job: Job) -> dict:
    """--eval-every: the evaluation's numbers on the first --eval-every-size eval prompts, as eval/... keys.
    Same seed as the before/after evaluations (so these prompts get the same noise rows as there), and its own
    generator: the training's random streams are untouched, so the run's numbers do not depend on it."""
    prompts = job.eval_prompts[:cfg.data.eval_every_size]
    result = evaluate(job.trainer, prompts, job.judges, eval_seed(cfg))
    return {f"eval/{k}": v for k, v in result.items() if isinstance(v, float)}


def pick_prompts(prompts: list[str], batch_size: int, trainer) -> list[str]:
    """One step's prompts, drawn from the trainer's generator (so a resumed run draws the same ones)."""
    rows = torch.randperm(len(prompts), generator=trainer.gen, device=trainer.device)[:batch_size]
    if len(prompts) < batch_size:  # fewer prompts than rollouts: draw with replacement
        rows = torch.randint(len(prompts), (batch_size,), generator=trainer.gen, device=trainer.device)
    return [prompts[i] for i in rows.tolist()]


def repeat_each(prompts: list[str], K: int) -> list[str]:
    """[a, b] -> [a, a, b, b] for K = 2: each prompt's K rows adjacent, as group_baselines.py reads them."""
    return [p for p in prompts for _ in range(K)]


def write_artifacts(cfg: TrainConfig, job: Job, before: dict, after: dict, seconds: float, tracker) -> dict:
    """adapter/, the tokenizer, value_head.safetensors (PPO), reward.png, samples.md and summary.json; returns the
    summary."""
    metrics = read_metrics(os.path.join(job.out, "metrics.jsonl"))
    last = metrics[-5:]
    summary = {
        "model": cfg.base.model, "reward": cfg.data.reward, "algorithm": cfg.algorithm.algorithm,
        "group_size": cfg.algorithm.group(), "steps": cfg.run.steps,
        "before": {k: v for k, v in before.items() if k not in ("prompts", "responses", "scores")},
        "after": {k: v for k, v in after.items() if k not in ("prompts", "responses", "scores")},
        "kl_final": sum(m["objective/kl"] for m in last) / len(last) if last else math.nan,
        "kl_final_is": "mean of objective/kl over the last 5 steps",
        "kl_target": cfg.ppo.target_kl if cfg.ppo.adaptive_kl else None,
        "train_seconds_this_invocation": round(seconds, 1),
    }
    save_adapter(job.trainer.model, os.path.join(job.out, "adapter"), base_model_name_or_path=cfg.base.model)
    write_tokenizer(job.trainer.tokenizer, resolve(model_path(cfg)), job.out)  # python -m minirlhf.export reads it next to adapter/
    if job.trainer.value_head is not None:
        resume.save_value_head(job.trainer.value_head, os.path.join(job.out, resume.VALUE_HEAD_FILE))
    plot_curve(metrics, os.path.join(job.out, "reward.png"), summary["kl_target"], cfg.algorithm.algorithm)
    samples = samples_markdown(before, after, list(job.judges), cfg.algorithm.algorithm)
    write_text(os.path.join(job.out, "samples.md"), samples)
    tracker.text("samples", samples, cfg.run.steps)  # the before/after table, as text
    write_text(os.path.join(job.out, "summary.json"), json.dumps(summary, indent=2))
    return {**summary, "out": job.out}
