"""The PPO loop: step-0 invariants, a toy task it must learn, the run folder, exact resume, bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch

import minirlhf
from minirlhf.lora import add_lora
from minirlhf.rewards import RewardError, checked_reward_fn
from minirlhf.train import TrainConfig, UsageError, run
from minirlhf import trainer as trainer_module
from minirlhf.generate import generate
from minirlhf.trainer import PPOTrainer
from tiny import hf_model, save_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["the movie was", "hello world", "a dull film", "I loved every", "this is a", "boring plot"]


@pytest.fixture(scope="module")
def sharp_model(tmp_path_factory):
    """A tiny random GPT-NeoX whose head is scaled up, so its next-token distribution is peaked
    (a random model at transformers' init is almost uniform, and PPO would have nothing to amplify)."""
    folder = tmp_path_factory.mktemp("sharp")
    model = hf_model(seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    model.save_pretrained(folder)
    save_tokenizer(folder)
    return str(folder)


def toy_target(folder):
    """A token the untrained model emits with a small probability, that survives decode -> encode."""
    tok = minirlhf.load_tokenizer(folder)
    model = minirlhf.load_model(folder)
    ids, mask = tok.encode_batch(PROMPTS[:4])
    with torch.no_grad():
        probs = model(ids, mask).logits.softmax(-1).mean((0, 1))
    ok = [t for t in range(2, tok.vocab_size) if tok.encode(tok.decode([t])) == [t]]
    target = sorted(ok, key=lambda t: -float(probs[t]))[3]
    return tok, target, float(probs[target])


def config(**kw):
    base = dict(batch_size=8, mini_batch_size=4, ppo_epochs=2, lr=1e-2, min_new_tokens=4, max_new_tokens=6,
                init_kl_coef=0.01, eval_size=4, save_every=2, seed=0, algorithm="ppo", lr_schedule="constant")
    base.update(kw)
    return TrainConfig.from_flags(**base)


def test_step0_kl_is_zero_and_ratio_is_one(sharp_model):
    tok = minirlhf.load_tokenizer(sharp_model)
    model = add_lora(minirlhf.load_model(sharp_model), r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    cfg = config(batch_size=8, mini_batch_size=4, ppo_epochs=1)
    trainer = PPOTrainer.for_config(model, tok, checked_reward_fn(lambda p, r: [1.0] * len(p), "one"), cfg)
    r = trainer.rollout(PROMPTS[:4] * 2)
    assert torch.equal(r.logprobs, r.ref_logprobs)  # B = 0: the policy IS the reference, bit for bit
    batch = trainer.advantages(r, kl_coef=0.2)  # KL-shaped rewards and GAE on the (gathered) batch
    assert batch.kls.abs().max().item() == 0.0
    stats = trainer.update(r, batch)
    first = stats[0]  # the first minibatch runs before any optimizer step
    assert torch.all(first["policy/ratio"] == 1.0), first["policy/ratio"]
    assert first["policy/approxkl"].item() == 0.0 and first["policy/clipfrac"].item() == 0.0


def test_generation_in_chunks_gives_the_same_rollouts(sharp_model, monkeypatch):
    """--generation-batch-size samples a few rows at a time (a smaller KV cache); with the same noise
    every row gets the same tokens as when the whole batch is sampled together."""
    tok = minirlhf.load_tokenizer(sharp_model)
    model = minirlhf.load_model(sharp_model)
    prompts = PROMPTS + PROMPTS[:1]  # 7 rows: chunks of 3, 3 and 1, of different prompt lengths
    limits = torch.tensor([6, 2, 5, 6, 3, 4, 6])
    noise = torch.rand(len(prompts), 6, generator=torch.Generator().manual_seed(0))
    whole = PPOTrainer.for_config(model, tok, None, config(min_new_tokens=1)).sample(prompts, limits, noise=noise)
    calls = []
    monkeypatch.setattr(trainer_module, "generate", lambda model, ids, *a, **kw: calls.append(len(ids)) or
                        generate(model, ids, *a, **kw))
    chunked = PPOTrainer.for_config(model, tok, None, config(min_new_tokens=1, generation_batch_size=3)).sample(
        prompts, limits, noise=noise)
    for name in ("ids", "mask", "tokens", "response_mask"):
        assert torch.equal(getattr(whole, name), getattr(chunked, name)), name
    assert whole.responses == chunked.responses and chunked.response_mask.sum(1).tolist() == limits.tolist()
    assert calls == [3, 3, 1]


def test_evaluation_does_not_depend_on_how_many_rows_are_sampled_at_once(sharp_model):
    """The before/after evaluation samples --batch-size rows at a time by default (so its many prompts need
    no more memory than a rollout), or --generation-batch-size; its responses must be the same either way."""
    from minirlhf.train import evaluate

    tok = minirlhf.load_tokenizer(sharp_model)
    model = minirlhf.load_model(sharp_model)
    prompts = PROMPTS * 2  # 12 eval prompts
    judges = {"length": checked_reward_fn(lambda p, r: [float(len(x)) for x in r], "length")}
    results = [evaluate(PPOTrainer.for_config(model, tok, None, config(**kw)), prompts, judges, seed=3)
               for kw in (dict(batch_size=12, mini_batch_size=4), dict(batch_size=4), dict(generation_batch_size=5))]
    assert results[0]["responses"] == results[1]["responses"] == results[2]["responses"]
    assert len(set(results[0]["responses"])) > 1  # really sampled


def test_toy_task_is_learned(sharp_model):
    """reward = share of response tokens equal to one target token; the untrained policy gives it ~1.4%."""
    tok, target, p0 = toy_target(sharp_model)
    assert p0 < 0.03

    def reward(prompts, responses):
        return [sum(i == target for i in tok.encode(r)) / max(1, len(tok.encode(r))) for r in responses]

    model = add_lora(minirlhf.load_model(sharp_model, int8=True), r=8, alpha=16, dropout=0.0,
                     target_modules="all-linear")
    cfg = config(batch_size=32, mini_batch_size=8, ppo_epochs=4, min_new_tokens=6, max_new_tokens=8)
    trainer = PPOTrainer.for_config(model, tok, checked_reward_fn(reward, "toy"), cfg)
    history = [trainer.step([PROMPTS[i % 4] for i in range(32)])[0]["env/reward_mean"] for _ in range(40)]
    assert sum(history[:3]) / 3 < 0.1
    assert sum(history[-10:]) / 10 >= 0.3, history


def write_prompts(path, lines=PROMPTS):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_run_writes_the_run_folder_and_resumes_exactly(sharp_model, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.txt")
    common = dict(model=sharp_model, reward="vader", prompts=prompts)
    full = run(config(steps=4, out=str(tmp_path / "full"), **common), progress=False)
    out = tmp_path / "full"
    for name in ("metrics.jsonl", "reward.png", "samples.md", "summary.json", "value_head.safetensors",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "checkpoints/step-000002/trainer_state.json", "checkpoints/step-000004/state.safetensors"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary == {k: v for k, v in full.items() if k != "out"}
    assert set(summary["before"]) >= {"reward_mean", "rm_positive_frac"}
    assert "| prompt |" in (out / "samples.md").read_text()
    assert not [n for n in os.listdir(out / "checkpoints") if n.startswith(".tmp")]

    # interrupted after step 2, then resumed: the same numbers as the run that never stopped
    run(config(steps=2, out=str(tmp_path / "part"), **common), progress=False)
    run(config(steps=4, resume=str(tmp_path / "part"), **common), progress=False)
    a = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in x:
            if not key.startswith("time/"):
                assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-7), (x["step"], key)

    # a PEFT-format adapter that load_adapter reads back
    fresh = minirlhf.load_model(sharp_model, int8=True)
    minirlhf.lora.load_adapter(fresh, str(out / "adapter"))


def test_resume_rejects_a_run_of_another_model(sharp_model, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.txt")
    run(config(steps=2, out=str(tmp_path / "r"), model=sharp_model, reward="vader", prompts=prompts), progress=False)
    other = tmp_path / "other"
    hf_model(seed=5).save_pretrained(other)
    save_tokenizer(other)
    with pytest.raises(UsageError, match="model"):
        run(config(steps=4, resume=str(tmp_path / "r"), model=str(other), reward="vader", prompts=prompts),
            progress=False)


def test_reward_errors_name_the_function_and_keep_the_last_checkpoint(sharp_model, tmp_path, monkeypatch):
    prompts = write_prompts(tmp_path / "prompts.txt")
    (tmp_path / "badreward.py").write_text(
        "calls = 0\n"
        "def flaky(prompts, responses):\n"
        "    global calls\n"
        "    calls += 1\n"
        "    if calls > 3:\n"  # eval before + 2 good steps, then it breaks
        "        raise ZeroDivisionError('boom')\n"
        "    return [0.5] * len(prompts)\n"
        "def nan(prompts, responses):\n"
        "    return [float('nan')] * len(prompts)\n"
        "def short(prompts, responses):\n"
        "    return [1.0]\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    with pytest.raises(RewardError, match="badreward:flaky.*ZeroDivisionError: boom"):
        run(config(steps=6, save_every=2, out=str(out), model=sharp_model, reward="badreward:flaky",
                   prompts=prompts), progress=False)
    assert sorted(os.listdir(out / "checkpoints")) == ["step-000002"]
    with pytest.raises(ValueError, match="badreward:nan.*non-finite"):
        run(config(steps=2, out=str(tmp_path / "n"), model=sharp_model, reward="badreward:nan", prompts=prompts),
            progress=False)
    with pytest.raises(ValueError, match="badreward:short.*1 scores for 4 samples"):
        run(config(steps=2, out=str(tmp_path / "s"), model=sharp_model, reward="badreward:short", prompts=prompts),
            progress=False)


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "6", "--mini-batch-size", "4"], "--batch-size 6 is not divisible by --mini-batch-size 4"),
    (["--prompts", "/nonexistent/prompts.txt"], "/nonexistent/prompts.txt: file not found"),
    (["--prompts", "EMPTY"], "no prompts"),
    (["--kl-estimator", "l2"], "--kl-estimator must be one of"),
    (["--resume", "/nonexistent/run"], "--resume /nonexistent/run: no such run folder"),
])
def test_cli_bad_input_is_one_line_without_traceback(sharp_model, tmp_path, args, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    result = cli("--model", sharp_model, "--reward", "vader", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_cli_unknown_flag_and_help():
    result = cli("--no-such-flag")
    assert result.returncode == 2 and "unrecognized arguments: --no-such-flag" in result.stderr
    assert "Traceback" not in result.stderr
    help_text = cli("--help").stdout
    for flag in ("--model", "--reward", "--prompts", "--steps", "--batch-size", "--mini-batch-size", "--ppo-epochs",
                 "--lr", "--lora-r", "--lora-alpha", "--lora-dropout", "--lora-targets", "--lora-layers", "--no-int8",
                 "--int8-threshold", "--kl-estimator", "--init-kl-coef", "--target-kl", "--horizon", "--gamma",
                 "--lam", "--cliprange", "--cliprange-value", "--vf-coef", "--min-new-tokens", "--max-new-tokens",
                 "--temperature", "--seed", "--device", "--out", "--resume", "--save-every"):
        assert flag in help_text, flag


def test_eval_every_adds_points_and_changes_no_training_number(sharp_model, tmp_path):
    """--eval-every 2 on a 4-step run: eval/... keys on steps 2 and 4 only; every other number equal to the run
    without it; and the step-4 point (the final policy, the eval seed, the same 3 prompts as the after-evaluation)
    equals the after-evaluation exactly."""
    prompts = write_prompts(tmp_path / "prompts.txt")
    common = dict(model=sharp_model, reward="vader", prompts=prompts, steps=4, eval_size=3)
    run(config(out=str(tmp_path / "plain"), **common), progress=False)
    summary = run(config(out=str(tmp_path / "points"), eval_every=2, eval_every_size=3, **common), progress=False)
    plain = [json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    points = [json.loads(line) for line in (tmp_path / "points" / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(k for k in m if k.startswith("eval/")) for m in points] == \
        [[], ["eval/reward_mean", "eval/rm_positive_frac"], [], ["eval/reward_mean", "eval/rm_positive_frac"]]
    for a, b in zip(plain, points):
        assert {k: v for k, v in a.items() if not k.startswith("time/")} == \
               {k: v for k, v in b.items() if not k.startswith(("time/", "eval/"))}
    assert points[3]["eval/reward_mean"] == summary["after"]["reward_mean"]
    assert points[3]["eval/rm_positive_frac"] == summary["after"]["rm_positive_frac"]
