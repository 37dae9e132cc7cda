"""`hllm creator evaluate`: Creator titles for held-out users, judged three ways, with the ablations.

Variants: `full` (the user's own embedding), `random_user` (another held-out user's embedding)
and `no_user` (no [USER] position). Judges:
- the hallucination filter (share of titles it rejects);
- HLLM as judge: the trained HLLM encodes a title as the item's text with that title and scores it
  against the user's HLLM embedding. `wins_over_original`: share of rows whose title outscores the
  original for its own user; `personalisation_lift`: mean of (own user's gain over the original)
  minus (another held-out user's gain), so a title that is merely better for everyone lifts nothing;
- optionally GSB from the judge LLM of the Creator-data issue (both orders).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.feature_extraction.text import TfidfVectorizer
from torch import Tensor

from hllm.creator.data.grounded import PhraseEncoder
from hllm.creator.data.judge import judge_titles
from hllm.creator.infer.generation import ItemFacts, embed_histories, generate_titles
from hllm.creator.model.dataset import row_histories
from hllm.creator.model.layout import angle_text
from hllm.creator.model.model import pad_histories
from hllm.creator.model.training import CreatorRun
from hllm.creator_config import LLMConfig
from hllm.data.dataset import TITLE_FIELDS
from hllm.data.formats import locate, read_source
from hllm.data.text import build_item_text, pack_items, tokenize_items
from hllm.errors import UserError
from hllm.evaluate import item_table
from hllm.files import atomic_write, hash_json, write_json
from hllm.models.backbone import load_backbone
from hllm.runs import Run, load_run

VARIANTS = ("full", "random_user", "no_user")


def other_rows(count: int, seed: int) -> np.ndarray:
    """A random cyclic shift of 0..count-1: every row gets another row, never itself."""
    if count < 2:
        raise UserError("evaluation needs at least two held-out rows (raise creator.train.holdout)")
    shift = int(np.random.default_rng(seed).integers(1, count))
    return (np.arange(count) + shift) % count


class TitleScorer:
    """The HLLM as a judge: embeds an item's text with a given title, scores it for a user."""

    def __init__(self, hllm: Run, item_table: Tensor) -> None:
        self.hllm, self.table = hllm, item_table
        data_config = hllm.config.data
        _, items = read_source(locate(data_config), data_config)
        self.items = items.drop_duplicates("item", keep="last").set_index("item")
        self.title_field = next(name for name in TITLE_FIELDS if name in self.items.columns)
        self.fields = hllm.data.stats.get("text_fields") or [c for c in self.items.columns]
        self.tokenizer = load_backbone(hllm.config.model.item.backbone, pretrained=False).tokenizer

    @torch.no_grad()
    def users(self, histories: list[np.ndarray]) -> Tensor:
        """The HLLM's user embeddings (B, D) (its prediction of the next item)."""
        padded = pad_histories(histories, self.hllm.config.data.max_history).to(self.table.device)
        return self.hllm.model.encode_users(padded, self.table)

    @torch.no_grad()
    def titles(self, item_ids: list[str], titles: list[str]) -> Tensor:
        """Embeddings (B, D) of each item's text with its title replaced."""
        config = self.hllm.config.data
        table = self.items.reindex(item_ids).reset_index(drop=True)
        table[self.title_field] = titles
        texts = build_item_text(table, self.fields, config.prompt, config.field_separator).tolist()
        item_tokens = tokenize_items(texts, self.tokenizer, config.max_text_tokens)
        model = self.hllm.model
        packed = pack_items(item_tokens, np.arange(len(texts)), appended_tokens=model.appended_tokens).to(
            self.table.device
        )
        return model.encode_items(torch.arange(len(texts), device=self.table.device), packed)


@dataclass
class TextJudge:
    """A judge the Creator never trained against: a user is the mean embedding of their last
    history titles, a title scores its embedding's dot product with that."""

    name: str
    embed: Callable[[list[str]], Tensor]  # texts -> (B, D) normalised
    item_titles: np.ndarray  # internal item id -> display title
    history: int = 10

    def users(self, histories: list[np.ndarray]) -> Tensor:
        vectors = [
            self.embed([str(self.item_titles[i]) for i in h[-self.history :]]).mean(0) for h in histories
        ]
        return F.normalize(torch.stack(vectors), dim=-1)

    def titles(self, titles: list[str]) -> Tensor:
        return self.embed(titles)


def second_judge(spec: str, hllm: Run, catalogue: ItemFacts) -> TextJudge | None:
    """`creator.eval.judge_encoder`: tfidf (word overlap), an encoder spec (mean-pooled), other (the
    shipped encoder the HLLM run does not read) or none."""
    titles = hllm.data.item_titles
    if spec == "none":
        return None
    if spec == "tfidf":
        corpus = catalogue.items["title"] + " " + catalogue.items["selling_points"]
        vectoriser = TfidfVectorizer(max_features=4096, sublinear_tf=True).fit(corpus)
        return TextJudge(
            "tfidf", lambda texts: torch.from_numpy(vectoriser.transform(texts).toarray()).float(), titles
        )
    if spec == "other":
        spec = "smollm2-135m" if hllm.config.model.item.backbone == "minilm" else "minilm"
    encoder = PhraseEncoder(load_backbone(spec), batch_size=64)
    return TextJudge(spec, lambda texts: torch.from_numpy(encoder.encode(texts)), titles)


def teacher_lift(
    hllm: Run, rows: pd.DataFrame, judges: list[str], *, fact_chars: int, resamples: int = 1000, seed: int = 0
) -> dict:
    """The training titles' own figures (the kept rows of `hllm creator build-data`), judged as the
    Creator's are: by the HLLM and by each of `judges` (`second_judge` specs). A Creator cannot
    personalise more than the titles it learns from; this says how much they do, with no model."""
    rows = rows[rows["kept"]].reset_index(drop=True)
    histories = row_histories(hllm, rows)
    scorer, step = _hllm_scorer(hllm), hllm.config.eval.item_batch_size
    own = _user_embeddings(scorer, histories, step)

    def embedded(column: str) -> Tensor:
        """(R, D) HLLM embeddings of every row's item with the title of `column`, `step` at a time."""
        items, titles = list(rows["item_id"]), list(rows[column])
        return torch.cat(
            [scorer.titles(items[i : i + step], titles[i : i + step]) for i in range(0, len(rows), step)]
        )

    others = torch.as_tensor(other_rows(len(rows), seed + 1))
    changed = rows["personalised_title"] != rows["original_title"]
    result: dict = {"rows": len(rows), "changed": float(changed.mean())}
    options = {"resamples": resamples, "seed": seed}
    titles, originals = embedded("personalised_title"), embedded("original_title")
    result["hllm"] = judged(own, own[others], titles, originals, **options)
    catalogue = ItemFacts.read(hllm.config.data, fact_chars)
    for spec in judges:
        if (judge := second_judge(spec, hllm, catalogue)) is None:
            continue
        users = judge.users(histories)
        titles, originals = (judge.titles(list(rows[c])) for c in ("personalised_title", "original_title"))
        result[judge.name] = judged(users, users[others], titles, originals, **options)
    return result


def hllm_user_embeddings(hllm: Run, rows: pd.DataFrame) -> np.ndarray:
    """(R, D) the HLLM run's embedding of each row's user (`user_id`) before the row's `item_id`."""
    step = hllm.config.eval.item_batch_size
    return _user_embeddings(_hllm_scorer(hllm), row_histories(hllm, rows), step).float().numpy()


def _user_embeddings(scorer: TitleScorer, histories: list[np.ndarray], step: int) -> Tensor:
    return torch.cat([scorer.users(histories[i : i + step]) for i in range(0, len(histories), step)])


def _scorer(run: CreatorRun) -> TitleScorer:
    """The HLLM the Creator was built on; reloaded when the Creator trained it further."""
    if not run.config.creator.model.train_hllm:
        return TitleScorer(run.hllm, run.model.item_table)
    return _hllm_scorer(load_run(run.config.creator.model.hllm_run))


def _hllm_scorer(hllm: Run) -> TitleScorer:
    table = item_table(
        hllm.model, hllm.data.num_items, hllm.item_tokens, batch_size=hllm.config.eval.item_batch_size
    )
    return TitleScorer(hllm, table)


def bootstrap_interval(values: np.ndarray, *, resamples: int, seed: int) -> list[float]:
    """95% percentile bootstrap interval [low, high] of the mean of `values`, resampling rows."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(1)
    return [round(float(q), 6) for q in np.percentile(means, [2.5, 97.5])]


def judged(
    own: Tensor, other: Tensor, titles: Tensor, originals: Tensor, *, resamples: int = 1000, seed: int = 0
) -> dict:
    """One judge's figures from (B, D) user, other user, title and original embeddings."""
    gain_own = ((own * titles).sum(-1) - (own * originals).sum(-1)).float()  # (B,)
    gain_other = ((other * titles).sum(-1) - (other * originals).sum(-1)).float()
    lift = (gain_own - gain_other).numpy()
    return {
        "wins_over_original": float((gain_own > 0).float().mean()),
        "mean_gain": float(gain_own.mean()),
        "personalisation_lift": float(lift.mean()),
        "personalisation_lift_ci": bootstrap_interval(lift, resamples=resamples, seed=seed),
    }


def variant_metrics(
    own: Tensor,
    other: Tensor,
    titles: Tensor,
    originals: Tensor,
    rejected: list[bool],
    identical: list[bool],
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """The HLLM judge's figures for one variant, with the filter's hallucination rate."""
    return judged(own, other, titles, originals, resamples=resamples, seed=seed) | {
        "hallucination_rate": float(np.mean(rejected)),
        "identical_to_original": float(np.mean(identical)),
    }


def judge_variants(
    judge: TextJudge,
    histories: list[np.ndarray],
    generated: pd.DataFrame,
    others: Tensor,
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, dict]:
    """A text judge's figures for every variant's titles in `generated` (evaluate's table), each row's
    user against the row `others` names."""
    own = judge.users(histories)
    originals = judge.titles(list(generated["original_title"]))
    return {
        variant: judged(
            own,
            own[others],
            judge.titles(list(generated[variant])),
            originals,
            resamples=resamples,
            seed=seed,
        )
        for variant in VARIANTS
    }


def evaluate_creator(
    run: CreatorRun, out: str | Path, *, judge: LLMConfig | None = None, limit: int = 0, seed: int = 0
) -> dict:
    """Generate every variant for the held-out rows and judge them: OUT/generated.parquet, metrics.json."""
    out = Path(out)
    rows = run.rows[run.rows["user_id"].isin(run.held_out)].reset_index(drop=True)
    rows = rows.head(limit) if limit else rows
    settings = run.config.creator.infer
    max_history = run.hllm.config.data.max_history
    histories = row_histories(run.hllm, rows)
    catalogue = ItemFacts.read(run.hllm.config.data, run.config.creator.data.fact_chars)
    facts = [catalogue.facts(item) for item in rows["item_id"]]
    candidates = [catalogue.candidates(item) for item in rows["item_id"]]
    own_users = embed_histories(run.model, histories, max_history, batch_size=settings.batch_size)
    random_user = other_rows(len(rows), seed)
    users = {"full": own_users, "random_user": own_users[random_user], "no_user": None}
    generated = rows[
        ["user_id", "item_id", "original_title", "selling_points", "history", "interests"]
    ].copy()
    for variant in VARIANTS:
        with torch.no_grad():
            projected = None if users[variant] is None else run.model.projector(users[variant])
        angles = run.model.angles(users[variant], candidates)
        titles = generate_titles(
            run.model,
            facts,
            projected,
            batch_size=settings.generate_batch,
            max_new_tokens=settings.max_new_tokens,
            temperature=0.0,
            angles=angles,
        )
        generated[variant] = [title[0] for title in titles]
        if angles is not None:
            generated[f"{variant}_angle"] = angles
    generated["random_user_id"] = rows["user_id"].to_numpy()[random_user]
    atomic_write(out / "generated.parquet", lambda tmp: generated.to_parquet(tmp, index=False))

    scorer = _scorer(run)
    own = scorer.users(histories)
    others = torch.as_tensor(other_rows(len(rows), seed + 1))
    other = own[others]
    originals = scorer.titles(list(generated["item_id"]), list(generated["original_title"]))
    second = second_judge(run.config.creator.eval.judge_encoder, run.hllm, catalogue)
    result: dict = {"rows": len(rows), "users": int(rows["user_id"].nunique())}
    result["second_judge"] = second.name if second else "none"
    resamples = run.config.creator.eval.bootstrap
    second_scores = (
        judge_variants(second, histories, generated, others, resamples=resamples, seed=seed) if second else {}
    )
    if run.model.selector is not None and "facts" in rows.columns:
        teacher = rows["facts"].map(lambda chosen: angle_text(list(chosen)))
        result["selector_agrees_with_teacher"] = {
            variant: float((generated[f"{variant}_angle"] == teacher).mean()) for variant in VARIANTS
        }
    for variant in VARIANTS:
        verdicts = [
            catalogue.check(item, title, allowed_text=" ".join(interests))
            for item, title, interests in zip(
                generated["item_id"], generated[variant], generated["interests"], strict=True
            )
        ]
        identical = [
            t.strip() == o.strip()
            for t, o in zip(generated[variant], generated["original_title"], strict=True)
        ]
        embedded = scorer.titles(list(generated["item_id"]), list(generated[variant]))
        rejected = [v.invents for v in verdicts]  # an unchanged title counts in identical_to_original
        result[variant] = variant_metrics(
            own, other, embedded, originals, rejected, identical, resamples=resamples, seed=seed
        )
        result[variant]["differs_from_random_user"] = float(
            (generated[variant] != generated["random_user"]).mean()
        )
        if second is not None:
            result[variant] |= {f"second_judge_{key}": value for key, value in second_scores[variant].items()}
        if judge is not None:
            # a folder per set of titles: a judge folder resumes its answers by (user, item)
            folder = out / f"judge-{variant}-{hash_json(list(generated[variant]))[:8]}"
            report = judge_titles(out / "generated.parquet", folder, judge, candidate=variant)
            result[variant] |= {key: report[key] for key in ("good", "same", "bad", "adv")}
    write_json(out / "metrics.json", result)
    return result
