"""Choosing the last-item text term's weight and decay (`model.last_item_text_choices`,
`model.last_item_text_decay_choices`) after training, on validation, and the config that keeps them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from torch import nn

from hllm.config import RunConfig


def choose_last_item_text(model: nn.Module, config: RunConfig, validate: Callable[[], dict]) -> dict:
    """Set the model's last-item text weight to the choice with the best validation eval.metric,
    then (given decay choices and a weight > 0) its decay the same way at that weight; the first
    wins a tie. Return each choice with every figure of its sweep."""
    summary = _choose(model, "last_item_text", config.model.last_item_text_choices, config, validate)
    if config.model.last_item_text_decay_choices and model.last_item_text:
        choices = config.model.last_item_text_decay_choices
        summary["decay"] = _choose(model, "last_item_text_decay", choices, config, validate)
    return summary


def _choose(
    model: nn.Module, attribute: str, choices: list[float], config: RunConfig, validate: Callable[[], dict]
) -> dict:
    metric = config.eval.metric
    figures = {}
    for value in choices:
        setattr(model, attribute, value)
        figures[value] = validate()[metric]
    setattr(model, attribute, max(figures, key=figures.get))
    return {"chosen": getattr(model, attribute), f"valid {metric}": {str(v): f for v, f in figures.items()}}


def chosen_config(config: RunConfig, model: nn.Module) -> RunConfig:
    """The run's config with the chosen weight and decay in place of the choices, as load_run and
    export read it."""
    chosen = replace(
        config.model,
        last_item_text=model.last_item_text,
        last_item_text_choices=[],
        last_item_text_decay=model.last_item_text_decay,
        last_item_text_decay_choices=[],
    )
    return replace(config, model=chosen)
