"""Data parallel training under torchrun (gloo, 2 CPU processes): it equals one process, its checkpoints
resume, and a failing rank stops every rank.

Each torchrun launch costs ~15 s here (torchrun and two fresh interpreters importing torch on a shared 2-core
machine), so there are two launches, both tiny.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from minirlhf import distributed, save_model
from minirlhf.config import NeoXConfig
from minirlhf.neox import CausalLM, init_weights
from minirlhf.train import TrainConfig, UsageError, run
from tiny import save_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["the movie was", "hello world", "a dull film", "I loved every", "this is a", "boring plot",
           "wonderful actors", "charming story", "terrible plot", "a tiny tokenizer"]

# A deterministic reward with spread (so every step has a real gradient), and one that fails on rank 1 only,
# in training (the before-eval scores 2 prompts, a training step 4 per rank).
REWARDS = '''
def score(prompts, responses):
    return [(sum(map(ord, r)) % 11) / 10 - 0.5 for r in responses]

def flaky(prompts, responses):
    import torch.distributed as dist
    if dist.is_initialized() and dist.get_rank() == 1 and len(prompts) > 2:
        raise ZeroDivisionError("boom on rank 1")
    return [0.5] * len(prompts)
'''

# --batch-size 8 is the global batch: 8 rollouts in one process, 4 per rank with two.
# fp32 float parts on every CPU, and Int8Linear's fp32 backward: the 2e-5 below is an fp32 claim. (--dtype auto is
# bf16 on CPUs with AVX512-BF16, where a rank's smaller GEMMs round differently from one process's; and SwitchBack,
# the fp32 gradients' int8 GEMM on CPUs with VNNI, rounds each gradient to 8 bits, which turns 1e-7 differences
# of the float sums into whole 8-bit steps now and then: measured 1e-4 on these weights.)
SETTINGS = dict(batch_size=8, mini_batch_size=4, ppo_epochs=2, lr=1e-2, min_new_tokens=4, max_new_tokens=6,
                init_kl_coef=0.01, eval_size=2, save_every=2, seed=0, dtype="float32", algorithm="ppo",
                lr_schedule="constant")


@pytest.fixture(autouse=True)
def no_switchback(monkeypatch):
    monkeypatch.setenv("MINIRLHF_INT8_SWITCHBACK", "0")  # in this process too (see SETTINGS)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny random GPT-NeoX, prompts and the reward module, in one folder."""
    folder = tmp_path_factory.mktemp("ddp")
    torch.manual_seed(0)
    model = CausalLM(NeoXConfig(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128, eos_token_id=0, pad_token_id=1))
    init_weights(model)
    with torch.no_grad():
        model.embed_out.weight.mul_(10)  # a peaked next-token distribution, as a trained model has
    save_model(model, str(folder / "model"))
    save_tokenizer(folder / "model")
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (folder / "toyreward.py").write_text(REWARDS)
    return folder


def flags(settings: dict) -> list[str]:
    return [a for k, v in settings.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def torchrun(workdir, *args, timeout=120):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "MINIRLHF_INT8_SWITCHBACK": "0"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(ROOT, "train.py"), "--model", "model", "--prompts", "prompts.txt", *args]
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_equal_one_process(workdir, monkeypatch):
    """1 process x batch 8 and 2 processes x batch 4, 3 steps: the same adapters, value head and statistics.

    Tolerance 2e-5 on weights that move by ~0.1 (measured: 3e-7 here, 9e-6 with another tiny model). The
    gradients agree to float32 rounding (~1e-8 absolute, measured): the ranks run the forward on 2-row
    instead of 4-row minibatch shares and add two partial gradients. But Adam divides every gradient element
    by its own running RMS, so an element whose gradient is tiny, and therefore relatively inexact (measured:
    up to ~2e-3 relative), moves by up to ~lr x 2e-3 = 2e-5 differently per step. The sampled tokens are
    identical: the rewards are equal exactly.
    """
    monkeypatch.chdir(workdir)
    one = workdir / "one"
    run(TrainConfig.from_flags(model="model", prompts="prompts.txt", reward="toyreward:score", steps=3, out=str(one),
                    **SETTINGS), progress=False)

    two = workdir / "two"
    result = torchrun(workdir, "--reward", "toyreward:score", *flags(SETTINGS), "--steps", "3", "--out", "two")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run folder:") == 1  # rank 0 reports, rank 1 stays quiet

    for name in ("adapter/adapter_model.safetensors", "value_head.safetensors"):
        a, b = load_file(one / name), load_file(two / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=2e-5, msg=f"{name} {key}")
    lora_b = [v for k, v in load_file(one / "adapter/adapter_model.safetensors").items() if "lora_B" in k]
    assert max(v.abs().max().item() for v in lora_b) > 1e-2  # the adapters really trained (B starts at 0)

    assert_same_metrics(metrics(one), metrics(two))

    # The checkpoint of the 2-process run at step 2 resumes in one process to the same step 3: nothing in it
    # depends on the number of processes. (torchrun --resume runs the same code on every rank.)
    resumed = workdir / "resumed"
    shutil.copytree(two, resumed, ignore=shutil.ignore_patterns("step-000003"))
    run(TrainConfig.from_flags(model="model", prompts="prompts.txt", reward="toyreward:score", steps=3, resume=str(resumed),
                    **SETTINGS), progress=False)
    assert_same_metrics(metrics(two), metrics(resumed))
    for key, value in load_file(two / "adapter/adapter_model.safetensors").items():
        torch.testing.assert_close(load_file(resumed / "adapter/adapter_model.safetensors")[key], value,
                                   rtol=0, atol=2e-5)


@pytest.mark.parametrize("group", [{"algorithm": "rloo"},
                                   {"algorithm": "grpo", "scale_rewards": "batch", "loss_type": "bnpo"}],
                         ids=["rloo", "grpo-batch-bnpo"])
def test_group_baselines_two_processes_equal_one_process(workdir, monkeypatch, group):
    """--algorithm rloo (and grpo, with the batch's std and bnpo's token count, both of the whole batch),
    K = 4, batch 12: rank 0 holds rows 0-5, so the second prompt's group straddles the ranks.
    The advantages are computed on the gathered batch (group_baselines.py), so 2 processes equal 1: the same
    adapters (tolerance as above), statistics and no value head, after one step (a rollout, the gathered
    advantages and 6 minibatch updates with the ranks' gradients summed)."""
    monkeypatch.chdir(workdir)
    # One step, not three. The ranks' partial gradient sums round differently from one process's: 1.5e-8 on the
    # adapters after step 1 with either int8 backend. Later steps may or may not blow that up, by where the
    # rounding happens to fall: after step 2, 3e-8 with torch._int_mm but 7e-6 with oneDNN's int8 GEMM (whose
    # outputs are bit-identical at any row or thread count), 6.6e-3 by step 3. Something discrete is crossed
    # there (an int8 code at a rounding tie, a clipped ratio: RLOO's ratio is exp of a sum over a sequence, ~1.6
    # within a step on this tiny peaked model, clipfrac 0.2-0.5); we have not traced which.
    settings = {**SETTINGS, "batch_size": 12, "group_size": 4, "lr": 2e-3, **group}
    name = group["algorithm"]
    run(TrainConfig.from_flags(model="model", prompts="prompts.txt", reward="toyreward:score", steps=1,
                               out=str(workdir / f"{name}1"), **settings), progress=False)
    result = torchrun(workdir, "--reward", "toyreward:score", *flags(settings), "--steps", "1", "--out", f"{name}2")
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (load_file(workdir / f / "adapter/adapter_model.safetensors") for f in (f"{name}1", f"{name}2"))
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=2e-5, msg=key)
    assert max(v.abs().max().item() for k, v in one.items() if "lora_B" in k) > 5e-3  # it trained (B starts at 0)
    assert not (workdir / f"{name}2" / "value_head.safetensors").exists()
    assert_same_metrics(metrics(workdir / f"{name}1"), metrics(workdir / f"{name}2"), steps=1)


def assert_same_metrics(a, b, steps=3):
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, steps + 1))
    for x, y in zip(a, b):
        assert x["env/reward_mean"] == y["env/reward_mean"] and x["env/reward_std"] == y["env/reward_std"]
        for key in x:
            if not key.startswith("time/"):
                assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), (x["step"], key)


def test_a_failing_rank_stops_every_rank_with_one_line_each(workdir):
    """The reward raises on rank 1 only: both ranks exit at once (no all-gather left waiting), each with one line."""
    result = torchrun(workdir, "--reward", "toyreward:flaky", *flags(SETTINGS), "--steps", "2", "--out", "fail",
                      timeout=90)
    assert result.returncode != 0
    # (rank 0's progress bar has no newline yet, so rank 1's line may land right after it: look inside lines)
    lines = result.stderr.splitlines()
    errors = [line[line.index("train.py: error:"):] for line in lines if "train.py: error:" in line]
    assert sorted(errors) == [
        "train.py: error: [rank 0] stopped because rank 1 failed: RewardError: reward function 'toyreward:flaky' "
        "raised ZeroDivisionError: boom on rank 1",
        "train.py: error: [rank 1] reward function 'toyreward:flaky' raised ZeroDivisionError: boom on rank 1",
    ], result.stderr[-3000:]
    # no traceback from our processes (torchrun itself still prints its own report of the failed launch)
    ours = [f'File "{os.path.join(ROOT, "minirlhf")}', f'File "{os.path.join(ROOT, "train.py")}"']
    assert not any(frame in result.stderr for frame in ours), result.stderr[-3000:]
    assert result.stderr.count("Traceback (most recent call last)") <= 1, result.stderr[-3000:]


# Run under torchrun: the process group, load_model (which runs torch's first meta-device op, where torch
# lazily imports the module whose default arguments once captured the process group), a collective, shutdown.
THREADS = """
import os, sys, torch
from minirlhf import distributed, load_model

def gloo_threads():
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    return sorted(n for n in names if "gloo" in n)

distributed.init(torch.device("cpu"))
during = gloo_threads()
load_model(sys.argv[1])
distributed.gather_rows(torch.ones(2, 3) * distributed.rank())
distributed.shutdown()
sys.stdout.write(f"rank {distributed.rank()}: {len(during) > 0} {gloo_threads()}\\n")  # one write: no interleaving
"""


def test_no_gloo_thread_outlives_shutdown(workdir):
    """The cause of an abort at exit ("terminate called without an active exception", ~1 run in 12-25): gloo's
    worker threads outlived destroy_process_group, because torch.distributed.nn.functional, imported lazily
    after init, held the process group in its functions' default arguments; at interpreter shutdown a worker
    dropping a finished all_gather's tensors needed the GIL and was stopped. distributed.py imports that module
    before init; this checks the mechanism deterministically (no race needed): after shutdown() no gloo thread
    is left."""
    (workdir / "threads.py").write_text(THREADS)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "threads.py", "model"], cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(line for line in result.stdout.splitlines() if line.startswith("rank ")) == [
        "rank 0: True []", "rank 1: True []"], result.stdout + result.stderr[-3000:]


def test_mini_batch_must_split_evenly_over_ranks(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(UsageError, match="--mini-batch-size 4 is not divisible by the 3 processes"):
        TrainConfig.from_flags(batch_size=8, mini_batch_size=4).validate()
    TrainConfig.from_flags(batch_size=12, mini_batch_size=6).validate()


def test_minibatches_give_every_rank_an_equal_share():
    """Each minibatch holds M / W consecutive-in-rank rows of every rank, for every W dividing M; all rows once."""
    from minirlhf.trainer import minibatches

    B, M = 24, 6
    batches = minibatches(B, M, torch.Generator().manual_seed(0))
    assert batches.shape == (B // M, M)
    assert sorted(batches.flatten().tolist()) == list(range(B))
    for W in (1, 2, 3, 6):
        for rows in batches:
            for r in range(W):  # rank r owns rows r*B/W .. (r+1)*B/W - 1 and reads entries r*M/W .. of each minibatch
                share = rows[r * M // W:(r + 1) * M // W]
                assert all(r * B // W <= i < (r + 1) * B // W for i in share.tolist()), (W, rows)
