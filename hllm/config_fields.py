"""Range rules declared beside config fields: `count: int = positive(8)` keeps the default and the rule
together, and `check_ranges` applies every rule of a config, naming the offending dotted key."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import field, fields, is_dataclass
from typing import Any, get_args, get_type_hints

from hllm.errors import UserError


def _ruled(default: Any, test: Callable[[Any], bool], rule: str) -> Any:
    """A field whose value (each value, for a list) must pass `test`; None (unset) always passes.
    `check_ranges` applies the rule and names the field's dotted key."""
    metadata = {"rule": (test, rule)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def at_least(low: float, default: Any) -> Any:
    return _ruled(default, lambda value: value >= low, f"at least {low}")


def positive(default: Any) -> Any:
    return at_least(1, default)


def above_zero(default: Any) -> Any:
    return _ruled(default, lambda value: value > 0, "above 0")


def share(default: Any) -> Any:
    return _ruled(default, lambda value: 0 <= value < 1, "in [0, 1)")


def in_range(default: Any, low: float, high: float) -> Any:
    return _ruled(default, lambda value: low <= value <= high, f"in [{low}, {high}]")


def check_ranges(config: Any, prefix: str = "") -> None:
    """Apply every field's rule (see `_ruled`) in `config` and its nested dataclasses."""
    for spec in fields(config):
        value, key = getattr(config, spec.name), f"{prefix}{spec.name}"
        if is_dataclass(value):
            check_ranges(value, f"{key}.")
        elif "rule" in spec.metadata and value is not None:
            test, rule = spec.metadata["rule"]
            if not all(map(test, value if isinstance(value, list) else [value])):
                raise UserError(f"must be {rule}, got {value}", where=key)


def choices(config_class: type, name: str) -> tuple[str, ...]:
    """The values a `Literal` field of `config_class` allows, for options that set that field."""
    return get_args(get_type_hints(config_class)[name])
