"""PPO's reward shaping (shaping.py) against trl 0.11.4's PPOTrainer.step, over several steps, and its running
state across a resume.

trl's step is driven for real: its own code scales and clips the scores (the lines right after
`_step_safety_checker`), with trl's own RunningMoments, on a stand-in `self` whose prepare_model_inputs
stops the step and hands back the step's local `scores`. One patch: trl 0.11.4 calls `.to()` on the running
mean and std, which its RunningMoments keeps as Python floats, so use_score_scaling raises AttributeError
there; `TensorMoments` hands it the same numbers as 0-d tensors (and floats back to trl's update).
"""

import functools
import json
import types

import pytest
import torch

from minirlhf.options import ShapingConfig, TrainConfig
from minirlhf.shaping import RunningMoments, shape_scores
from minirlhf.train import run
from tiny import PPO, run_folder_inputs

trl_utils = pytest.importorskip("trl.trainer.utils")
from trl import PPOTrainer  # noqa: E402


class TensorMoments(trl_utils.RunningMoments):
    """trl's RunningMoments, its mean and std exposed as float64 0-d tensors between updates (what its step's
    `.to()` needs), Python floats during them (so its update's arithmetic is unchanged)."""

    def update(self, xs):
        self.mean, self.std = float(self.mean), float(self.std)
        out = super().update(xs)
        self.mean, self.std = torch.tensor(self.mean, dtype=torch.float64), torch.tensor(self.std, dtype=torch.float64)
        return out


class Stop(Exception):
    pass


def trl_stand_in(config: ShapingConfig, batch_size: int):
    accelerator = types.SimpleNamespace(use_distributed=False)
    stand_in = types.SimpleNamespace(
        config=types.SimpleNamespace(batch_size=batch_size, use_score_scaling=config.use_score_scaling,
                                     use_score_norm=config.use_score_norm,
                                     score_clip=config.score_clip or None),  # trl's "off" is None
        current_device=torch.device("cpu"), running=TensorMoments(accelerator))

    def stop(*args, **kwargs):
        raise Stop

    stand_in._step_safety_checker = functools.partial(PPOTrainer._step_safety_checker, stand_in)
    stand_in.prepare_model_inputs = stop
    return stand_in


def trl_shaped(stand_in, scores: torch.Tensor) -> torch.Tensor:
    """trl's PPOTrainer.step on these scores, up to its first model call: the scores its rewards will add."""
    B = scores.shape[0]
    queries, responses = [torch.tensor([2, 3])] * B, [torch.tensor([4])] * B
    try:
        PPOTrainer.step(stand_in, queries, responses, list(scores))
    except Stop as e:
        tb = e.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_name == "step" and "score_scaling_factor" in tb.tb_frame.f_code.co_varnames:
                return tb.tb_frame.f_locals["scores"]
            tb = tb.tb_next
    raise AssertionError("trl's step did not reach prepare_model_inputs")


CONFIGS = [ShapingConfig(use_score_scaling=True), ShapingConfig(use_score_scaling=True, use_score_norm=True),
           ShapingConfig(score_clip=1.5), ShapingConfig(use_score_scaling=True, use_score_norm=True, score_clip=0.5)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(k for k, v in vars(c).items() if v))
def test_shaped_scores_and_running_moments_equal_trl_over_steps(config):
    g = torch.Generator().manual_seed(0)
    stand_in, ours = trl_stand_in(config, 16), RunningMoments()
    for step in range(5):  # drifting scores: the running statistics matter
        scores = torch.randn(16, generator=g) * (1 + step) + 2 * step
        expected = trl_shaped(stand_in, scores)
        got = shape_scores(scores, config, ours)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        if config.use_score_scaling:
            t = stand_in.running
            for mine, theirs in ((ours.mean, t.mean), (ours.std, t.std), (ours.var, t.var), (ours.count, t.count)):
                assert mine == pytest.approx(float(theirs), rel=1e-6, abs=1e-7), step
        if config.score_clip:
            assert got.abs().max().item() <= config.score_clip
            assert (got.abs() == config.score_clip).any()  # the clip really acted
    if config.use_score_scaling:  # and the scaling really scaled
        assert not torch.allclose(got, scores)


def test_unshaped_scores_are_untouched():
    scores = torch.randn(8)
    running = RunningMoments()
    assert shape_scores(scores, ShapingConfig(), running) is scores
    assert running.state_dict() == RunningMoments().state_dict()


# ---------------------------------------------------------------------------------------------- runs

PROMPTS = ["the movie was", "hello world", "a dull film", "I loved every", "this is a", "boring plot"]
REWARD = "def score(prompts, responses):\n    return [(sum(map(ord, r)) % 11) / 2 - 1 for r in responses]\n"
SMALL = dict(steps=3, batch_size=8, mini_batch_size=4, ppo_epochs=1, min_new_tokens=2, max_new_tokens=4,
             eval_size=2, save_every=1, seed=0, reward="toyreward:score", lr=1e-2,
             use_score_scaling=True, use_score_norm=True, score_clip=1.0, whiten_rewards=True, **PPO)


@pytest.fixture()
def tiny(tmp_path, monkeypatch):
    run_folder_inputs(tmp_path, PROMPTS, **{"toyreward.py": REWARD})
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_a_shaped_run_equals_trl_step_by_step_and_resumes_exactly(tiny, monkeypatch):
    """A PPO run with every shaping flag: each step's shaped scores equal trl's step on the same raw scores (one
    stand-in across the steps: the running statistics carry over); the checkpointed running moments are
    trl's; resumed from step 1, steps 2 and 3 are the same numbers and end in the same running state."""
    from minirlhf import trainer as trainer_module

    batches = []
    advantages = trainer_module.PPOTrainer.advantages

    def record(self, r, kl_coef):
        batch = advantages(self, r, kl_coef)
        batches.append(batch)
        return batch

    monkeypatch.setattr(trainer_module.PPOTrainer, "advantages", record)
    base = dict(model=str(tiny / "model"), prompts=str(tiny / "prompts.txt"), **SMALL)
    run(TrainConfig.from_flags(out=str(tiny / "full"), **base), progress=False)
    stand_in = trl_stand_in(ShapingConfig(True, True, 1.0, True), 8)
    for batch in batches:
        torch.testing.assert_close(batch.scores, trl_shaped(stand_in, batch.raw_scores), rtol=1e-6, atol=1e-6)
    assert len({tuple(b.raw_scores.tolist()) for b in batches}) == 3  # three different batches of scores

    def state(folder, step):
        path = tiny / folder / "checkpoints" / f"step-{step:06d}" / "trainer_state.json"
        return json.loads(path.read_text())["running_moments"]

    final = state("full", 3)
    t = stand_in.running
    assert final == pytest.approx({"mean": float(t.mean), "std": float(t.std), "var": t.var, "count": t.count},
                                  rel=1e-6)

    run(TrainConfig.from_flags(out=str(tiny / "part"), **{**base, "steps": 1}), progress=False)
    run(TrainConfig.from_flags(resume=str(tiny / "part"), **base), progress=False)
    assert state("part", 3) == final  # exactly: four floats through JSON
    full, part = (
        [json.loads(line) for line in (tiny / f / "metrics.jsonl").read_text().splitlines()] for f in ("full", "part"))
    for x, y in zip(full, part, strict=True):
        for key in x:
            if not key.startswith("time/"):
                assert y[key] == pytest.approx(x[key], rel=1e-6, abs=1e-7), (x["step"], key)
    assert full[-1]["ppo/mean_scores"] != full[-1]["env/reward_mean"]  # env/ logs the raw scores, ppo/ the shaped
