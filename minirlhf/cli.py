"""Command-line plumbing shared by train.py and python -m minirlhf.build_default: dataclass -> flags, errors.

A config is a dataclass whose every field is one flag, documented by the string under the field
(the way nanoGPT's and litgpt's configs read). `add_dataclass_flags` turns the fields into argparse flags
(bools get --x / --no-x); `Parser` reports a bad flag in one line and exits 2, as every error of these
commands does (`UsageError` for what argparse cannot see: ranges, relations, missing files).
"""

import argparse
import ast
import contextlib
import dataclasses
import inspect
import json
import os
import sys


class UsageError(ValueError):
    """A flag or input file the run cannot use; the message names it."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (`prog: error: ...`) and exit 2, without the long usage text."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


@contextlib.contextmanager
def about(flag_name: str):
    """Errors raised inside (bad files, bad values) are about this flag: they become UsageErrors that name it."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, OSError) as e:
        raise UsageError(f"{flag_name}: {e}") from None


def flag(name: str) -> str:
    """A field's flag: lora_r -> --lora-r."""
    return "--" + name.replace("_", "-")


def add_dataclass_flags(parser, cls, group_title: str | None = None) -> None:
    """One --flag per dataclass field (bools get --x / --no-x), its help text the string under the field."""
    target = parser.add_argument_group(group_title) if group_title else parser
    docs = {name: doc.replace("%", "%%") for name, doc in field_docs(cls).items()}  # argparse formats help with %
    for f in dataclasses.fields(cls):
        if f.type is bool or f.type == "bool":
            target.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=f.default,
                                help=docs[f.name])
        else:
            target.add_argument(flag(f.name), type=type(f.default), default=f.default, help=docs[f.name],
                                metavar=f.name.upper())


def field_docs(cls) -> dict[str, str]:
    """The string under each dataclass field: the help text of its flag."""
    tree = ast.parse(inspect.getsource(cls))
    body, docs = tree.body[0].body, {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def read_json_object(path: str, error=ValueError) -> dict:
    """A JSON file that holds one object (config.json and its kin), or `error` with one line naming the file."""
    if not os.path.isfile(path):
        raise error(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def fail(prog: str, message: str) -> int:
    """Print `prog: error: message` on one line to stderr; the exit code of a usage error."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2
