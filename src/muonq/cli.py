"""Hydra-style ``key=value`` arguments for the small tools (compare, evaluate, export).

The tools are not Hydra apps (they run or read Hydra runs), but their arguments look the same, so
``optimizers=[adamw,muon] steps=300 out=reports/x`` reads like a training override. Values are
parsed like Hydra's simple values: ``[a,b]`` is a list, ``true``/``false`` are booleans, numbers are
numbers, ``null`` is None, quotes are stripped; anything else is a string.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from muonq.errors import UserError


class UsageError(UserError):
    """A bad command line; the tool prints it with its usage and exits 2."""


def parse_value(text: str) -> Any:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [parse_value(part) for part in inner.split(",")] if inner else []
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "null":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def split_kv(arg: str) -> tuple[str, str]:
    if "=" not in arg or arg.startswith("="):
        raise UsageError(f"expected key=value, got {arg!r}")
    key, _, value = arg.partition("=")
    return key.strip(), value


def parse_args(
    argv: Sequence[str], *, keys: dict[str, Any], passthrough: bool = False
) -> tuple[dict[str, Any], list[str]]:
    """``keys`` maps each known key to its default. Returns (values, the other arguments verbatim).

    Unknown keys are an error unless ``passthrough`` (then they are returned, e.g. as Hydra
    overrides for the runs). A key given twice keeps the last value, as in Hydra.
    """
    values = dict(keys)
    rest: list[str] = []
    for arg in argv:
        key, raw = split_kv(arg)
        if key in keys:
            values[key] = parse_value(raw)
        elif passthrough:
            rest.append(arg)
        else:
            raise UsageError(f"unknown argument {key!r}; known: {', '.join(keys)}")
    return values, rest


def as_list(value: Any, key: str) -> list[str]:
    """A list argument given as ``[a,b]``, ``a,b`` or a single ``a``."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [part.strip() for part in str(value).split(",") if part.strip()]


def as_int(value: Any, key: str, *, minimum: int) -> int:
    """An integer argument: ``value`` if it is one and at least ``minimum``, else a UsageError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{key}= must be an integer >= {minimum}, got {value!r}")
    return value


def run_cli(main: Any, usage: str, argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)``; print usage for -h/--help, and one-line errors (exit 2) for bad input
    (:class:`~muonq.errors.UserError`); any other exception is a bug and keeps its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(usage)
        return 0
    try:
        return int(main(argv) or 0)
    except UsageError as err:
        print(f"error: {err}\n\n{usage}", file=sys.stderr)
        return 2
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
