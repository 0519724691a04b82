"""Where the embedded default lives: minirlhf/default/, built by `python -m minirlhf.build_default`.

    default/lm/                 the small movie-review GPT-NeoX (--model default)
    default/rm/                 its reward model, trained on human ratings (--reward default)
    default/prompts.txt         PPO prompts (--prompts default)
    default/eval_prompts.txt    held-out eval prompts (--eval-prompts default)
    default/build_report.json   what the build measured
"""

import os

from .cli import UsageError

DEFAULT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default")


def default_path(name: str) -> str:
    """A file or folder of the embedded default; a UsageError if this install does not have it."""
    path = os.path.join(DEFAULT_DIR, name)
    if not os.path.exists(path):
        raise UsageError(f"the embedded default ({path}) is not built in this install: run "
                         "`python -m minirlhf.build_default`, or pass --model, --reward and --prompts")
    return path
