"""Creator training rows: rows.parquet of `hllm creator build-data` -> tokenised examples ->
batches padded to their longest sequence, with cls negatives from the batch and the catalogue.

Users, not rows, are held out, so evaluation never sees a user the Creative LLM trained on.
Dims: B rows, L history, K negatives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from hllm.creator.model.layout import PromptLayout, Sequence, angle_text, pad
from hllm.creator.model.model import CreatorBatch, pad_histories
from hllm.data.dataset import SequenceData
from hllm.errors import UserError
from hllm.runs import Run

ROW_COLUMNS = (
    "user_id",
    "history_item_ids",
    "item_id",
    "original_title",
    "selling_points",
    "interests",
    "personalised_title",
    "kept",
)


def read_rows(path: str | Path) -> pd.DataFrame:
    """rows.parquet (or the folder holding it), every column training and evaluation read checked."""
    path = Path(path)
    if path.is_dir():
        path = path / "rows.parquet"
    if not path.is_file():
        raise UserError("no rows here: run `hllm creator build-data` first", where=str(path))
    try:
        rows = pd.read_parquet(path)
    except (OSError, ValueError) as err:
        raise UserError(f"not a Parquet file ({str(err).splitlines()[0]})", where=str(path)) from None
    if missing := [name for name in ROW_COLUMNS if name not in rows.columns]:
        raise UserError(f"missing column(s) {', '.join(missing)}", where=str(path))
    rows["user_id"] = rows["user_id"].astype(str)
    rows["item_id"] = rows["item_id"].astype(str)
    return rows.reset_index(drop=True)


def trainable_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows with a profile: every one trains recon, align and cls; the kept ones also creative."""
    return rows[rows["interests"].map(lambda interests: interests is not None and len(interests) > 0)]


def held_out_users(rows: pd.DataFrame, share: float, seed: int) -> list[str]:
    """A seeded draw of `share` of the rows' users (at least one when share > 0 and there are two)."""
    users = sorted(rows["user_id"].unique())
    count = min(len(users) - 1, max(1, round(share * len(users)))) if share > 0 else 0
    chosen = np.random.default_rng(seed).permutation(len(users))[:count]
    return sorted(users[i] for i in chosen)


def history_before(data: SequenceData, user: int, item: int) -> np.ndarray:
    """The user's training items before `item` (its last occurrence); all of them if absent.

    build-data's target is the last training item, so this is that item's history."""
    sequence = data.sequence(user)
    training = sequence[: max(len(sequence) - 2, 0)]  # valid and test targets stay unseen
    where = np.flatnonzero(training == item)
    return training[: where[-1]] if len(where) else training


def row_histories(hllm: Run, rows: pd.DataFrame) -> list[np.ndarray]:
    """Each row's history: the user's items before the row's item, as the HLLM run's item indices."""
    data = hllm.data
    return [
        history_before(data, data.user_index(user), data.item_index(item))
        for user, item in zip(rows["user_id"], rows["item_id"], strict=True)
    ]


@dataclass
class Example:
    history: np.ndarray  # internal item ids, oldest first
    creative: Sequence
    contrast: Sequence  # the prompt + another user's title (the prompt alone: no contrast)
    recon: Sequence
    profile: list[int]
    item: int  # internal id of the row's item


def make_examples(
    rows: pd.DataFrame, data: SequenceData, layout: PromptLayout, *, angled: bool = False
) -> list[Example]:
    """One example per row; an unknown user or item id is a one-line error naming it. `angled`: the
    prompts carry the teacher's facts (`facts`) as their [ANGLE] line (a Creator with a fact selector).

    A row whose title the filter rejected has no creative target: its creative sequence is the
    prompt alone, every label IGNORE. Its contrast sequence holds `contrast_title` (written for
    another user) when the row is kept and that title differs from its own, else the prompt alone."""
    examples = []
    for row in rows.itertuples(index=False):
        user, item = data.user_index(row.user_id), data.item_index(row.item_id)
        interests = list(row.interests) if row.interests is not None else []
        angle = angle_text(list(row.facts)) if angled else None
        prompt = layout.prompt(row.original_title, row.selling_points, angle=angle)
        creative = (
            layout.creative(row.original_title, row.selling_points, row.personalised_title, angle=angle)
            if row.kept
            else prompt
        )
        other = getattr(row, "contrast_title", "") or ""
        contrast = (
            layout.creative(row.original_title, row.selling_points, other, angle=angle)
            if row.kept and other and other != row.personalised_title
            else prompt
        )
        examples.append(
            Example(
                history_before(data, user, item),
                creative,
                contrast,
                layout.recon(interests),
                layout.profile(interests),
                item,
            )
        )
    return examples


class CreatorBatches:
    """Seeded, epoch-shuffled batches of examples; batch `index` of an epoch is always the same.

    Each process (rank) reads its own share of an epoch's order, every `world_size`-th example;
    the order wraps round to a multiple of `world_size` so every rank runs as many batches (as
    torch's DistributedSampler does: a few examples come twice when the count does not divide).

    cls negatives of a row: the other rows' items plus `catalogue_negatives` random items; a
    negative equal to the row's own item or in its history does not count.
    """

    def __init__(
        self,
        examples: list[Example],
        *,
        batch_size: int,
        max_history: int,
        num_items: int,
        pad_id: int,
        catalogue_negatives: int = 8,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.examples, self.batch_size, self.max_history = examples, batch_size, max_history
        self.num_items, self.pad_id, self.catalogue_negatives = num_items, pad_id, catalogue_negatives
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.order = self._share(np.arange(len(examples)))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.shuffle:
            self.order = self._share(
                np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
            )

    def _share(self, order: np.ndarray) -> np.ndarray:
        """This rank's examples of the epoch's `order` (all of them on one process)."""
        wrapped = np.resize(order, math.ceil(len(order) / self.world_size) * self.world_size)
        return wrapped[self.rank :: self.world_size]

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)

    def __getitem__(self, index: int) -> CreatorBatch:
        if not 0 <= index < len(self):
            raise IndexError(index)
        chosen = [
            self.examples[i] for i in self.order[index * self.batch_size : (index + 1) * self.batch_size]
        ]
        rng = np.random.default_rng([self.seed, self.epoch, index * self.world_size + self.rank])
        items = torch.tensor([example.item for example in chosen])
        others = items.unsqueeze(0).expand(len(chosen), -1)[~torch.eye(len(chosen), dtype=torch.bool)]
        drawn = torch.from_numpy(rng.integers(1, self.num_items, (len(chosen), self.catalogue_negatives)))
        negatives = torch.cat([others.reshape(len(chosen), -1), drawn], dim=1)  # (B, B-1+K)
        seen = [set(example.history.tolist()) | {example.item} for example in chosen]
        valid = torch.tensor(
            [[int(n) not in seen[r] for n in row] for r, row in enumerate(negatives.tolist())]
        )
        return CreatorBatch(
            history=pad_histories([example.history for example in chosen], self.max_history),
            creative=pad([example.creative for example in chosen], self.pad_id),
            contrast=pad([example.contrast for example in chosen], self.pad_id),
            recon=pad([example.recon for example in chosen], self.pad_id),
            profile=pad([Sequence(e.profile, [0] * len(e.profile)) for e in chosen], self.pad_id),
            items=items,
            negatives=negatives,
            valid=valid.reshape(negatives.shape).bool(),
        )
