"""Good/Same/Bad: a judge LLM compares a candidate title with the original for one user's interests.

Each sample is asked twice, with the titles' positions swapped. The candidate is Good only when
both orders prefer it, Bad only when both prefer the original; a tie, a disagreement (position
bias) or an answer that stays malformed counts as Same. Adv = (Good - Bad) / total.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from hllm.creator.data.llm import open_chat_model
from hllm.creator.data.prompts import JUDGE
from hllm.creator.data.stages import Parsed, PartStore, Stage, claim_folder, run_stage, stage_values
from hllm.creator_config import LLMConfig
from hllm.errors import UserError
from hllm.files import atomic_write, write_json

KEY = ["user_id", "item_id"]
NEEDED = ("interests", "history", "selling_points")


LEADING = re.compile(r"\W*(?:title\s+)?(a|b|same)\b")
STATED = re.compile(r"\b(?:answer|choice|option|title)(?:\s+is)?\s*:?\s*\(?(a|b|same)\b")


def parse_choice(answer: str) -> Parsed:
    """`a`, `b` or `same`, leading the answer ("Title a", "(b)", "Same.") or stated in it ("The
    answer is b"); several different statements, or none, are malformed."""
    text = answer.strip().lower()
    if match := LEADING.match(text):
        return Parsed(match[1])
    stated = set(STATED.findall(text))
    return Parsed(stated.pop()) if len(stated) == 1 else Parsed(error="expected a, b or same")


def verdict(first: str | None, second: str | None) -> str:
    """good / same / bad for the candidate, from the answers with it as b (`first`) and as a (`second`)."""
    winners = {"a": "original", "b": "candidate"}.get(first), {"a": "candidate", "b": "original"}.get(second)
    if winners[0] is None or winners[0] != winners[1]:
        return "same"
    return "good" if winners[0] == "candidate" else "bad"


def _stage(name: str, first: str, second: str) -> Stage:
    def render(row: pd.Series):
        interests = "\n".join(f"- {interest}" for interest in row["interests"])
        return JUDGE.render(
            interests=interests,
            history=row["history"],
            selling_points=row["selling_points"],
            title_a=row[first],
            title_b=row[second],
        )

    return Stage(name, JUDGE.version, render, parse_choice)


def judge_titles(
    rows_path: str | Path,
    out_dir: str | Path,
    judge: LLMConfig,
    *,
    original: str = "original_title",
    candidate: str = "personalised_title",
    limit: int = 0,
    chunk_rows: int = 32,
) -> dict:
    """Judge `candidate` against `original` for every row (the first `limit`); resumable in `out_dir`."""
    rows = _read_rows(Path(rows_path), [original, candidate])
    rows = rows.head(limit) if limit else rows
    out = Path(out_dir)
    asked = rows[rows[original].str.strip() != rows[candidate].str.strip()]  # identical: Same, not asked
    identity = {"rows": str(rows_path), "original": original, "candidate": candidate}
    claim_folder(out, {**identity, "backend": judge.backend, "model": judge.model, "prompt": JUDGE.version})
    chat = open_chat_model(judge)
    steps = {"chunk_rows": chunk_rows, "attempts": judge.attempts}
    answers = []
    for name, first, second in (("judge-ab", original, candidate), ("judge-ba", candidate, original)):
        table = run_stage(_stage(name, first, second), asked, PartStore(out / name, KEY), chat, **steps)
        answers.append(stage_values(table, KEY, name))
    verdicts = (
        rows[[*KEY, original, candidate]]
        .merge(answers[0], on=KEY, how="left")
        .merge(answers[1], on=KEY, how="left")
    )
    verdicts["verdict"] = [
        verdict(a, b) for a, b in zip(verdicts["judge-ab"], verdicts["judge-ba"], strict=True)
    ]
    verdicts["backend"], verdicts["model"], verdicts["prompt_version"] = (
        chat.backend,
        chat.model,
        JUDGE.version,
    )
    atomic_write(out / "verdicts.parquet", lambda tmp: verdicts.to_parquet(tmp, index=False))
    counts = verdicts["verdict"].value_counts()
    good, same, bad = (int(counts.get(name, 0)) for name in ("good", "same", "bad"))
    both = verdicts[["judge-ab", "judge-ba"]]
    identical = (verdicts[original].str.strip() == verdicts[candidate].str.strip()).to_numpy()
    report = {
        "good": good,
        "same": same,
        "bad": bad,
        "total": len(verdicts),
        "adv": (good - bad) / len(verdicts) if len(verdicts) else 0.0,
        "position_bias": int(
            ((both["judge-ab"] == both["judge-ba"]) & both["judge-ab"].isin(["a", "b"])).sum()
        ),
        "malformed": int((both.isna().any(axis=1).to_numpy() & ~identical).sum()),
        "identical": int(identical.sum()),
        "original": original,
        "candidate": candidate,
        "backend": chat.backend,
        "model": chat.model,
        "prompt_version": JUDGE.version,
    }
    write_json(out / "report.json", report)
    return report


def _read_rows(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise UserError(
            "no such file (expected the rows.parquet of `hllm creator build-data`)", where=str(path)
        )
    rows = pd.read_parquet(path)
    if missing := [name for name in (*KEY, *NEEDED, *columns) if name not in rows.columns]:
        raise UserError(f"missing column(s) {', '.join(missing)}", where=str(path))
    if "kept" in rows.columns:
        rows = rows[rows["kept"]]
    return rows.reset_index(drop=True)
