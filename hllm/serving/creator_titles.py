"""The titles of one `hllm creator infer` folder, read once and served per (user, item).

In serving/ (the core never imports creator/): `hllm creator lookup` and `hllm serve` share it, and
the server reads the titles without loading torch or the Creator model.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from hllm.errors import UserError

# What serving a title needs of an infer folder: user -> cluster, the titles, item -> original title.
CREATOR_FILES = ("assignments.parquet", "titles.parquet", "items.parquet")


class CreatorTitles:
    """Users' clusters, the titles that passed the hallucination filter and the original titles."""

    def __init__(
        self,
        assignments: pd.DataFrame,
        titles: pd.DataFrame,
        items: pd.DataFrame,
        *,
        where: str | None = None,
    ) -> None:
        self.where = where  # named by lookup errors
        self.clusters = dict(zip(assignments["user_id"].astype(str), assignments["cluster"].astype(int)))
        self.originals = dict(zip(items["item_id"].astype(str), items["original_title"].astype(str)))
        kept = titles[titles["kept"].astype(bool)]
        self.kept: dict[tuple[int, str], str] = {}
        for cluster, item, title in zip(kept["cluster"], kept["item_id"], kept["title"]):
            self.kept.setdefault((int(cluster), str(item)), str(title))

    @classmethod
    def read(cls, folder: str | Path) -> CreatorTitles:
        """The titles of an infer folder (or an artifact's `creator/`); a missing file is a UserError."""
        where = str(folder)
        if missing := [name for name in CREATOR_FILES if not (Path(folder) / name).is_file()]:
            raise UserError(f"no {missing[0]}: run `hllm creator infer` first", where=where)
        try:
            return cls(*(pd.read_parquet(Path(folder) / name) for name in CREATOR_FILES), where=where)
        except (OSError, ValueError, KeyError) as err:
            raise UserError(
                f"damaged Creator titles ({err}); run `hllm creator infer` again", where
            ) from None

    def title(self, user_id: str, item_id: str) -> tuple[str, str]:
        """(title, where it came from): the user's cluster title when it exists and passed the
        filter, else the original title."""
        if user_id not in self.clusters:
            raise UserError(f"unknown user id {user_id!r}", where=self.where)
        if item_id not in self.originals:
            raise UserError(f"item {item_id!r} was not part of this inference", where=self.where)
        cluster = self.clusters[user_id]
        if (cluster, item_id) in self.kept:
            return self.kept[cluster, item_id], f"cluster {cluster}"
        return self.originals[item_id], "original"
