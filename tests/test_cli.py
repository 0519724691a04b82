"""train.py's flags and --resume: every flag's domain is enforced with one line and exit 2, and a resume is exact
or refused.

The bad-value table below must name every field of TrainConfig (the first test checks that), so a flag added
later cannot skip the check. Most cases run train.py's main() in this process (each takes well under a second);
two go through a real subprocess to show the command line itself prints no traceback.
"""

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from minirlhf import cpu, devices, resume
from minirlhf.cli import UsageError
from minirlhf.train import TrainConfig, run
from tiny import PPO, hf_model, save_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["the movie was", "hello world", "a dull film", "I loved every", "this is a", "boring plot"]
SMALL = dict(steps=2, batch_size=4, mini_batch_size=2, ppo_epochs=1, min_new_tokens=2, max_new_tokens=4,
             eval_size=2, save_every=1, seed=0, reward="vader", **PPO)

# flag -> out-of-domain values (each a list of argv words after the flag; [] means "the flag alone"), and a
# piece of the one-line error. FILE is replaced by an existing regular file.
BAD = {
    "model": [(["/nonexistent/model"], "--model: /nonexistent/model: no such folder"),
              ([" "], '--model must be a Hub id, a folder or "default", got \' \'')],
    "reward": [(["nosuchmodule:fn"], "--reward: reward function 'nosuchmodule:fn': cannot import module")],
    "prompts": [(["/nonexistent/p.txt"], "--prompts /nonexistent/p.txt: file not found")],
    "eval_prompts": [(["/nonexistent/e.txt"], "--eval-prompts /nonexistent/e.txt: file not found")],
    "eval_size": [(["0"], "--eval-size must be >= 1, got 0")],
    "steps": [(["0"], "--steps must be >= 1, got 0"), (["1.5"], "argument --steps: invalid int value")],
    "batch_size": [(["0"], "--batch-size must be >= 1"), (["6"], "--batch-size 6 is not divisible by --mini-batch-size 4")],
    "mini_batch_size": [(["-2"], "--mini-batch-size must be >= 1"), (["3"], "is not divisible by --mini-batch-size 3")],
    "ppo_epochs": [(["0"], "--ppo-epochs must be >= 1")],
    "generation_batch_size": [(["-1"], "--generation-batch-size must be >= 0, got -1")],
    "lr": [(["0"], "--lr must be > 0, got 0.0"), (["nan"], "--lr must be a finite number, got nan"),
           (["inf"], "--lr must be a finite number, got inf")],
    "weight_decay": [(["-0.1"], "--weight-decay must be >= 0")],
    "max_grad_norm": [(["-1"], "--max-grad-norm must be >= 0, got -1.0")],
    "adam_betas": [(["0.9"], "--adam-betas must be two numbers in [0, 1), as beta1,beta2, got '0.9'"),
                   (["0.9,1.0"], "--adam-betas must be two numbers in [0, 1)")],
    "adam_eps": [(["0"], "--adam-eps must be > 0, got 0.0")],
    "lr_schedule": [(["step"], "--lr-schedule must be one of constant, linear, cosine, got 'step'")],
    "lr_min": [(["0.1"], "--lr-min must be in [0, --lr], got 0.1")],
    "lora_r": [(["0"], "--lora-r must be >= 1")],
    "lora_alpha": [(["0"], "--lora-alpha must be > 0")],
    "lora_dropout": [(["1.0"], "--lora-dropout must be in [0, 1), got 1.0"), (["-0.1"], "--lora-dropout must be in [0, 1)")],
    "lora_targets": [(["attention"], "--lora-targets must be all-linear or a comma-separated list of"),
                     (["query_key_value,"], "--lora-targets must be")],
    "lora_layers": [(["-1"], "--lora-layers must be >= 0"), (["99"], "--lora-layers:")],
    "int8": [(["--int8=yes"], "argument --int8/--no-int8: ignored explicit argument 'yes'")],
    "int8_threshold": [(["-1"], "--int8-threshold must be >= 0")],
    "quantization": [(["int4"], "--quantization must be one of auto, none, int8, nf4, fp4, got 'int4'"),
                     (["--no-int8", "--quantization", "nf4"], "--no-int8 conflicts with --quantization nf4")],
    "kl_estimator": [(["l2"], "--kl-estimator must be one of kl, abs, mse, full, got 'l2'")],
    "init_kl_coef": [(["-0.1"], "--init-kl-coef must be >= 0")],
    "adaptive_kl": [(["--adaptive-kl=no"], "argument --adaptive-kl/--no-adaptive-kl: ignored explicit argument")],
    "target_kl": [(["0"], "--target-kl must be > 0")],
    "horizon": [(["0"], "--horizon must be > 0")],
    "early_stop_kl": [(["-1"], "--early-stop-kl must be >= 0")],
    "ratio_threshold": [(["1"], "--ratio-threshold must be > 1")],
    "gamma": [(["1.5"], "--gamma must be in [0, 1], got 1.5")],
    "lam": [(["-0.1"], "--lam must be in [0, 1], got -0.1")],
    "cliprange": [(["-0.2"], "--cliprange must be in (0, 1), got -0.2"), (["0"], "--cliprange must be in (0, 1)")],
    "cliprange_value": [(["0"], "--cliprange-value must be > 0, got 0.0")],
    "vf_coef": [(["-1"], "--vf-coef must be >= 0, got -1.0")],
    "min_new_tokens": [(["0"], "--min-new-tokens must be >= 1"), (["20"], "--min-new-tokens 20 is above --max-new-tokens 4")],
    "max_new_tokens": [(["1"], "--min-new-tokens 2 is above --max-new-tokens 1")],
    "max_prompt_tokens": [(["0"], "--max-prompt-tokens must be >= 1")],
    "temperature": [(["0"], "--temperature must be > 0")],
    "top_k": [(["-3"], "--top-k must be >= 0, got -3")],
    "top_p": [(["0"], "--top-p must be in (0, 1]"), (["1.5"], "--top-p must be in (0, 1]")],
    "seed": [(["-1"], "--seed must be in [0, 2**63), got -1")],
    "device": [(["gpu"], "--device gpu: expected cpu, cuda, cuda:N or auto"), (["cpu:1"], "--device cpu:1: expected")],
    "dtype": [(["float64"], "--dtype must be one of auto, float32, bfloat16, float16, got 'float64'")],
    "gradient_checkpointing": [(["--gradient-checkpointing=1"], "ignored explicit argument '1'")],
    "out": [(["FILE"], "exists and is not a folder")],
    "resume": [(["/nonexistent/run"], "--resume /nonexistent/run: no such run folder")],
    "save_every": [(["0"], "--save-every must be >= 1")],
    "plan_memory": [(["--plan-memory=1"], "ignored explicit argument '1'")],
    "memory_gb": [(["-1"], "--memory-gb must be >= 0")],
    "log_with": [(["mlflow"], "--log-with must be one of none, tensorboard, wandb, got 'mlflow'")],
    "eval_every": [(["-1"], "--eval-every must be >= 0, got -1")],
    "eval_every_size": [(["0"], "--eval-every-size must be >= 1, got 0")],
    "algorithm": [(["reinforce"], "--algorithm must be one of ppo, rloo, grpo, got 'reinforce'"),
                  (["--algorithm", "rloo", "--vf-coef", "0.2"],
                   "--vf-coef is a PPO flag (the value loss), unused by --algorithm rloo: drop it or use --algorithm ppo"),
                  (["--algorithm", "grpo", "--gamma", "0.9"], "--gamma is a PPO flag (GAE), unused by --algorithm grpo"),
                  (["--algorithm", "rloo", "--lam", "0.9"], "--lam is a PPO flag (GAE), unused by --algorithm rloo"),
                  (["--algorithm", "grpo", "--cliprange-value", "0.3"], "--cliprange-value is a PPO flag"),
                  (["--algorithm", "rloo", "--kl-estimator", "abs"], "--kl-estimator is a PPO flag")],
    "group_size": [(["-1"], "--group-size must be >= 0, got -1"),
                   (["--algorithm", "rloo", "--group-size", "1"], "--group-size 1 with --algorithm rloo: its baseline "
                    "is the other samples of the same prompt, so it needs K >= 2"),
                   (["--algorithm", "grpo", "--group-size", "1"], "--group-size 1 with --algorithm grpo"),
                   (["3"], "--batch-size 8 is not divisible by --group-size 3")],
    "scale_rewards": [(["--algorithm", "grpo", "--scale-rewards", "std"],
                       "--scale-rewards must be one of group, batch, none, got 'std'"),
                      (["none"], "--scale-rewards is a GRPO flag (its advantages' scale), unused by --algorithm rloo: "
                       "drop it or use --algorithm grpo")],
    "loss_type": [(["--algorithm", "grpo", "--loss-type", "dapo"], "--loss-type must be one of grpo, bnpo, dr_grpo"),
                  (["--algorithm", "ppo", "--loss-type", "dr_grpo"],
                   "--loss-type is a GRPO flag (how its per-token losses are averaged), unused by --algorithm ppo")],
    "score_clip": [(["-1"], "--score-clip must be >= 0, got -1.0"),
                   (["--algorithm", "grpo", "--score-clip", "2"], "--score-clip is a PPO flag (reward shaping)")],
    "use_score_scaling": [(["--algorithm", "rloo", "--use-score-scaling"],
                           "--use-score-scaling is a PPO flag (reward shaping), unused by --algorithm rloo")],
    "use_score_norm": [(["--use-score-norm"], "--use-score-norm needs --use-score-scaling")],
    "whiten_rewards": [(["--algorithm", "grpo", "--whiten-rewards"], "--whiten-rewards is a PPO flag (reward shaping)")],
}
if not torch.cuda.is_available():  # on a machine without a GPU, asking for one is out of domain too
    BAD["device"].append((["cuda"], "--device cuda: no CUDA GPU is visible on this machine"))
    BAD["dtype"].append((["float16"], "--dtype float16 on CPU"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    hf_model(seed=0).save_pretrained(folder / "model")
    save_tokenizer(folder / "model")
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (folder / "a_file").write_text("not a folder\n")
    return folder


def train_main():
    spec = importlib.util.spec_from_file_location("train_script", os.path.join(ROOT, "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def call(argv, capsys) -> tuple[int, str]:
    """train.py's main(argv) in this process: (exit code, stderr)."""
    try:
        code = train_main()(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


def test_the_table_names_every_flag():
    assert set(BAD) == set(TrainConfig().flags())


@pytest.mark.parametrize("name, words, message",
                         [(name, words, message) for name, cases in BAD.items() for words, message in cases],
                         ids=lambda x: x if isinstance(x, str) and not x.startswith(("-", "/")) else None)
def test_an_out_of_domain_flag_is_one_line_and_exit_2(tiny, tmp_path, capsys, name, words, message):
    base = {"--model": str(tiny / "model"), "--prompts": str(tiny / "prompts.txt"), "--reward": "vader",
            "--batch-size": "8", "--mini-batch-size": "4", "--min-new-tokens": "2", "--max-new-tokens": "4",
            "--eval-size": "2", "--steps": "1", "--out": str(tmp_path / "run")}
    flag = "--" + name.replace("_", "-")
    if name == "resume":  # a resumed run stays in its own folder: --out with --resume is refused on its own
        del base["--out"]
    words = [str(tiny / "a_file") if w == "FILE" else w for w in words]
    if words[0].startswith("--"):  # a bool flag given a value
        argv = [a for k, v in base.items() for a in (k, v)] + words
    else:
        base[flag] = words[0]
        argv = [a for k, v in base.items() for a in (k, v)]
    code, err = call(argv, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error: ") and message in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_tracker_that_is_not_installed_is_refused_up_front(tiny, tmp_path, capsys, monkeypatch):
    """--log-with wandb where the wandb package is missing (made so here: the test extras install it): one line,
    exit 2, before anything is written."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    argv = ["--model", str(tiny / "model"), "--prompts", str(tiny / "prompts.txt"), "--reward", "vader",
            "--steps", "1", "--log-with", "wandb", "--out", str(tmp_path / "run")]
    code, err = call(argv, capsys)
    assert code == 2, err
    assert err.strip() == ("train.py: error: --log-with wandb: the wandb package is not installed "
                           "(pip install 'minirlhf[wandb]')"), err
    assert not (tmp_path / "run").exists()


# A value away from the default for every flag only one algorithm reads (options.PPO_ONLY, options.GRPO_ONLY)
AWAY = {"ppo": {"gamma": 0.9, "lam": 0.9, "vf_coef": 0.2, "cliprange_value": 0.3, "kl_estimator": "abs",
                "ratio_threshold": 5.0, "early_stop_kl": 0.1, "use_score_scaling": True, "use_score_norm": True,
                "score_clip": 2.0, "whiten_rewards": True},
        "grpo": {"scale_rewards": "none", "loss_type": "dr_grpo"}}


@pytest.mark.parametrize("owner", ["ppo", "grpo"])
def test_every_single_algorithm_flag_is_refused_by_the_others(owner):
    """Each flag of options.PPO_ONLY (GRPO_ONLY), set away from its default, is one line with the other two
    algorithms, fine with ppo (grpo)."""
    from minirlhf.options import GRPO_ONLY, PPO_ONLY

    other = AWAY[owner]
    assert set(other) == set({"ppo": PPO_ONLY, "grpo": GRPO_ONLY}[owner])
    for name, value in other.items():
        extra = {"use_score_scaling": True} if name == "use_score_norm" else {}
        TrainConfig.from_flags(algorithm=owner, **{name: value}, **extra).check_algorithm()
        for algorithm in {"ppo", "rloo", "grpo"} - {owner}:
            with pytest.raises(UsageError, match=f"^--{name.replace('_', '-')} is a {owner.upper()} flag"):
                TrainConfig.from_flags(algorithm=algorithm, **{name: value}).check_algorithm()


def test_the_command_line_itself_prints_one_line(tiny, tmp_path):
    for args, message in ((["--max-grad-norm", "-1"], "--max-grad-norm must be >= 0"),
                          (["--steps", "x"], "argument --steps: invalid int value: 'x'")):
        result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--model", str(tiny / "model"),
                                 *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_each_numeric_flag_documents_its_domain():
    """Each field's doc states its domain (the help text is the doc): numbers say their range."""
    from minirlhf.cli import field_docs
    from minirlhf.options import SECTIONS

    for _, section, _ in SECTIONS:
        docs = field_docs(section)
        for f in dataclasses.fields(section):
            if f.type in (int, float, "int", "float"):
                assert any(s in docs[f.name] for s in (">=", "<=", "> 0", "> 1", "in [", "in (")), (f.name, docs[f.name])


def test_help_lists_the_flags_by_concern():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--help"], capture_output=True,
                            text=True, timeout=120)
    text = result.stdout
    titles = ["base model and quantization:", "LoRA adapters:", "PPO:", "optimizer:", "sampling:",
              "prompts, reward and evaluation:", "the run:"]
    positions = [text.index(t) for t in titles]
    assert positions == sorted(positions)
    lora_section = text[text.index("LoRA adapters:"):text.index("\nPPO:")]
    assert "--lora-r LORA_R" in lora_section and "--gamma" not in lora_section


# ---------------------------------------------------------------------------------------------- devices

@pytest.mark.parametrize("fast_bf16", [True, False])
def test_device_policy(monkeypatch, fast_bf16):
    # --dtype auto on a CPU: bf16 where it has AVX512-BF16 / AMX (cpu.py), fp32 where bf16 is slower than fp32
    monkeypatch.setattr(cpu, "FAST_BF16", fast_bf16)
    assert devices.pick("cpu", "auto") == (torch.device("cpu"), torch.bfloat16 if fast_bf16 else torch.float32)
    assert devices.pick("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    assert devices.pick("cpu", "float32") == (torch.device("cpu"), torch.float32)
    # a plan may name a GPU this machine lacks; bfloat16 is then what auto picks for it
    assert devices.pick("cuda", "auto", present=False) == (torch.device("cuda"), torch.bfloat16)
    assert devices.pick("cuda:1", "float16", present=False) == (torch.device("cuda", 1), torch.float16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert devices.parse_device("auto") == torch.device("cuda")
    devices.check_present(torch.device("cuda", 1), "cuda:1")
    with pytest.raises(UsageError, match="--device cuda:2: this machine has 2 CUDA GPU"):
        devices.check_present(torch.device("cuda", 2), "cuda:2")


# ---------------------------------------------------------------------------------------------- resume

def small_run(tiny, out, **kw):
    return run(TrainConfig.from_flags(model=str(tiny / "model"), prompts=str(tiny / "prompts.txt"), out=str(out),
                           **{**SMALL, **kw}), progress=False)


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_resume_refuses_each_flag_that_would_change_the_run(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(cpu, "FAST_BF16", False)  # --dtype auto resolves to float32 on any CPU
    out = tmp_path / "r"
    small_run(tiny, out, steps=1)
    saved = resume.read_config(resume.latest_checkpoint(str(out)))
    assert saved["device"] == "cpu" and saved["dtype"] == "float32"  # resolved, not "auto"
    assert saved["lr"] == 5e-4 and saved["steps"] == 1
    cfg = dict(model=str(tiny / "model"), prompts=str(tiny / "prompts.txt"), resume=str(out), **SMALL)
    cases = {"lr": (0.1, "--lr 0.1 differs from the run's 0.0005"),
             "seed": (3, "--seed 3 differs from the run's 0"),
             "init_kl_coef": (0.3, "--init-kl-coef 0.3 differs from the run's 0.15"),
             "adaptive_kl": (False, "--adaptive-kl False differs from the run's True"),
             "max_new_tokens": (5, "--max-new-tokens 5 differs from the run's 4"),
             "temperature": (0.7, "--temperature 0.7 differs from the run's 1.0"),
             "eval_size": (1, "--eval-size 1 differs from the run's 2"),
             "dtype": ("bfloat16", "--dtype 'bfloat16' differs from the run's 'float32'")}
    for name, (value, message) in cases.items():
        with pytest.raises(UsageError, match="^--resume .*" + message.replace("(", r"\(").replace(")", r"\)")):
            run(TrainConfig.from_flags(**{**cfg, "steps": 2, name: value}), progress=False)
    # two at once: one line naming both
    with pytest.raises(UsageError, match=r"--lr 0.1 differs .*; --seed 3 differs"):
        run(TrainConfig.from_flags(**{**cfg, "steps": 2, "lr": 0.1, "seed": 3}), progress=False)
    with pytest.raises(UsageError, match="--steps 0 is below|--steps must be >= 1"):
        run(TrainConfig.from_flags(**{**cfg, "steps": 0}), progress=False)
    assert [m["step"] for m in metrics(out)] == [1]  # nothing ran


def test_resume_extends_steps_and_allows_what_cannot_change_the_numbers(tiny, tmp_path):
    """--steps 1, then --resume with --steps 3 and other memory/observation flags, equals --steps 3 from scratch."""
    small_run(tiny, tmp_path / "full", steps=3)
    small_run(tiny, tmp_path / "part", steps=1)
    run(TrainConfig.from_flags(model=str(tiny / "model"), prompts=str(tiny / "prompts.txt"), resume=str(tmp_path / "part"),
                    **{**SMALL, "steps": 3, "save_every": 2, "generation_batch_size": 1,
                       "gradient_checkpointing": True, "memory_gb": 3.0}), progress=False)
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "part")
    assert [m["step"] for m in b] == [1, 2, 3]
    for x, y in zip(a, b):
        for key in x:
            if not key.startswith("time/"):
                assert y[key] == pytest.approx(x[key], rel=1e-6, abs=1e-7), (x["step"], key)


def test_a_fixed_kl_run_resumes(tiny, tmp_path):
    """A run written with --no-adaptive-kl resumes with it (its KL controller state has no target/horizon)."""
    small_run(tiny, tmp_path / "fixed", steps=1, adaptive_kl=False)
    summary = run(TrainConfig.from_flags(model=str(tiny / "model"), prompts=str(tiny / "prompts.txt"),
                              resume=str(tmp_path / "fixed"), **{**SMALL, "steps": 2, "adaptive_kl": False}),
                  progress=False)
    assert summary["kl_target"] is None
    assert [m["objective/kl_coef"] for m in metrics(tmp_path / "fixed")] == [0.15, 0.15]
    with pytest.raises(UsageError, match="--adaptive-kl True differs from the run's False"):
        run(TrainConfig.from_flags(model=str(tiny / "model"), prompts=str(tiny / "prompts.txt"),
                        resume=str(tmp_path / "fixed"), **{**SMALL, "steps": 3}), progress=False)


class FakeTrainer:
    """What rng_states needs: a trainer on a CUDA device (only its name; no tensor is put there)."""
    device = torch.device("cuda", 0)
    gen = torch.Generator().manual_seed(1)

    class lengths:
        generator = torch.Generator().manual_seed(2)


def test_cuda_rng_state_is_saved_and_restored_on_a_gpu(monkeypatch):
    saved = torch.arange(16, dtype=torch.uint8)
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: saved.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append((state, device)))
    states = resume.rng_states(FakeTrainer())
    assert torch.equal(states["rng.cuda"], saved)
    resume.restore_rng_states(FakeTrainer(), states)
    assert len(calls) == 1 and torch.equal(calls[0][0], saved) and calls[0][1] == torch.device("cuda", 0)
    with pytest.raises(UsageError, match="no CUDA RNG state"):
        resume.restore_rng_states(FakeTrainer(), {k: v for k, v in states.items() if k != "rng.cuda"})


def test_validate_accepts_the_defaults_and_edge_values():
    TrainConfig.from_flags().validate()
    TrainConfig.from_flags(algorithm="ppo", gamma=0.0, lam=1.0, top_p=1.0, top_k=0, vf_coef=0.0, init_kl_coef=0.0,
                           lora_dropout=0.0, min_new_tokens=16, max_new_tokens=16,
                           lora_targets="attention.dense,dense_4h_to_h").validate()


# ---------------------------------------------------------------------------------------------- build_default

@pytest.mark.parametrize("make, message", [
    (lambda d: str(d / "missing.txt"), "--data {}: file not found"),
    (lambda d: str(d), "--data {}: file not found"),  # a folder is not the snippets file
    (lambda d: (d / "bad.txt").write_text("1\tnot-a-rating-line\n") and str(d / "bad.txt"),
     "{}: line 1 does not have 3 tab-separated fields"),
])
def test_build_default_bad_data_is_one_line_and_exit_2(tmp_path, capsys, make, message):
    from minirlhf.build_default import main

    data = make(tmp_path)
    assert main(["--data", data, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"python -m minirlhf.build_default: error: {message.format(data)}\n"
    assert not (tmp_path / "out").exists()


def test_build_default_bad_flag_is_one_line_and_exit_2(tmp_path, capsys):
    from minirlhf.build_default import main

    assert main(["--hidden-size", "100", "--heads", "3", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == ("python -m minirlhf.build_default: error: --hidden-size 100 is not "
                                       "divisible by --heads 3\n")
    with pytest.raises(SystemExit) as e:
        main(["--lm-steps", "many"])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1


# ---------------------------------------------------------------------------------------------- lr schedules

def lr_by_hand(schedule: str, lr: float, lr_min: float, T: int, t: int) -> float:
    """The learning rate after t of T optimizer steps: a straight line, or half a cosine, from lr to lr_min."""
    if schedule == "linear":
        return lr + (lr_min - lr) * min(t, T) / T
    return lr_min + (lr - lr_min) * (1 + math.cos(math.pi * t / T)) / 2


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_lr_schedule_steps_per_optimizer_step_and_resumes(tiny, tmp_path, schedule):
    """SMALL: 2 steps x 1 epoch x 2 minibatches = 4 optimizer steps. The learning rate after each one equals the
    formula, also for a trainer rebuilt from the checkpoint written half-way."""
    import minirlhf
    from minirlhf.lora import add_lora
    from minirlhf.rewards import checked_reward_fn
    from minirlhf.trainer import PPOTrainer

    cfg = TrainConfig.from_flags(**{**SMALL, "lr": 1e-2, "lr_min": 1e-3, "lr_schedule": schedule})
    T = cfg.optimizer_steps()
    assert T == 4

    def trainer():
        model = add_lora(minirlhf.load_model(str(tiny / "model")), r=2, alpha=4, dropout=0.0)
        reward = checked_reward_fn(lambda p, r: [0.0] * len(p), "zero")
        return PPOTrainer.for_config(model, minirlhf.load_tokenizer(str(tiny / "model")), reward, cfg)

    first = trainer()
    seen = []
    for _ in range(2):
        first.optimizer_step()  # no gradients: the weights stay, the schedule moves
        seen.append(first.optimizer.param_groups[0]["lr"])
    resume.save_checkpoint(str(tmp_path / "ckpt"), first, {"model": "m"})
    second = trainer()
    resume.load_checkpoint(str(tmp_path / "ckpt"), second)
    for _ in range(2):
        second.optimizer_step()
        seen.append(second.optimizer.param_groups[0]["lr"])
    expected = [lr_by_hand(schedule, 1e-2, 1e-3, T, t) for t in range(1, T + 1)]
    assert seen == pytest.approx(expected, rel=1e-9, abs=0)
    assert seen[-1] == pytest.approx(1e-3, rel=1e-9)


def test_a_scheduled_run_resumes_exactly_but_cannot_grow(tiny, tmp_path):
    import shutil

    kw = dict(lr_schedule="cosine", lr_min=1e-4)
    small_run(tiny, tmp_path / "full", steps=3, **kw)
    shutil.copytree(tmp_path / "full", tmp_path / "part", ignore=shutil.ignore_patterns("step-000003"))
    run(TrainConfig.from_flags(model=str(tiny / "model"), prompts=str(tiny / "prompts.txt"),
                               resume=str(tmp_path / "part"), **{**SMALL, "steps": 3, **kw}), progress=False)
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "part")
    assert [m["step"] for m in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if not k.startswith("time/")} == \
               {k: v for k, v in y.items() if not k.startswith("time/")}
    with pytest.raises(UsageError, match="--steps 5 differs from the run's 3"):
        run(TrainConfig.from_flags(model=str(tiny / "model"), prompts=str(tiny / "prompts.txt"),
                                   resume=str(tmp_path / "full"), **{**SMALL, "steps": 5, **kw}), progress=False)
