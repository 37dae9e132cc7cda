"""Resumable LLM stages: rows in, one Parquet part per chunk out, each part written atomically.

A rerun reads the parts already written and skips their keys, so a crash loses at most the chunk
in flight. An answer the parser rejects is asked again (sampling, up to `attempts` tries) and then
recorded as a failure with its reason: it is never written as a value. When the model cannot be
reached at all the stage stops with a one-line error naming itself and the row.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hllm.creator.data.llm import RETRY_TEMPERATURE, ChatModel, Conversation, LLMError
from hllm.errors import UserError
from hllm.files import atomic_write, write_json

Parse = Callable[[str], "Parsed"]


@dataclass(frozen=True)
class Parsed:
    """A parser's verdict on one answer: the value, or why there is none."""

    value: object = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


class PartStore:
    """A folder of Parquet parts (`part-00000.parquet`, ...) that together hold one table."""

    def __init__(self, folder: Path, key: list[str]) -> None:
        self.folder = folder
        self.key = key

    def parts(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.parquet"))

    def read(self, columns: list[str] | None = None) -> pd.DataFrame:
        parts = self.parts()
        if not parts:
            return pd.DataFrame()
        return pd.concat([pd.read_parquet(part, columns=columns) for part in parts], ignore_index=True)

    def done(self) -> set[tuple]:
        """The keys already written (reading only the key columns)."""
        table = self.read(self.key)
        return set() if table.empty else set(table.itertuples(index=False, name=None))

    def append(self, frame: pd.DataFrame) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        parts = self.parts()
        number = int(parts[-1].stem.split("-")[1]) + 1 if parts else 0
        atomic_write(
            self.folder / f"part-{number:05d}.parquet", lambda tmp: frame.to_parquet(tmp, index=False)
        )


@dataclass
class Stage:
    """One LLM step: how to ask about a row, and how to read the answer."""

    name: str
    prompt_version: str
    render: Callable[[pd.Series], Conversation]
    parse: Parse


def run_stage(
    stage: Stage, rows: pd.DataFrame, store: PartStore, chat: ChatModel, *, chunk_rows: int, attempts: int
) -> pd.DataFrame:
    """Ask `chat` about every row of `rows` not yet in `store`; return the whole stage table.

    Output columns: the key, `value` (parsed; None on failure), `answer` (the raw last answer),
    `status` ("ok" / "failed"), `error`, `attempts`, `backend`, `model`, `prompt_version`.
    """
    done = store.done()
    todo = rows[[key not in done for key in rows[store.key].itertuples(index=False, name=None)]]
    with _progress(stage.name, len(rows), len(rows) - len(todo)) as advance:
        for start in range(0, len(todo), chunk_rows):
            chunk = todo.iloc[start : start + chunk_rows]
            store.append(_ask(stage, chunk, store.key, chat, attempts))
            advance(len(chunk))
    return store.read()


def _ask(stage: Stage, chunk: pd.DataFrame, key: list[str], chat: ChatModel, attempts: int) -> pd.DataFrame:
    conversations = [stage.render(row) for _, row in chunk.iterrows()]
    results: list[Parsed | None] = [None] * len(chunk)
    answers = [""] * len(chunk)
    tries = [0] * len(chunk)
    for attempt in range(attempts):
        pending = [i for i, result in enumerate(results) if result is None or not result.ok]
        if not pending:
            break
        try:
            replies = chat.chat(
                [conversations[i] for i in pending], temperature=RETRY_TEMPERATURE if attempt else None
            )
        except LLMError as error:
            failed = pending[error.index or 0]
            row = dict(zip(key, chunk.iloc[failed][key].tolist(), strict=True))
            raise UserError(f"{stage.name} stage, row {row}: {error}") from None
        for i, reply in zip(pending, replies, strict=True):
            answers[i], tries[i], results[i] = reply, attempt + 1, stage.parse(reply)
    return pd.DataFrame(
        {
            **{name: chunk[name].to_numpy() for name in key},
            "value": [r.value if r.ok else None for r in results],
            "answer": answers,
            "status": ["ok" if r.ok else "failed" for r in results],
            "error": [r.error for r in results],
            "attempts": tries,
            "backend": chat.backend,
            "model": chat.model,
            "prompt_version": stage.prompt_version,
        }
    )


def stage_values(table: pd.DataFrame, key: list[str], name: str) -> pd.DataFrame:
    """The key and the parsed value (renamed `name`) of every row a stage answered well."""
    if table.empty:
        return pd.DataFrame(columns=[*key, name])
    ok = table[table["status"] == "ok"]
    return ok[[*key, "value"]].rename(columns={"value": name}).drop_duplicates(key, keep="last")


@contextmanager
def _progress(name: str, total: int, done: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on the terminal; yields `advance(rows)`."""
    columns = (TextColumn(f"{name:>8}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns) as progress:
        task = progress.add_task(name, total=total, completed=done)
        yield lambda rows: progress.advance(task, rows)


def claim_folder(out: Path, identity: dict) -> None:
    """Refuse to resume a folder made with other settings (dataset, model, prompt versions, ...)."""
    path = out / "run.json"
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        if changed := [key for key in identity if before.get(key) != identity[key]]:
            raise UserError(
                f"this folder was built with other settings ({', '.join(changed)}): use a new --out",
                where=str(out),
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, identity)
