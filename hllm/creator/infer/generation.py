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
from hllm.creator.data.grounded import Fact, FactCatalogue
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
    grounded: FactCatalogue

    @classmethod
    def read(cls, config: DataConfig, fact_chars: int) -> ItemFacts:
        items = read_catalogue(config)
        return cls(items, fact_chars, collect_brands(items["brand"]), FactCatalogue(items, fact_chars))

    def facts(self, item_id: str) -> tuple[str, str]:
        """(original title, selling points) of an item; an unknown id is a one-line error."""
        if item_id not in self.items.index:
            raise UserError(f"unknown item id {item_id!r}: not in the catalogue", where="--item")
        row = self.items.loc[item_id]
        return row["title"], row["selling_points"][: self.fact_chars]

    def candidates(self, item_id: str) -> tuple[str, list[Fact]]:
        """What the fact selector chooses from: the original title and the item's facts."""
        return self.facts(item_id)[0], self.grounded.facts(item_id)

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
    angles: list[str] | None = None,
) -> list[list[str]]:
    """`n` titles for each (original title, selling points), the i-th conditioned on `projected[i]`
    (None: no [USER] position at all, the no-user ablation) and on `angles[i]`, its [ANGLE] text
    (`CreativeLLM.angles`; None: no such line). Prompts of similar length share a batch."""
    angles = angles or [None] * len(facts)
    prompts = [
        model.layout.prompt(title, points, with_user=projected is not None, angle=angle)
        for (title, points), angle in zip(facts, angles, strict=True)
    ]
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
def embed_histories(
    model: CreativeLLM, histories: list[np.ndarray], max_history: int, *, batch_size: int
) -> Tensor:
    """Normalised user vectors (B, Du) of histories of internal item ids, in batches; the [USER]
    position receives `model.projector` of them."""
    rows = [
        model.user_vectors(
            pad_histories(histories[i : i + batch_size], max_history).to(model.projector.weight.device)
        )
        for i in range(0, len(histories), batch_size)
    ]
    return torch.cat(rows) if rows else torch.empty(0, model.projector.in_features)


def personalise(run, user_id: str, item_id: str, *, n: int = 3) -> dict:
    """`n` titles of `item_id` for `user_id` (whose whole sequence is the history), with the
    original title, the user's recent items and each title's filter verdict."""
    data, settings = run.hllm.data, run.config.creator.infer
    history = data.sequence(data.user_index(user_id))
    catalogue = ItemFacts.read(run.hllm.config.data, run.config.creator.data.fact_chars)
    title, points = catalogue.facts(item_id)
    data.item_index(item_id)  # the HLLM must know the item too
    users = embed_histories(run.model, [history], run.hllm.config.data.max_history, batch_size=1)
    angles = run.model.angles(users, [catalogue.candidates(item_id)])
    temperature = settings.temperature or (SAMPLING_TEMPERATURE if n > 1 else 0.0)
    titles = generate_titles(
        run.model,
        [(title, points)],
        run.model.projector(users),
        batch_size=1,
        max_new_tokens=settings.max_new_tokens,
        temperature=temperature,
        n=n,
        angles=angles,
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
        **({"angle": angles[0]} if angles else {}),
        "titles": [{"title": t, "reasons": list(catalogue.check(item_id, t).reasons)} for t in titles],
    }
