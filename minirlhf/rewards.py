"""Reward functions: what the PPO loop maximises.

In RLHF the environment is a function that reads a finished text and returns one number. Here a reward
function is any callable

    reward_fn(prompts: list[str], responses: list[str]) -> list[float] | torch.Tensor     (one score each)

which keeps the interface small enough for a lambda, a lexicon, a classifier or a learned reward model.
The loop never calls a user's function directly: it calls the *checked* function that `load_reward_fn`
(or `checked_reward_fn`) returns, which always gives a float32 tensor of shape [n] or raises one clear
error that names the reward function. A bad reward (a NaN, a missing score) found at step 5,000 should
say which function broke and how, not surface later as a NaN loss.

Specs accepted by `load_reward_fn`:
    "vader"              VADER sentiment (Hutto & Gilbert 2014, "VADER: A Parsimonious Rule-based Model
                         for Sentiment Analysis of Social Media Text"): the compound score in [-1, 1] of
                         prompt + response, the classic "make GPT write positive reviews" task
    "module:function"    a reward_fn importable from the working directory or PYTHONPATH
    anything else        a local path or Hub id of a GPT-NeoX reward model (`reward_model_fn`)

Why score prompt + response for VADER: trl's sentiment example (examples/scripts/ppo.py) scores
`query + response`, the two strings concatenated with no separator, and so does trlX's ppo_sentiments
(its `samples` are prompt + output). The prompt is a fixed prefix the policy cannot change, so it only
shifts the score; including it keeps our numbers comparable with theirs. `vader_reward(include_prompt=False)`
scores the response alone. VADER's compound score lies in [-1, 1], a smaller scale than the distilbert-imdb
logits that trl's example uses as rewards, so the KL coefficient weighs relatively more.
"""

import importlib
import numbers
import os
import sys

import numpy as np
import torch

from .checkpoint import CheckpointError, load_model
from .tokenizer import load_tokenizer


class RewardError(RuntimeError):
    """A reward function raised an exception; the message names the function and the original error."""


def _one_line(text: str) -> str:
    """Collapse an exception message to a single line (error messages here are always one line)."""
    return " ".join(str(text).split())


# ----------------------------------------------------------------------------------------------------
# Validating what a reward function returned.
# ----------------------------------------------------------------------------------------------------


def check_scores(scores, n: int, name: str) -> torch.Tensor:
    """Turn a reward function's output into a float32 tensor [n], or raise a one-line ValueError.

    Accepted: a list/tuple of real numbers (python or numpy numbers, bools, 0-d tensors), or a numeric
    tensor / numpy array of shape [n] (or [n, 1], the usual shape of a reward model's head).
    Rejected, each with a message naming the reward function: another container type, non-numeric
    elements, a wrong number of scores, NaN or +-inf. A tensor keeps its device.
    """
    prefix = f"reward function '{name}'"
    if isinstance(scores, (list, tuple)):
        values = []
        for i, score in enumerate(scores):
            if isinstance(score, torch.Tensor) and score.numel() == 1 and not score.is_complex():
                score = score.item()
            if not isinstance(score, numbers.Real):
                shown = f"{type(score).__name__} {_one_line(repr(score))[:80]}"
                raise ValueError(f"{prefix} returned a non-numeric score for sample {i}: {shown}")
            values.append(float(score))
        tensor = torch.tensor(values, dtype=torch.float32)
    elif isinstance(scores, (torch.Tensor, np.ndarray)):
        # numpy kinds b(ool), i(nt), u(nsigned), f(loat) are numbers; strings, objects, complex are not.
        if isinstance(scores, np.ndarray):
            if scores.dtype.kind not in "biuf":
                raise ValueError(f"{prefix} returned an array of non-numeric dtype {scores.dtype}")
            scores = torch.from_numpy(scores.astype(np.float32))
        if scores.is_complex():
            raise ValueError(f"{prefix} returned a tensor of non-numeric dtype {scores.dtype}")
        tensor = scores[:, 0] if scores.dim() == 2 and scores.shape[1] == 1 else scores
        if tensor.dim() != 1:
            raise ValueError(f"{prefix} returned scores of shape {tuple(scores.shape)}, expected ({n},)")
        tensor = tensor.detach().float()
    else:
        raise ValueError(f"{prefix} must return a list of floats or a 1-D tensor, got {type(scores).__name__}")

    if tensor.shape[0] != n:
        raise ValueError(f"{prefix} returned {tensor.shape[0]} scores for {n} samples")
    finite = torch.isfinite(tensor)
    if not finite.all():
        i = int((~finite).nonzero()[0])
        raise ValueError(f"{prefix} returned a non-finite score ({tensor[i].item()}) for sample {i}")
    return tensor


def checked_reward_fn(fn, name: str):
    """Wrap a reward_fn so that it always returns a checked float32 tensor [n] or raises a clear error.

    An exception inside `fn` becomes RewardError("reward function '<name>' raised <Type>: <message>"),
    chained to the original (`raise ... from`), so the traceback is still there for debugging.
    """

    def reward(prompts: list[str], responses: list[str]) -> torch.Tensor:
        if len(prompts) != len(responses):
            raise ValueError(f"reward function '{name}' got {len(prompts)} prompts but {len(responses)} responses")
        try:
            scores = fn(prompts, responses)
        except Exception as error:
            raise RewardError(f"reward function '{name}' raised {type(error).__name__}: {_one_line(error)}") from error
        return check_scores(scores, len(prompts), name)

    reward.__name__ = f"checked_{name}"
    return reward


# ----------------------------------------------------------------------------------------------------
# The built-in reward: VADER sentiment.
# ----------------------------------------------------------------------------------------------------


def vader_reward(include_prompt: bool = True):
    """A reward_fn giving VADER's compound sentiment score in [-1, 1] (positive text -> positive score).

    include_prompt=True scores prompt + response (concatenated as is, like trl's example);
    False scores the response alone. The lexicon is loaded once, here, not on every call.
    """
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()

    def reward(prompts: list[str], responses: list[str]) -> list[float]:
        texts = [p + r for p, r in zip(prompts, responses)] if include_prompt else list(responses)
        return [analyzer.polarity_scores(text)["compound"] for text in texts]

    return reward


# ----------------------------------------------------------------------------------------------------
# Loading a reward function from a command-line spec.
# ----------------------------------------------------------------------------------------------------


def reward_model_fn(name_or_path: str, device="cpu", batch_size: int = 64, max_length: int = 256,
                    include_prompt: bool = True):
    """A reward_fn backed by a GPT-NeoX reward model (a folder or Hub id holding a
    GPTNeoXForSequenceClassification checkpoint with one label).

    It scores prompt + response (concatenated as is, as for VADER; include_prompt=False: the response
    alone), left-padded, read at the last real token: one scalar per sample, [n]. The model runs in
    float32 and in eval mode, with no gradients.
    """
    model = load_model(name_or_path, device=device, kind="classifier")
    if model.config.num_labels != 1:
        raise CheckpointError(f"{name_or_path}: a reward model needs one output (num_labels = 1), "
                              f"this one has {model.config.num_labels}")
    tokenizer = load_tokenizer(name_or_path)

    @torch.no_grad()
    def reward(prompts: list[str], responses: list[str]) -> torch.Tensor:
        texts = [p + r for p, r in zip(prompts, responses)] if include_prompt else list(responses)
        scores = []
        for i in range(0, len(texts), batch_size):
            ids, mask = tokenizer.encode_batch(texts[i:i + batch_size], max_length=max_length)
            scores.append(model(ids.to(device), mask.to(device)).logits[:, 0].float())
        return torch.cat(scores)

    return reward


def _import_function(spec: str):
    """'package.module:function' -> the function, importing from the working directory first."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name or ":" in function_name:
        raise ValueError(f"reward function '{spec}': expected the form 'module:function'")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        reason = f"{type(error).__name__}: {_one_line(error)}"
        raise ValueError(f"reward function '{spec}': cannot import module '{module_name}' ({reason})") from error
    fn = getattr(module, function_name, None)
    if fn is None:
        raise ValueError(f"reward function '{spec}': module '{module_name}' has no attribute '{function_name}'")
    if not callable(fn):
        raise ValueError(f"reward function '{spec}': '{function_name}' in module '{module_name}' is not callable")
    return fn


def load_reward_fn(spec: str, device="cpu"):
    """Resolve a spec ("vader", "module:function", or a reward model path / Hub id) to a *checked*
    reward function: (prompts, responses) -> float32 tensor [n] (see `checked_reward_fn`).

    An existing local path always means a reward model, even if it contains ':'.
    """
    if spec == "vader":
        fn = vader_reward()
    elif ":" in spec and not os.path.exists(spec):
        fn = _import_function(spec)
    else:
        fn = reward_model_fn(spec, device)
    return checked_reward_fn(fn, spec)
