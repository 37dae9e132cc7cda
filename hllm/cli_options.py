"""Parsing of the command line's list options (`--kinds exact,hnsw`, `--clients 1,8,16`), shared by
the `hllm` commands and the `hllm bench` commands."""

from __future__ import annotations

from typing import Annotated

import typer

from hllm.errors import UserError

Overrides = Annotated[list[str] | None, typer.Argument(help="Dotted overrides, e.g. train.lr=1e-4")]


def choice(value: str, option: str, allowed: tuple[str, ...]) -> str:
    """`value` when it is one of `allowed` (for config fields: the values their `Literal` lists)."""
    if value not in allowed:
        raise UserError(f"unknown value {value!r}: use {', '.join(allowed)}", where=option)
    return value


def names(text: str, option: str, *, allowed: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The comma-separated names of `option`; with `allowed`, each must be one of them."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    return names if allowed is None else tuple(choice(name, option, allowed) for name in names)


def numbers(text: str, option: str) -> tuple[int, ...]:
    """The comma-separated whole numbers of `option` (1,8,16)."""
    if not all(part.strip().isdigit() for part in text.split(",")):
        raise UserError(f"expected whole numbers like 1,8,16, got {text!r}", where=option)
    return tuple(int(part) for part in text.split(","))
