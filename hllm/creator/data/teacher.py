"""The chain-of-thought teacher pipeline that makes Creator training rows from a real dataset.

For each sampled user: the target is the user's last *training* item (HLLM's validation and test
items stay unseen) and the history is what came before it. Three stages, joined by ids:

1. profile:  history titles and categories -> a short list of interests (one call per user);
2. rewrite:  interests + the target's original title and selling points -> a personalised title;
3. filter:   deterministic checks against the item's own text (`hallucination.check_title`), then,
             with `creator.data.verify`, an LLM verifier; every rejection keeps its reasons.

The LLM stages are resumable (`stages.run_stage`); the filter is cheap and recomputed each run.
Writes `DIR/rows.parquet` (every row that got a title, with `kept` and `reasons`; training reads the
kept ones) and `DIR/report.json`.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from hllm.config import DataConfig
from hllm.creator.data.grounded import UNCHANGED, ground
from hllm.creator.data.grounded import VERSION as GROUNDED_VERSION
from hllm.creator.data.grounded import VERSION_HLLM as GROUNDED_HLLM_VERSION
from hllm.creator.data.hallucination import REASONS, check_title, collect_brands
from hllm.creator.data.llm import ChatModel, open_chat_model
from hllm.creator.data.prompts import POLISH, PROFILE, REWRITE, VERIFY
from hllm.creator.data.stages import Parsed, PartStore, Stage, claim_folder, run_stage, stage_values
from hllm.creator_config import CreatorDataConfig, LLMConfig
from hllm.data.dataset import TITLE_FIELDS, SequenceData, prepare_dataset
from hllm.data.formats import locate, read_source
from hllm.errors import UserError
from hllm.files import atomic_write, write_json

CATEGORY_FIELDS = ("categories", "category", "class", "genre", "genres")
BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s*")
TITLE_PREFIX = re.compile(r"^\s*(?:new title|personali[sz]ed title|title)\s*:\s*", re.IGNORECASE)
CHATTER = re.compile(r"^(?:sure|here is|here's|certainly|i |i'm|as an|okay|ok,)", re.IGNORECASE)
WORD = re.compile(r"[A-Za-z][A-Za-z0-9'&./+-]*|\d[\w./-]*")  # a word, not a stray "##q" or "(x"
MAX_INTERESTS, MAX_INTEREST_WORDS, MAX_TITLE_WORDS = 5, 8, 40


def read_catalogue(config: DataConfig) -> pd.DataFrame:
    """Item fields by raw id: `title`, `selling_points` (every other field, as text), `category`."""
    source = locate(config)
    _, items = read_source(source, config)
    title_field = next((name for name in TITLE_FIELDS if items is not None and name in items.columns), None)
    if title_field is None:
        raise UserError(
            f"the item table has no title field ({', '.join(TITLE_FIELDS)}): Creator rewrites titles",
            where=str(source.items or source.interactions),
        )
    items = items.drop_duplicates("item", keep="last").set_index("item")
    text = items.astype("string").fillna("").apply(lambda column: column.str.strip())
    # shortest fields first, so a cut to `fact_chars` loses description, not brand or categories
    others = sorted(
        (name for name in items.columns if name != title_field), key=lambda n: text[n].str.len().mean()
    )
    labelled = [(f"{name}: " + text[name]).where(text[name] != "") for name in others]
    points = pd.concat(labelled, axis=1).apply(lambda row: "; ".join(row.dropna()), axis=1) if others else ""
    category_field = next((name for name in CATEGORY_FIELDS if name in items.columns), None)
    return pd.DataFrame(
        {
            "title": text[title_field],
            "selling_points": points,
            "category": text[category_field].str.split(",").str[-1].str.strip() if category_field else "",
            "categories": text[category_field] if category_field else "",
            "brand": text["brand"] if "brand" in items.columns else "",
            "description": text["description"] if "description" in items.columns else "",
        },
        index=items.index,
    )


def select_rows(data: SequenceData, catalogue: pd.DataFrame, settings: CreatorDataConfig) -> pd.DataFrame:
    """One row per sampled user: history item ids, target item id, and the texts the prompts need.

    Users are taken in a seeded random order, so a larger `limit` extends a smaller one's sample.
    """
    order = np.random.default_rng(settings.seed).permutation(data.num_users)
    _, targets = data.history_and_target("train")
    rows = []
    for user in order:
        history = data.history(int(user), "train")
        ids = [str(data.item_ids[i]) for i in history[-settings.history_items :]]
        target_id = str(data.item_ids[targets[user]])
        has_title = target_id in catalogue.index and catalogue.at[target_id, "title"] != ""
        if not ids or not has_title:
            continue
        rows.append({"user_id": str(data.user_ids[user]), "history_item_ids": ids, "item_id": target_id})
        if len(rows) == settings.limit:
            break
    if not rows:
        raise UserError("no user has both a history and a titled training item", where=data.name)
    frame = pd.DataFrame(rows).drop_duplicates(["user_id", "item_id"])
    facts = catalogue.reindex(frame["item_id"])
    frame["original_title"] = facts["title"].to_numpy()
    frame["selling_points"] = facts["selling_points"].str.slice(0, settings.fact_chars).to_numpy()
    frame["source_text"] = (facts["title"] + "; " + facts["selling_points"]).to_numpy()
    frame["history"] = [_history_lines(ids, catalogue) for ids in frame["history_item_ids"]]
    return frame.reset_index(drop=True)


def _history_lines(item_ids: list[str], catalogue: pd.DataFrame) -> str:
    lines = []
    for item_id in item_ids:
        if item_id not in catalogue.index:
            continue
        title, category = catalogue.at[item_id, "title"][:80], catalogue.at[item_id, "category"]
        lines.append(f"- {title} (category: {category})" if category else f"- {title}")
    return "\n".join(lines)


def parse_interests(answer: str) -> Parsed:
    """Bulleted lines (or one short line) -> up to 5 short interests."""
    lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
    bulleted = [BULLET.sub("", line) for line in lines if BULLET.match(line)]
    candidates = bulleted or (lines[:1] if len(lines) == 1 else [])
    interests = []
    for line in candidates:
        line = line.strip(" .;,\"'")
        words = line.split()
        real = [word for word in words if WORD.fullmatch(word)]
        if (
            1 <= len(words) <= MAX_INTEREST_WORDS
            and len(real) >= 0.8 * len(words)
            and re.search("[a-zA-Z]{3}", line)
        ):
            interests.append(line)
    interests = list(dict.fromkeys(interests))[:MAX_INTERESTS]
    if not interests:
        return Parsed(error="no interests: expected short lines starting with '- '")
    return Parsed(interests)


def parse_title(answer: str) -> Parsed:
    """The first non-empty line, without quotes or a `Title:` prefix; chatter is malformed."""
    line = next((line.strip() for line in answer.splitlines() if line.strip()), "")
    title = TITLE_PREFIX.sub("", BULLET.sub("", line)).strip().strip("\"'*` ").strip()
    if not title:
        return Parsed(error="empty answer")
    if CHATTER.match(title):
        return Parsed(error="not a title: the answer talks instead")
    if len(title.split()) > MAX_TITLE_WORDS:
        return Parsed(error=f"not a title: more than {MAX_TITLE_WORDS} words")
    return Parsed(title)


def parse_yes_no(answer: str) -> Parsed:
    word = re.match(r"\W*(yes|no)\b", answer.strip().lower())
    return Parsed(word[1]) if word else Parsed(error="expected yes or no")


def _bullets(interests: list[str]) -> str:
    return "\n".join(f"- {interest}" for interest in interests)


PROFILE_STAGE = Stage(
    "profile", PROFILE.version, lambda row: PROFILE.render(history=row["history"]), parse_interests
)
REWRITE_STAGE = Stage(
    "rewrite",
    REWRITE.version,
    lambda row: REWRITE.render(
        interests=_bullets(row["interests"]),
        title=row["original_title"],
        selling_points=row["selling_points"],
    ),
    parse_title,
)
POLISH_STAGE = Stage(
    "polish", POLISH.version, lambda row: POLISH.render(title=row["grounded_title"]), parse_title
)
VERIFY_STAGE = Stage(
    "verify",
    VERIFY.version,
    lambda row: VERIFY.render(
        title=row["original_title"], selling_points=row["selling_points"], new_title=row["personalised_title"]
    ),
    parse_yes_no,
)


def build_data(
    data_config: DataConfig, settings: CreatorDataConfig, teacher: LLMConfig, out_dir: str | Path
) -> dict:
    """Title the sampled rows into `out_dir` (resuming what is there); return the report.

    `teacher.backend` grounded titles them from the item's own text (`grounded.py`), optionally
    reworded by the `creator.data.polish` LLM; local and openai run the profile and rewrite stages."""
    started = time.perf_counter()
    out = Path(out_dir)
    catalogue = read_catalogue(data_config)
    rows = select_rows(prepare_dataset(data_config), catalogue, settings)
    grounded = teacher.backend == "grounded"
    if grounded:
        polish = settings.polish != "none"
        version = GROUNDED_HLLM_VERSION if settings.interest_run else GROUNDED_VERSION
        prompts = {"profile": version, "rewrite": version}
        prompts |= {"polish": POLISH.version if polish else None, "verify": VERIFY.version}
        llm = replace(teacher, backend=settings.polish) if polish else None
    else:
        prompts = {"profile": PROFILE.version, "rewrite": REWRITE.version, "verify": VERIFY.version}
        llm = teacher
    if settings.verify and llm is None:
        raise UserError(
            "the verifier is an LLM: with the grounded teacher, set --polish", "creator.data.verify"
        )
    identity = {
        "dataset": str(data_config.path),
        "backend": teacher.backend,
        "model": settings.encoder if grounded else teacher.model,
        "prompts": prompts,
        "history_items": settings.history_items,
        "fact_chars": settings.fact_chars,
        "seed": settings.seed,
    }
    if grounded and settings.interest_run:
        identity["interest_run"] = str(Path(settings.interest_run).resolve())
    claim_folder(out, identity)
    chat = open_chat_model(llm) if llm else None
    steps = {"chunk_rows": settings.chunk_rows, "attempts": teacher.attempts}
    if grounded:
        titled, failed = _grounded(rows, catalogue, settings, chat, out, steps)
    else:
        titled, failed = _llm_titles(rows, chat, out, steps)
    titled = _filter(titled, catalogue, settings, chat, out, steps)

    table = titled.drop(columns=["source_text"]).assign(
        backend=teacher.backend,
        model=identity["model"],
        **{f"{stage}_prompt": version for stage, version in prompts.items() if stage != "verify"},
        verify_prompt=VERIFY.version if settings.verify else None,
    )
    atomic_write(out / "rows.parquet", lambda tmp: table.to_parquet(tmp, index=False))
    report = {
        **identity,
        "rows": len(rows),
        "kept": int(table["kept"].sum()),
        "rejected": _rejections(table),
        "failed": failed,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(out / "report.json", report)
    return report


def _llm_titles(rows: pd.DataFrame, chat: ChatModel, out: Path, steps: dict) -> tuple[pd.DataFrame, dict]:
    """The profile and rewrite stages: rows with `interests` and `personalised_title`, and failures."""
    users = rows.drop_duplicates("user_id")
    profiles = run_stage(PROFILE_STAGE, users, PartStore(out / "profile", ["user_id"]), chat, **steps)
    with_interests = rows.merge(stage_values(profiles, ["user_id"], "interests"), on="user_id")
    rewrites = run_stage(
        REWRITE_STAGE, with_interests, PartStore(out / "rewrite", ["user_id", "item_id"]), chat, **steps
    )
    titled = with_interests.merge(stage_values(rewrites, ["user_id", "item_id"], "personalised_title"))
    return titled, {"profile": _failures(profiles, users), "rewrite": _failures(rewrites, with_interests)}


def _grounded(
    rows: pd.DataFrame,
    catalogue: pd.DataFrame,
    settings: CreatorDataConfig,
    chat: ChatModel | None,
    out: Path,
    steps: dict,
) -> tuple[pd.DataFrame, dict]:
    """Grounded titles (and interests) for every row whose history has a category or brand; with a
    polishing LLM, its rewording replaces each title (a malformed answer keeps the grounded one)."""
    hllm_users = None
    if settings.interest_run:
        from hllm.creator.evaluate import hllm_user_embeddings
        from hllm.runs import load_run

        hllm_users = hllm_user_embeddings(load_run(settings.interest_run), rows)
    titled = ground(rows, catalogue, settings, hllm_users)
    failed = {"grounded": {"no profile (no category or brand in the history)": len(rows) - len(titled)}}
    if chat is None:
        return titled.assign(personalised_title=titled["grounded_title"]), failed
    key = ["user_id", "item_id"]
    # An unpolished contrast title would differ from a polished one by its wording, for every user.
    titled = titled.drop(columns="contrast_title")
    polished = run_stage(POLISH_STAGE, titled, PartStore(out / "polish", key), chat, **steps)
    titled = titled.merge(stage_values(polished, key, "personalised_title"), on=key, how="left")
    titled["personalised_title"] = titled["personalised_title"].fillna(titled["grounded_title"])
    return titled, failed | {"polish": _failures(polished, titled)}


def _filter(
    titled: pd.DataFrame,
    catalogue: pd.DataFrame,
    settings: CreatorDataConfig,
    chat: ChatModel | None,
    out: Path,
    steps: dict,
) -> pd.DataFrame:
    brands = collect_brands(catalogue["brand"])
    verdicts = [
        check_title(
            row.personalised_title,
            original_title=row.original_title,
            source_text=row.source_text,
            known_brands=brands,
            allowed_text=" ".join(row.interests),
        )
        for row in titled.itertuples()
    ]
    # The grounded teacher keeps the original title on purpose when no fact interests the user more
    # than the title does; an LLM that hands the title back has failed to rewrite it.
    decided = titled["template"].eq(UNCHANGED) if "template" in titled else pd.Series(False, titled.index)
    titled["reasons"] = [
        [reason for reason in verdict.reasons if not (keep_title and reason.startswith("unchanged"))]
        for verdict, keep_title in zip(verdicts, decided, strict=True)
    ]
    if settings.verify and len(titled):
        passed = titled[[verdict.kept for verdict in verdicts]]
        checked = run_stage(
            VERIFY_STAGE, passed, PartStore(out / "verify", ["user_id", "item_id"]), chat, **steps
        )
        said = stage_values(checked, ["user_id", "item_id"], "verifier")
        titled = titled.merge(said, on=["user_id", "item_id"], how="left")
        invented = titled["verifier"] == "yes"
        titled.loc[invented, "reasons"] = titled.loc[invented, "reasons"].map(
            lambda r: [*r, "llm_verifier: yes"]
        )
    titled["kept"] = titled["reasons"].map(len) == 0
    return titled


def _rejections(table: pd.DataFrame) -> dict[str, int]:
    """Reason kind -> rejected titles with a reason of that kind (a title can have several)."""
    kinds = Counter(
        kind for reasons in table["reasons"] for kind in {reason.split(":")[0] for reason in reasons}
    )
    order = [*REASONS, "llm_verifier"]
    return {kind: kinds[kind] for kind in sorted(kinds, key=order.index)}


def _failures(stage: pd.DataFrame, asked: pd.DataFrame) -> dict[str, int]:
    """Error -> rows of this run's sample whose answer stayed malformed."""
    if stage.empty:
        return {}
    keys = set(stage.columns) & {"user_id", "item_id"}
    mine = stage.merge(asked[sorted(keys)].drop_duplicates(), on=sorted(keys))
    return dict(Counter(mine.loc[mine["status"] == "failed", "error"]))
