"""Reward functions: VADER's sign, 'module:function' loading, and one-line errors that name the function."""

import sys
import textwrap

import numpy as np
import pytest
import torch

from minirlhf.rewards import RewardError, check_scores, checked_reward_fn, load_reward_fn, vader_reward


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """Write mymod_rewards.py into a fresh working directory and chdir there (not on sys.path yet)."""
    source = textwrap.dedent(
        """
        import math
        import torch

        def length(prompts, responses):
            return [float(len(r)) for r in responses]

        def as_tensor(prompts, responses):
            return torch.arange(len(responses), dtype=torch.float64).unsqueeze(-1)  # [n, 1]

        def too_few(prompts, responses):
            return [1.0] * (len(responses) - 1)

        def with_nan(prompts, responses):
            return [1.0, math.nan][: len(responses)]

        def with_text(prompts, responses):
            return ["great"] * len(responses)

        def broken(prompts, responses):
            raise KeyError("no score\\nfor you")

        NOT_A_FUNCTION = 3
        """
    )
    (tmp_path / "mymod_rewards.py").write_text(source)
    (tmp_path / "mymod_import_error.py").write_text("import this_package_does_not_exist_xyz\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    for name in ("mymod_rewards", "mymod_import_error"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return tmp_path


def one_line_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_vader_sign():
    fn = vader_reward()
    prompts = ["The movie was", "The movie was"]
    scores = fn(prompts, [" wonderful, I loved it and I am so happy!", " terrible, awful and I hated it."])
    assert scores[0] > 0.5 and scores[1] < -0.5


def test_vader_scores_prompt_plus_response_by_default():
    prompt, response = "I hate everything about this.", " The end."
    with_prompt = vader_reward()([prompt], [response])[0]
    without_prompt = vader_reward(include_prompt=False)([prompt], [response])[0]
    assert with_prompt < 0 and without_prompt == 0.0


def test_load_vader_spec_returns_checked_tensor():
    fn = load_reward_fn("vader")
    out = fn(["A"], [" lovely, delightful day"])
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (1,)
    assert out[0] > 0


def test_module_function_from_working_directory(reward_module):
    fn = load_reward_fn("mymod_rewards:length")
    out = fn(["p", "q"], ["abc", "abcdefg"])
    torch.testing.assert_close(out, torch.tensor([3.0, 7.0]))
    # A [n, 1] float64 tensor is accepted and flattened to float32 [n].
    out = load_reward_fn("mymod_rewards:as_tensor")(["p"] * 3, ["r"] * 3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([0.0, 1.0, 2.0]))


@pytest.mark.parametrize(
    "spec,fragments",
    [
        ("no_such_module_abc:score", ["no_such_module_abc:score", "cannot import module 'no_such_module_abc'"]),
        ("mymod_import_error:score", ["mymod_import_error:score", "cannot import", "this_package_does_not_exist_xyz"]),
        ("mymod_rewards:nope", ["mymod_rewards:nope", "has no attribute 'nope'"]),
        ("mymod_rewards:NOT_A_FUNCTION", ["mymod_rewards:NOT_A_FUNCTION", "not callable"]),
        ("mymod_rewards:", ["expected the form 'module:function'"]),
    ],
)
def test_bad_specs_give_one_line_errors(reward_module, spec, fragments):
    with pytest.raises(ValueError) as excinfo:
        load_reward_fn(spec)
    one_line_error(excinfo, *fragments)


@pytest.mark.parametrize(
    "function,fragments",
    [
        ("too_few", ["'mymod_rewards:too_few'", "returned 2 scores for 3 samples"]),
        ("with_nan", ["'mymod_rewards:with_nan'", "non-finite", "sample 1"]),
        ("with_text", ["'mymod_rewards:with_text'", "non-numeric", "sample 0", "str"]),
    ],
)
def test_bad_outputs_give_one_line_errors(reward_module, function, fragments):
    fn = load_reward_fn(f"mymod_rewards:{function}")
    n = 2 if function == "with_nan" else 3
    with pytest.raises(ValueError) as excinfo:
        fn(["p"] * n, ["r"] * n)
    one_line_error(excinfo, *fragments)


def test_exception_inside_reward_function_is_wrapped(reward_module):
    fn = load_reward_fn("mymod_rewards:broken")
    with pytest.raises(RewardError) as excinfo:
        fn(["p"], ["r"])
    one_line_error(excinfo, "reward function 'mymod_rewards:broken' raised KeyError", "no score")
    assert isinstance(excinfo.value.__cause__, KeyError)  # the original error is chained


@pytest.mark.parametrize(
    "scores,fragment",
    [
        ([1.0, float("inf")], "non-finite"),
        ([1.0, None], "non-numeric"),
        (torch.tensor([1.0, 2.0, 3.0]), "returned 3 scores for 2 samples"),
        (torch.ones(2, 2), "shape (2, 2)"),
        (torch.tensor([1 + 1j, 2j]), "non-numeric dtype"),
        (np.array(["a", "b"]), "non-numeric dtype"),
        (iter([1.0, 2.0]), "must return a list of floats or a 1-D tensor"),
        ({"a": 1.0, "b": 2.0}, "must return a list of floats or a 1-D tensor"),
    ],
)
def test_check_scores_rejects(scores, fragment):
    with pytest.raises(ValueError) as excinfo:
        check_scores(scores, 2, "myfn")
    one_line_error(excinfo, "reward function 'myfn'", fragment)


def test_check_scores_accepts_numbers_of_all_kinds():
    out = check_scores([1, 2.5, np.float32(3.0), True, torch.tensor(-1.5)], 5, "myfn")
    torch.testing.assert_close(out, torch.tensor([1.0, 2.5, 3.0, 1.0, -1.5]))
    out = check_scores(np.array([0.5, -0.5]), 2, "myfn")
    assert out.dtype == torch.float32 and out.shape == (2,)


def test_checked_reward_fn_with_a_lambda():
    fn = checked_reward_fn(lambda prompts, responses: [len(p) + len(r) for p, r in zip(prompts, responses)], "lengths")
    torch.testing.assert_close(fn(["ab", "c"], ["d", ""]), torch.tensor([3.0, 1.0]))
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        fn(["a", "b"], ["c"])
