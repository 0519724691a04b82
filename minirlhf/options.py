"""TrainConfig: every flag of train.py, one small dataclass per concern, each field's domain written and enforced.

    TrainConfig
      base      BaseConfig       the model and how its frozen base is held: --model, --int8, --dtype, ...
      lora      LoRAConfig       the adapters: --lora-r, --lora-alpha, --lora-targets, ...
      algorithm AlgorithmConfig  which RL algorithm: ppo (learned critic) or rloo / grpo (group baselines), K
      ppo       PPOConfig        the shared loop: batch sizes, epochs, KL penalty, clipping; PPO's GAE, value loss
      shaping   ShapingConfig    PPO's reward shaping (trl's score scaling / norm / clip, reward whitening)
      optim     OptimizerConfig  AdamW on the adapters and the value head: --lr, --weight-decay, --max-grad-norm
      sampling  SamplingConfig   how responses are sampled: lengths, temperature, top-k/p, rows at a time
      data      DataConfig       prompts, the reward, the before/after evaluation
      run       RunConfig        steps, seed, device, the run folder, resume, memory planning

Each field is one flag (its name with "-" for "_": lora_r -> --lora-r), documented by the string under it,
which is also its --help text and states the values it may take; `validate` enforces exactly those. Field
names are unique across sections, so `TrainConfig.from_flags(lr=1e-3, lora_r=16)` (what train.py's parser
produces, and the short way to build one in Python) knows where each value goes. Each component takes the
section it needs: the trainer the ppo, optim and sampling sections; the planner the whole config.
"""

import dataclasses
import math
import os
from dataclasses import dataclass, field

from . import devices, distributed as dist
from .cli import UsageError, flag
from .quantize import QUANTIZATIONS
from .tracking import TRACKERS, missing_package

ALGORITHMS = ("ppo", "rloo", "grpo")
GRPO_SCALES = ("group", "batch", "none")  # trl GRPOConfig.scale_rewards
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")  # trl GRPOConfig.loss_type (its dapo is bnpo without accumulation)
KL_ESTIMATORS = ("kl", "abs", "mse", "full")
LR_SCHEDULES = ("constant", "linear", "cosine")
QUANTIZATION_CHOICES = ("auto", *QUANTIZATIONS)  # auto: int8, or none with --no-int8
LORA_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


@dataclass
class BaseConfig:
    model: str = "default"
    """Base model: a Hub id (EleutherAI/pythia-410m) or a folder with config.json + safetensors. "default" is
    the small movie-review GPT-NeoX shipped inside the package."""
    int8: bool = True
    """Hold the frozen base in int8 and run LLM.int8() (--no-int8 keeps it in floating point)."""
    quantization: str = "auto"
    """How the blocks' linear layers are held: int8 (LLM.int8()), nf4 or fp4 (4-bit blocks of 64 with double
    quantization, QLoRA), none (floating point), or auto: a --model folder saved 4-bit by transformers +
    bitsandbytes loads as it is, with its own nf4 or fp4; any other model int8, or none with --no-int8.
    --no-int8 with int8, nf4 or fp4 is an error."""
    int8_threshold: float = 6.0
    """LLM.int8() outlier threshold, >= 0: activation columns with any |x| >= this run in floating point."""
    dtype: str = "auto"
    """Float parts of the model: float32, bfloat16, float16 (GPU only), or auto (bfloat16 on a GPU and on a CPU
    with AVX512-BF16 or AMX, float32 on other CPUs: devices.float_dtype)."""
    gradient_checkpointing: bool = False
    """Recompute each transformer block in the backward pass instead of keeping its activations: less memory
    for long responses and big models, at the cost of about one more forward pass per update."""

    def validate(self) -> None:
        _check(self.int8_threshold >= 0, "int8_threshold", self.int8_threshold, ">= 0")
        _check(self.quantization in QUANTIZATION_CHOICES, "quantization", self.quantization,
               "one of " + ", ".join(QUANTIZATION_CHOICES))
        if not self.int8 and self.quantization not in ("auto", "none"):
            raise UsageError(f"--no-int8 conflicts with --quantization {self.quantization} "
                             "(--no-int8 means --quantization none)")
        _check(self.model.strip() != "", "model", self.model, 'a Hub id, a folder or "default"')

    def following(self, stored: str | None) -> "BaseConfig":
        """This config with --quantization auto resolved to `stored`, the 4-bit type (nf4 / fp4) the --model
        folder holds (checkpoint.stored_quantization); unchanged for a float folder, an explicit
        --quantization or --no-int8 (load_model then refuses a 4-bit folder in one line)."""
        if stored is None or self.quantization != "auto" or not self.int8:
            return self
        return dataclasses.replace(self, quantization=stored)

    def quantized(self) -> str:
        """What the blocks are held as: none, int8, nf4 or fp4 (auto resolved through --int8 / --no-int8)."""
        if self.quantization == "auto":
            return "int8" if self.int8 else "none"
        return self.quantization


@dataclass
class LoRAConfig:
    lora_r: int = 8
    """LoRA rank, >= 1."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator, > 0: the update is (alpha / r) * B @ A."""
    lora_dropout: float = 0.0
    """Dropout on the adapter input during updates, in [0, 1). Off by default: PPO's ratio compares two passes of the
    same weights and dropout makes them differ by noise (trl never applies it either: its passes run in eval mode)."""
    lora_targets: str = "query_key_value"
    """Comma-separated layer names that get adapters (query_key_value, dense, dense_h_to_4h,
    dense_4h_to_h) or "all-linear"."""
    lora_layers: int = 0
    """Adapters only in the last N blocks (trlX's num_layers_unfrozen), >= 0; 0 = every block."""

    def validate(self) -> None:
        _check(self.lora_r >= 1, "lora_r", self.lora_r, ">= 1")
        _check(self.lora_alpha > 0, "lora_alpha", self.lora_alpha, "> 0")
        _check(0 <= self.lora_dropout < 1, "lora_dropout", self.lora_dropout, "in [0, 1)")
        _check(self.lora_layers >= 0, "lora_layers", self.lora_layers, ">= 0")
        names = self.lora_targets.split(",")
        _check(self.lora_targets == "all-linear" or all(n.split(".")[-1] in LORA_TARGETS for n in names),
               "lora_targets", self.lora_targets, "all-linear or a comma-separated list of " + ", ".join(LORA_TARGETS))


@dataclass
class AlgorithmConfig:
    algorithm: str = "rloo"
    """The RL algorithm, one of: ppo (trl's PPOTrainer: a value head, GAE), rloo (trl's RLOOTrainer: the mean
    reward of the other samples of the same prompt as baseline), grpo (DeepSeekMath: group-normalized scores,
    KL to the reference in the loss). rloo and grpo train no value head (group_baselines.py). rloo is the
    default: on the embedded default it beat PPO on seeds 0, 1 and 2 (on seeds 3 and 4 PPO was ahead: the
    README's RLOO section); PPO's recipe from before is --algorithm ppo --init-kl-coef 0.15 --lr-schedule
    constant."""
    group_size: int = 0
    """Responses sampled per prompt, K >= 0: each step takes --batch-size / K prompts, K copies each, side by side
    in the batch. 0 = auto: 1 for ppo, 4 for rloo and grpo (which need K >= 2)."""
    scale_rewards: str = "group"
    """GRPO only: what divides a score's distance to its group's mean (trl's GRPOConfig.scale_rewards), one of:
    group (the group's std, DeepSeekMath), batch (the std of the whole batch's scores), none (nothing: Dr. GRPO,
    Liu et al. 2025, for whom the group std over-weights prompts whose samples barely differ)."""
    loss_type: str = "grpo"
    """GRPO only: how its per-token losses are averaged (trl's GRPOConfig.loss_type), one of: grpo (over each
    response's tokens, then over the responses: DeepSeekMath), bnpo (over all response tokens of the minibatch),
    dr_grpo (summed per response, divided by --max-new-tokens: Dr. GRPO; no length bias)."""

    def validate(self) -> None:
        _check(self.algorithm in ALGORITHMS, "algorithm", self.algorithm, "one of " + ", ".join(ALGORITHMS))
        _check(self.group_size >= 0, "group_size", self.group_size, ">= 0")
        _check(self.scale_rewards in GRPO_SCALES, "scale_rewards", self.scale_rewards, "one of " + ", ".join(GRPO_SCALES))
        _check(self.loss_type in GRPO_LOSS_TYPES, "loss_type", self.loss_type, "one of " + ", ".join(GRPO_LOSS_TYPES))
        if self.algorithm != "ppo" and self.group_size == 1:
            raise UsageError(f"--group-size 1 with --algorithm {self.algorithm}: its baseline is the other samples "
                             "of the same prompt, so it needs K >= 2")

    def group(self) -> int:
        """K, "auto" resolved: the number of responses per prompt."""
        if self.group_size:
            return self.group_size
        return 1 if self.algorithm == "ppo" else 4


@dataclass
class PPOConfig:
    batch_size: int = 32
    """Rollouts per PPO step in all, >= 1: under torchrun each of the W processes samples --batch-size / W."""
    mini_batch_size: int = 8
    """Rollouts per gradient step, >= 1; must divide --batch-size (and be divisible by torchrun's process count)."""
    ppo_epochs: int = 4
    """Passes over each batch of rollouts, >= 1."""
    kl_estimator: str = "kl"
    """Per-token KL estimate in the reward, one of: kl (log p - log q), abs, mse (half squared), full (exact, whole vocab)."""
    init_kl_coef: float = 0.1
    """Initial KL coefficient beta, >= 0. trl's PPOConfig default is 0.2, its RLOOConfig's 0.05; why the embedded
    default uses 0.1 (and PPO there 0.15): the README's notes on those runs."""
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

    def validate(self) -> None:
        for name in ("batch_size", "mini_batch_size", "ppo_epochs"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        for name in ("target_kl", "horizon", "cliprange_value"):
            _check(getattr(self, name) > 0, name, getattr(self, name), "> 0")
        for name in ("init_kl_coef", "early_stop_kl", "vf_coef"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        for name in ("gamma", "lam"):
            _check(0 <= getattr(self, name) <= 1, name, getattr(self, name), "in [0, 1]")
        _check(0 < self.cliprange < 1, "cliprange", self.cliprange, "in (0, 1)")
        _check(self.ratio_threshold > 1, "ratio_threshold", self.ratio_threshold, "> 1")
        _check(self.kl_estimator in KL_ESTIMATORS, "kl_estimator", self.kl_estimator,
               "one of " + ", ".join(KL_ESTIMATORS))
        if self.batch_size % self.mini_batch_size:
            raise UsageError(f"--batch-size {self.batch_size} is not divisible by --mini-batch-size "
                             f"{self.mini_batch_size}")
        world = dist.world_size()  # every minibatch is shared equally by the processes torchrun started
        if self.mini_batch_size % world:
            raise UsageError(f"--mini-batch-size {self.mini_batch_size} is not divisible by the {world} processes "
                             "torchrun started (each takes an equal share of every minibatch)")


@dataclass
class ShapingConfig:
    use_score_scaling: bool = False
    """PPO: divide each step's scores by the running std of all scores so far (trl's use_score_scaling, its
    RunningMoments over every batch, saved in checkpoints)."""
    use_score_norm: bool = False
    """PPO, with --use-score-scaling: also subtract the running mean (trl's use_score_norm)."""
    score_clip: float = 0.0
    """PPO: clip the (scaled) scores to [-c, c], c >= 0 (trl's score_clip); 0 = off."""
    whiten_rewards: bool = False
    """PPO: whiten the per-token rewards (KL penalty + score) over the batch before GAE, scale only, the mean
    kept (trl's whiten_rewards)."""

    def validate(self) -> None:
        _check(self.score_clip >= 0, "score_clip", self.score_clip, ">= 0")
        if self.use_score_norm and not self.use_score_scaling:
            raise UsageError("--use-score-norm needs --use-score-scaling (trl applies the norm only with the scaling)")


@dataclass
class OptimizerConfig:
    lr: float = 5e-4
    """AdamW learning rate for the adapters and the value head, > 0."""
    weight_decay: float = 0.0
    """AdamW weight decay, >= 0 (0 makes it trl's Adam)."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm of the trainable parameters to this, >= 0 (0 = no clipping)."""
    adam_betas: str = "0.9,0.999"
    """AdamW's beta1,beta2, each in [0, 1) (trlX's configs often use 0.9,0.95)."""
    adam_eps: float = 1e-8
    """AdamW's epsilon, > 0."""
    lr_schedule: str = "cosine"
    """Learning rate per optimizer step: constant, linear (to --lr-min) or cosine (annealed to --lr-min, torch's
    CosineAnnealingLR), over the run's --steps x --ppo-epochs x minibatches optimizer steps. cosine is the
    default: it stops the late drift of the KL once the reward levels off (the README's RLOO section)."""
    lr_min: float = 0.0
    """The learning rate the linear and cosine schedules end at, in [0, --lr]."""

    def validate(self) -> None:
        _check(self.lr > 0, "lr", self.lr, "> 0")
        for name in ("weight_decay", "max_grad_norm"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        _check(self.adam_eps > 0, "adam_eps", self.adam_eps, "> 0")
        _check(self.lr_schedule in LR_SCHEDULES, "lr_schedule", self.lr_schedule, "one of " + ", ".join(LR_SCHEDULES))
        _check(0 <= self.lr_min <= self.lr, "lr_min", self.lr_min, "in [0, --lr]")
        try:
            betas = self.betas()
        except ValueError:
            betas = None
        _check(betas is not None and all(0 <= b < 1 for b in betas), "adam_betas", self.adam_betas,
               "two numbers in [0, 1), as beta1,beta2")

    def betas(self) -> tuple[float, float]:
        b1, b2 = (float(b) for b in self.adam_betas.split(","))  # ValueError unless exactly two numbers
        return b1, b2


@dataclass
class SamplingConfig:
    min_new_tokens: int = 4
    """Response lengths are drawn uniformly from [min, max] per rollout (trl's LengthSampler), 1 <= min <= max; no
    eos before min. 4-16 are the lengths of trl's sentiment example."""
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
    generation_batch_size: int = 0
    """Rows sampled at once, in rollouts and in the before/after evaluation, >= 0 (0: --batch-size). Smaller chunks
    bound the KV cache, the biggest thing generation holds (--plan-memory shows it); trl's
    PPOTrainer.generate samples 4 at a time. The samples do not depend on it."""

    def validate(self) -> None:
        for name in ("min_new_tokens", "max_prompt_tokens"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        for name in ("top_k", "generation_batch_size"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        _check(self.temperature > 0, "temperature", self.temperature, "> 0")
        _check(0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        if self.min_new_tokens > self.max_new_tokens:
            raise UsageError(f"--min-new-tokens {self.min_new_tokens} is above --max-new-tokens {self.max_new_tokens}")


@dataclass
class DataConfig:
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
    eval_every: int = 0
    """Also evaluate every N steps, >= 0, on the first --eval-every-size eval prompts with the same seed each time
    (points in metrics.jsonl as eval/..., and on reward.png); 0 = only before and after."""
    eval_every_size: int = 64
    """How many eval prompts the --eval-every evaluations sample, >= 1 (the first ones of the eval prompts)."""

    def validate(self) -> None:
        _check(self.eval_size >= 1, "eval_size", self.eval_size, ">= 1")
        _check(self.eval_every >= 0, "eval_every", self.eval_every, ">= 0")
        _check(self.eval_every_size >= 1, "eval_every_size", self.eval_every_size, ">= 1")
        for name in ("reward", "prompts", "eval_prompts"):
            _check(getattr(self, name).strip() != "", name, getattr(self, name), 'a name, a path or "default"')


@dataclass
class RunConfig:
    steps: int = 100
    """PPO steps, >= 1 (each samples --batch-size prompts)."""
    seed: int = 0
    """Seed for prompts, lengths, sampling, minibatch order and dropout, in [0, 2**63)."""
    device: str = "auto"
    """cpu, cuda, cuda:N (a GPU this machine has), or auto (cuda when available)."""
    out: str = ""
    """Run folder (new, or one holding no run yet); default: a new folder under runs/."""
    resume: str = ""
    """Continue the run in this folder from its latest checkpoint, to the numbers it would have had. A flag that
    would change the run is refused; these may differ: --steps (not below the run's), --save-every,
    --generation-batch-size, --gradient-checkpointing, --plan-memory, --memory-gb, --log-with."""
    save_every: int = 50
    """Write a checkpoint every N steps (and at the end), >= 1."""
    plan_memory: bool = False
    """Print how much memory this run needs (int8 weights, float parts, LoRA, AdamW, KV cache, activations, with and
    without gradient checkpointing) against the device's memory, reading only config.json, and exit."""
    memory_gb: float = 0.0
    """Memory budget in GB (1e9 bytes) for --plan-memory, >= 0; 0 = this device's memory (the GPU's, else the RAM)."""
    log_with: str = "none"
    """Also log every scalar of metrics.jsonl per step, and the before/after samples, to: none, tensorboard
    (RUN_FOLDER/tensorboard/; needs the tensorboard package) or wandb (offline, RUN_FOLDER/wandb/; needs wandb)."""

    def validate(self) -> None:
        for name in ("steps", "save_every"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        _check(0 <= self.seed < 2**63, "seed", self.seed, "in [0, 2**63)")
        _check(self.memory_gb >= 0, "memory_gb", self.memory_gb, ">= 0")
        _check(self.log_with in TRACKERS, "log_with", self.log_with, "one of " + ", ".join(TRACKERS))
        if missing_package(self.log_with):
            raise UsageError(f"--log-with {self.log_with}: the {missing_package(self.log_with)} package is not "
                             f"installed (pip install 'minirlhf[{self.log_with}]')")
        if self.out and os.path.exists(self.out) and not os.path.isdir(self.out):
            raise UsageError(f"--out {self.out}: exists and is not a folder")
        if self.resume and self.out and os.path.abspath(self.out) != os.path.abspath(self.resume):
            raise UsageError(f"--out {self.out} with --resume {self.resume}: a resumed run stays in its own folder")


# (attribute, section class, --help heading), in the order --help lists them
SECTIONS = (
    ("base", BaseConfig, "base model and quantization"),
    ("lora", LoRAConfig, "LoRA adapters"),
    ("algorithm", AlgorithmConfig, "RL algorithm"),
    ("ppo", PPOConfig, "PPO"),
    ("shaping", ShapingConfig, "reward shaping (PPO only, trl's PPOConfig names)"),
    ("optim", OptimizerConfig, "optimizer"),
    ("sampling", SamplingConfig, "sampling"),
    ("data", DataConfig, "prompts, reward and evaluation"),
    ("run", RunConfig, "the run"),
)
# Flags that may differ on --resume: they extend the run or change how it is computed, never its numbers
# (chunked sampling and recomputed activations give the same values: tests/test_trainer.py and
# tests/test_gradient_checkpointing.py). --steps may only grow, and not at all under a learning-rate schedule
# (its length is the run's: TrainConfig.resume_may_differ).
RESUME_MAY_DIFFER = ("steps", "save_every", "generation_batch_size", "gradient_checkpointing", "plan_memory",
                     "memory_gb", "log_with", "eval_every", "eval_every_size", "out", "resume")


@dataclass
class TrainConfig:
    base: BaseConfig = field(default_factory=BaseConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    shaping: ShapingConfig = field(default_factory=ShapingConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @classmethod
    def from_flags(cls, **values) -> "TrainConfig":
        """Build from flag values by field name, e.g. from_flags(lr=1e-3, lora_r=16); unset fields keep defaults."""
        sections = {}
        for attr, section, _ in SECTIONS:
            names = {f.name for f in dataclasses.fields(section)}
            sections[attr] = section(**{k: v for k, v in values.items() if k in names})
        unknown = set(values) - {f.name for _, s, _ in SECTIONS for f in dataclasses.fields(s)}
        if unknown:
            raise TypeError(f"TrainConfig has no field {', '.join(sorted(unknown))}")
        return cls(**sections)

    def flags(self) -> dict:
        """Every flag's value by field name: what config.json and each checkpoint record."""
        return {k: v for attr, _, _ in SECTIONS for k, v in dataclasses.asdict(getattr(self, attr)).items()}

    def validate(self) -> None:
        """Every field's domain, as its doc states it, and the relations between fields. Comparisons are
        written so that NaN fails them, and every float must be finite."""
        for name, value in self.flags().items():
            if isinstance(value, float):
                _check(math.isfinite(value), name, value, "a finite number")
        for attr, _, _ in SECTIONS:
            getattr(self, attr).validate()
        self.check_algorithm()
        self.device()  # the device exists here (unless planning for another machine), and the dtype suits it

    def check_algorithm(self) -> None:
        """Relations of --algorithm and --group-size to the other sections: the batch holds whole groups, and
        rloo / grpo refuse every PPO-only flag set away from its default (they have no critic, no GAE, no
        per-token KL reward: the flag would silently do nothing), and ppo / rloo every GRPO-only one."""
        name, K, B = self.algorithm.algorithm, self.algorithm.group(), self.ppo.batch_size
        if B % K:
            raise UsageError(f"--batch-size {B} is not divisible by --group-size {K} (each prompt gets K responses)")
        values, defaults = self.flags(), TrainConfig().flags()
        for owner, table in (("grpo", GRPO_ONLY), ("ppo", PPO_ONLY)):
            if name == owner:
                continue
            for key, tunes in table.items():
                if values[key] != defaults[key]:
                    raise UsageError(f"{flag(key)} is a {owner.upper()} flag ({tunes}), unused by --algorithm {name}: "
                                     f"drop it or use --algorithm {owner}")

    def device(self, present: bool | None = None):
        """(torch.device, float dtype) of the run: devices.py's policy, which also checks --dtype. The device must
        exist here (present), except for a memory plan, which may name a GPU this machine lacks."""
        if present is None:
            present = not self.run.plan_memory
        return devices.pick(self.run.device, self.base.dtype, present=present)

    def optimizer_steps(self) -> int:
        """Optimizer steps of the whole run, as planned (trl's early stop may skip some): what a schedule spans."""
        return self.run.steps * self.ppo.ppo_epochs * (self.ppo.batch_size // self.ppo.mini_batch_size)

    def resume_may_differ(self) -> tuple[str, ...]:
        """The flags a --resume may change: RESUME_MAY_DIFFER, less --steps when a schedule depends on it."""
        if self.optim.lr_schedule == "constant":
            return RESUME_MAY_DIFFER
        return tuple(name for name in RESUME_MAY_DIFFER if name != "steps")

    def resolved(self) -> dict:
        """flags() with --device and --dtype as this machine resolves them ("auto" -> what it chose), and
        --group-size's K."""
        device, dtype = self.device()
        return {**self.flags(), "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                "group_size": self.algorithm.group()}


# The flags rloo and grpo have no use for, and what of PPO each one tunes.
PPO_ONLY = {"gamma": "GAE", "lam": "GAE", "vf_coef": "the value loss", "cliprange_value": "the value loss",
            "kl_estimator": "the per-token KL reward; rloo sums log p - log q as trl, grpo puts k3 in the loss",
            "ratio_threshold": "trl PPOTrainer's minibatch skip", "early_stop_kl": "trl PPOTrainer's early stop",
            "use_score_scaling": "reward shaping", "use_score_norm": "reward shaping", "score_clip": "reward shaping",
            "whiten_rewards": "reward shaping"}


# The flags only grpo reads, and what of it each one tunes.
GRPO_ONLY = {"scale_rewards": "its advantages' scale", "loss_type": "how its per-token losses are averaged"}


def _check(ok: bool, name: str, value, domain: str) -> None:
    """One rule of a flag's domain: --name must be `domain`, else a UsageError naming the flag and the value."""
    if not ok:
        raise UsageError(f"{flag(name)} must be {domain}, got {value!r}")
