"""Titles from a trained Creator: item facts from the catalogue, batched generation for given user
vectors, and `hllm creator generate` for one user and one item.

Dims: B prompts, H creative width.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from hllm.config import DataConfig
from hllm.creator.data.hallucination import Verdict, check_title, collect_brands
from hllm.creator.data.teacher import read_catalogue
from hllm.creator.model.model import CreativeLLM, pad_histories
from hllm.errors import UserError

SAMPLING_TEMPERATURE = 0.8  # `generate --n` samples when the configured temperature is greedy


@dataclass
class ItemFacts:
    """Each item's original title and selling points (as build-data cut them), and what the
    hallucination filter checks a title against."""

    items: pd.DataFrame  # index: raw item id; columns title, selling_points, brand, ...
    fact_chars: int
    brands: set[str]

    @classmethod
    def read(cls, config: DataConfig, fact_chars: int) -> ItemFacts:
        items = read_catalogue(config)
        return cls(items, fact_chars, collect_brands(items["brand"]))

    def facts(self, item_id: str) -> tuple[str, str]:
        """(original title, selling points) of an item; an unknown id is a one-line error."""
        if item_id not in self.items.index:
            raise UserError(f"unknown item id {item_id!r}: not in the catalogue", where="--item")
        row = self.items.loc[item_id]
        return row["title"], row["selling_points"][: self.fact_chars]

    def check(self, item_id: str, title: str, *, allowed_text: str = "") -> Verdict:
        """The hallucination filter's verdict on `title` as a rewrite of this item's title."""
        original, _ = self.facts(item_id)
        row = self.items.loc[item_id]
        return check_title(
            title,
            original_title=original,
            source_text=f"{original}; {row['selling_points']}",
            known_brands=self.brands,
            allowed_text=allowed_text,
        )


def generate_titles(
    model: CreativeLLM,
    facts: list[tuple[str, str]],
    projected: Tensor | None,
    *,
    batch_size: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    n: int = 1,
) -> list[list[str]]:
    """`n` titles for each (original title, selling points), the i-th conditioned on `projected[i]`
    (None: no [USER] position at all, the no-user ablation). Prompts of similar length share a batch."""
    prompts = [model.layout.prompt(title, points, with_user=projected is not None) for title, points in facts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].ids))
    titles: list[list[str]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        batch_projected = None if projected is None else projected[chosen]
        answers = model.generate(
            [prompts[i] for i in chosen],
            batch_projected,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            n=n,
        )
        for i, answer in zip(chosen, answers, strict=True):
            titles[i] = answer
    return titles


@torch.no_grad()
def project_users(
    model: CreativeLLM, histories: list[np.ndarray], max_history: int, *, batch_size: int
) -> Tensor:
    """Projected user embeddings (B, H) of histories of internal item ids, in batches."""
    rows = [
        model.projected_users(
            pad_histories(histories[i : i + batch_size], max_history).to(model.projector.weight.device)
        )
        for i in range(0, len(histories), batch_size)
    ]
    return torch.cat(rows) if rows else torch.empty(0, model.projector.out_features)


def personalise(run, user_id: str, item_id: str, *, n: int = 3) -> dict:
    """`n` titles of `item_id` for `user_id` (whose whole sequence is the history), with the
    original title, the user's recent items and each title's filter verdict."""
    data, settings = run.hllm.data, run.config.creator.infer
    history = data.sequence(data.user_index(user_id))
    catalogue = ItemFacts.read(run.hllm.config.data, run.config.creator.data.fact_chars)
    title, points = catalogue.facts(item_id)
    data.item_index(item_id)  # the HLLM must know the item too
    projected = project_users(run.model, [history], run.hllm.config.data.max_history, batch_size=1)
    temperature = settings.temperature or (SAMPLING_TEMPERATURE if n > 1 else 0.0)
    titles = generate_titles(
        run.model,
        [(title, points)],
        projected,
        batch_size=1,
        max_new_tokens=settings.max_new_tokens,
        temperature=temperature,
        n=n,
    )[0]
    if not any(titles):
        raise UserError(
            f"the model generated an empty title for user {user_id!r} and item {item_id!r}; "
            "train longer or raise creator.infer.max_new_tokens",
            where=str(run.folder),
        )
    return {
        "user_id": user_id,
        "item_id": item_id,
        "original_title": title,
        "recent_history": [str(data.item_titles[i]) for i in history[-5:]],
        "titles": [{"title": t, "reasons": list(catalogue.check(item_id, t).reasons)} for t in titles],
    }
