"""One command line from a run-configuration dataclass, for pre-training and fine-tuning alike.

Each field is a flag: its name with dashes (``train_shards`` -> ``--train-shards``), plus the
underscore spelling for ``deepspeed_config`` (the one DeepSpeed users know). A field's help is its
``metadata["help"]`` or else its attribute docstring (the string literal under it in the class
body), so code and ``--help`` share one text. Booleans get ``--x / --no-x``; ``int``, ``float`` and
their ``| None`` forms are converted; anything else is a string. A field is required when it has no
default or its metadata says ``required``. The ``--local_rank`` the DeepSpeed launcher passes to
every rank is accepted and dropped: ranks come from the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

UNDERSCORE_SPELLINGS = frozenset({"deepspeed_config"})
"""Fields that also keep their underscore flag, listed first (``--deepspeed_config``)."""
_KINDS: dict[str, type] = {"int": int, "float": float, "int | None": int, "float | None": float}


def attribute_docs(cls: type) -> dict[str, str]:
    """Each field's attribute docstring (first line), read from the class source: ``{name: text}``."""
    lines = [line.strip() for line in inspect.getsource(cls).splitlines()]
    docs = {}
    for line, following in zip(lines, lines[1:], strict=False):
        name = line.split(":", 1)[0]
        if ":" in line and name.isidentifier() and following.startswith('"""'):
            docs[name] = following.strip('"')
    return docs


def _is_bool(field: dataclasses.Field) -> bool:
    return field.type in ("bool", bool) or isinstance(field.default, bool)


def _is_required(field: dataclasses.Field) -> bool:
    no_default = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    return no_default or bool(field.metadata.get("required"))


def build_parser(
    cls: type,
    *,
    prog: str,
    description: str,
    choices: Mapping[str, Sequence[str]] | None = None,
) -> argparse.ArgumentParser:
    """The argparse parser for dataclass ``cls``; ``choices`` restricts the named fields' values."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    docs = attribute_docs(cls)
    choices = choices or {}
    for field in dataclasses.fields(cls):
        flags = [f"--{field.name.replace('_', '-')}"]
        if field.name in UNDERSCORE_SPELLINGS:
            flags.insert(0, f"--{field.name}")
        # argparse formats help texts with %: a literal one must be doubled.
        help_text = field.metadata.get("help", docs.get(field.name, "")).replace("%", "%%")
        if _is_bool(field):
            parser.add_argument(
                *flags,
                dest=field.name,
                action=argparse.BooleanOptionalAction,
                default=field.default,
                help=help_text,
            )
            continue
        kwargs: dict[str, Any] = {"required": True} if _is_required(field) else {"default": field.default}
        if field.name in choices:
            kwargs["choices"] = tuple(choices[field.name])
        parser.add_argument(
            *flags, dest=field.name, type=_KINDS.get(str(field.type), str), help=help_text, **kwargs
        )
    # Passed by the deepspeed launcher to every rank; the rank comes from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def parse_config(
    cls: type[T],
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    choices: Mapping[str, Sequence[str]] | None = None,
) -> T:
    """Parse ``argv`` (default: ``sys.argv[1:]``) into a ``cls``, whose ``__post_init__`` checks the values."""
    parser = build_parser(cls, prog=prog, description=description, choices=choices)
    args = vars(parser.parse_args(argv))
    args.pop("local_rank")
    return cls(**args)
