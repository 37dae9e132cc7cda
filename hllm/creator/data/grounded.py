"""The grounded teacher: personalised titles assembled from the item's own text, with no LLM.

For one user and one target item:
1. candidates: the item's facts, cut from its own text: the brand, the category path's levels and
   short description phrases, only from the part of the selling points the Creative LLM is shown
   (`creator.data.fact_chars`);
2. interest: the user vector is the mean embedding of the history titles minus the mean user of
   the sample (what every user likes, such as the root category, does not win for everyone); a
   phrase scores its cosine with it;
3. title: the whole original title plus the facts that score above the original title itself,
   under one of `TEMPLATES`; with no such fact the original title stays, unchanged. Every word
   comes from the item's text, except `CONNECTORS`, which the hallucination filter allows, so it
   passes by construction.
The profile (interests) is the user's best-scoring category levels and brands of the history.

Why the whole title and the gate (v2): the target is the item the user chose next, so its title
already matches them better than it matches another user. v1 cut the title to its head before
adding facts, which dropped those matching words: over 2,995 amazon-scientific rows its titles
moved away from their own user under all three judges of `hllm creator evaluate` (BENCHMARKS.md).

Each distinct phrase is embedded once, in batches, by the frozen encoder the project ships
(`minilm`, mean-pooled). Dims: P phrases, U users, D encoder width.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from hllm.creator_config import CreatorDataConfig
from hllm.models.backbone import Backbone, load_backbone

VERSION = "grounded-v2"
VERSION_HLLM = "grounded-v3"  # the interest read from an HLLM user embedding (`mapped_interest`)
RIDGE = 1.0  # ridge penalty of `mapped_interest`, on unit-norm embeddings
TEMPLATES = {
    "one_fact": "{title} | {fact}",
    "two_facts": "{title}, {fact} | {fact2}",
    "audience": "For {fact}: {title}",
}
UNCHANGED = "original"  # the template of a row whose title stays the original
CONNECTORS = ("for",)  # the only word a template adds to the item's own words
MAX_FACT_WORDS, INTERESTS = 6, 3
EXTRA_WORDS = 12  # the filter's default `max_extra_words`; a title never grows by more
Records = dict[str, dict[str, str]]  # raw item id -> field -> text
COMMON_CATEGORY_SHARE = 0.3  # a category level on more items than this is no fact about one item
# Phrase boundaries; never a "." before a digit (".75-Inch") nor a "," or ":" between digits, so a
# phrase's number keeps what stood before it in the source, as the filter reads numbers in context.
_SPLIT = re.compile(r"[;!?()\[\]{}\"|]|\.(?!\d)|(?<!\d)[,:]|[,:](?!\d)|\s[-\u2013\u2014]\s")
_EDGE = frozenset("a an and or the of for with to in on at by from is are as it its this that".split())


@dataclass(frozen=True)
class Fact:
    text: str
    kind: str  # brand | category | description


def _clean(phrase: str) -> str:
    """Whitespace collapsed, edge stopwords and punctuation dropped (never a word added)."""
    words = phrase.replace("\u00a0", " ").split()
    while words and words[0].lower().strip(".,'") in _EDGE:
        words.pop(0)
    while words and words[-1].lower().strip(".,'") in _EDGE:
        words.pop()
    return re.sub(r"^[\s,:'&/-]+|^\.(?!\d)|[\s.,:'&/-]+$", "", " ".join(words))


def _usable(phrase: str) -> bool:
    return 1 <= len(phrase.split()) <= MAX_FACT_WORDS and re.search(r"[A-Za-z]{3}", phrase) is not None


def item_facts(
    visible_points: str, brand: str, categories: str, description: str, common: set[str]
) -> list[Fact]:
    """Every candidate fact of one item; a description phrase only when the prompt shows it. (The
    title's own words are no candidates: the whole title is in every grounded title.)"""
    facts = []
    if brand and _usable(brand):
        facts.append(Fact(brand.strip(), "brand"))
    for level in (_clean(level) for level in categories.split(",")):
        if level and level not in common and _usable(level):
            facts.append(Fact(level, "category"))
    shown = description[: len(visible_points)]  # the description never starts before the shown text
    if len(description) > len(shown):
        shown = re.sub(r"\S*$", "", shown)  # no phrase ends in a cut word
    for phrase in (_clean(part) for part in _SPLIT.split(shown)):
        if _usable(phrase) and len(phrase.split()) >= 2 and phrase in visible_points:
            facts.append(Fact(phrase, "description"))
    unique = {fact.text.lower(): fact for fact in reversed(facts)}  # the first kind of a phrase wins
    return list(reversed(unique.values()))


class PhraseEncoder:
    """Normalised mean-pooled sentence embeddings; each distinct phrase is encoded once."""

    def __init__(self, backbone: Backbone, *, batch_size: int = 256, max_tokens: int = 32) -> None:
        self.backbone, self.batch_size, self.max_tokens = backbone, batch_size, max_tokens
        self.cache: dict[str, np.ndarray] = {}
        self.width = backbone.hidden_size

    @torch.no_grad()
    def encode(self, phrases: list[str]) -> np.ndarray:
        """(P, D) float32 rows, in the order given; an empty phrase (a Creator can write an empty
        title) is a zero row: no tokens to pool, cosine 0 with anything."""
        missing = sorted({p for p in phrases if p not in self.cache}, key=len)  # similar lengths batch
        self.cache.update((p, np.zeros(self.width, np.float32)) for p in missing if not p.strip())
        missing = [p for p in missing if p.strip()]
        tokenizer, model = self.backbone.tokenizer, self.backbone.model.eval()
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            tokens = tokenizer(
                chunk, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
            )
            hidden = model(**tokens).last_hidden_state  # (b, T, D)
            mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)
            self.cache.update(zip(chunk, pooled.float().numpy(), strict=True))
        return (
            np.stack([self.cache[p] for p in phrases]) if phrases else np.zeros((0, self.width), np.float32)
        )


def common_categories(categories: pd.Series) -> set[str]:
    """Category levels found on more than `COMMON_CATEGORY_SHARE` of the items."""
    levels = categories.fillna("").map(lambda path: {_clean(level) for level in path.split(",")})
    counts = pd.Series([level for path in levels for level in path if level]).value_counts()
    return set(counts[counts > COMMON_CATEGORY_SHARE * len(categories)].index)


def compose(original: str, ranked: list[Fact]) -> tuple[str, list[str], str]:
    """The title from the original and the facts in order of interest: (title, facts used, template).

    The template follows the best fact: a category names the audience, otherwise one fact or two
    when both fit in the filter's length budget. A fact the title already says gives way to the
    next; with none left, the original title comes back unchanged."""
    title = original.strip().rstrip(".").strip()
    said = Counter(_words(title))
    budget = len(original.split()) + EXTRA_WORDS
    novel = [fact for fact in ranked if not _redundant(fact.text, said)]
    if not novel:
        return original, [], UNCHANGED
    first = novel[0]
    if first.kind == "category":
        return TEMPLATES["audience"].format(fact=first.text, title=title), [first.text], "audience"
    more = said + Counter(_words(first.text))
    for second in novel[1:2]:
        two = TEMPLATES["two_facts"].format(title=title, fact=first.text, fact2=_capital(second.text))
        if not _redundant(second.text, more) and len(two.split()) <= budget:
            return two, [first.text, second.text], "two_facts"
    return TEMPLATES["one_fact"].format(title=title, fact=_capital(first.text)), [first.text], "one_fact"


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _redundant(text: str, said: Counter[str]) -> bool:
    """At least half the phrase's words already said, or one of them said twice already (a third
    time would read as repetition)."""
    words = _words(text)
    content = [w for w in words if w not in _EDGE]
    repeated = any(said[w] + count >= 3 for w, count in Counter(words).items())
    return not content or repeated or sum(w in said for w in content) * 2 >= len(content)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def ground(
    rows: pd.DataFrame,
    catalogue: pd.DataFrame,
    settings: CreatorDataConfig,
    hllm_users: np.ndarray | None = None,
) -> pd.DataFrame:
    """`rows` (of `teacher.select_rows`) with `interests`, `grounded_title`, `facts`, `template` and
    `contrast_title`; a row whose history names no category or brand (no profile) is dropped.
    `hllm_users` (R, Du): each row's HLLM user embedding, for grounded-v3."""
    encoder = PhraseEncoder(load_backbone(settings.encoder))
    grounded = ground_rows(
        rows, catalogue, encoder, fact_chars=settings.fact_chars, seed=settings.seed, hllm_users=hllm_users
    )
    titled = rows.assign(
        interests=grounded.interests,
        grounded_title=grounded.titles,
        facts=grounded.facts,
        template=grounded.templates,
        contrast_title=grounded.contrast_titles,
    )
    return titled[titled["interests"].map(len) > 0].reset_index(drop=True)


@dataclass
class GroundedRows:
    interests: list[list[str]]
    titles: list[str]
    facts: list[list[str]]
    templates: list[str]
    contrast_titles: list[str]  # the title the teacher writes for another user of the sample


def ground_rows(
    rows: pd.DataFrame,
    items: pd.DataFrame,
    encoder: PhraseEncoder,
    *,
    fact_chars: int,
    seed: int = 0,
    hllm_users: np.ndarray | None = None,
) -> GroundedRows:
    """Interests and a grounded title for every row (`user_id`, `history_item_ids`, `item_id`), and
    the contrast title: the same item's title for a seeded random other user of the sample, which
    the Creator's contrast loss must find less likely than the row's own title given the row's user.

    Args:
        items: by raw item id: `title`, `selling_points`, `brand`, `categories`, `description`.
        hllm_users: (R, Du) each row's HLLM user embedding; the interest is then read from it
            (`mapped_interest`), not from the history mean directly.
    """
    common = common_categories(items["categories"])
    items = _records(items)
    facts = {item: _facts_of(items, item, fact_chars, common) for item in set(rows["item_id"])}
    histories = [[i for i in ids if i in items] for ids in rows["history_item_ids"]]
    users = _user_vectors(histories, items, encoder)  # (U, D)
    interest = users - users.mean(0, keepdims=True)  # beyond the average user of the sample
    if hllm_users is not None:
        interest = mapped_interest(hllm_users, interest)
    profiles = [list(dict.fromkeys(_profile_phrases(history, items, common))) for history in histories]
    everything = {f.text for item_facts in facts.values() for f in item_facts}
    everything |= {items[item]["title"] for item in facts}
    everything = sorted(everything | {phrase for profile in profiles for phrase in profile})
    embedded = dict(zip(everything, encoder.encode(everything), strict=True))

    def title_for(item: str, vector: np.ndarray) -> tuple[str, list[str], str]:
        candidates, original = facts[item], items[item]["title"]
        scores = np.array([float(embedded[f.text] @ vector) for f in candidates])
        return choose_facts(original, candidates, scores, float(embedded[original] @ vector))

    others = _other_rows(rows["user_id"].to_numpy(), seed)
    result = GroundedRows([], [], [], [], [])
    for row, vector, profile, other in zip(rows.itertuples(), interest, profiles, others, strict=True):
        title, used, template = title_for(row.item_id, vector)
        result.titles.append(title)
        result.facts.append(used)
        result.templates.append(template)
        result.contrast_titles.append(title_for(row.item_id, interest[other])[0] if other >= 0 else "")
        scores = [float(embedded[phrase] @ vector) for phrase in profile]
        result.interests.append([profile[i] for i in np.argsort(scores)[::-1][:INTERESTS]])
    return result


def choose_facts(
    original: str, candidates: list[Fact], scores: np.ndarray, title_score: float
) -> tuple[str, list[str], str]:
    """`compose` over the facts that interest the user more than the original title itself does
    (`scores` (K,) and `title_score`: their dot products with the interest), best first."""
    return compose(original, [candidates[i] for i in np.argsort(scores)[::-1] if scores[i] > title_score])


@dataclass
class InterestMap:
    """A ridge regression from user embeddings (Du) to interests in the encoder's space (D)."""

    user_mean: np.ndarray  # (Du,)
    weights: np.ndarray  # (Du, D)

    @classmethod
    def fit(cls, embeddings: np.ndarray, interest: np.ndarray, ridge: float = RIDGE) -> InterestMap:
        """Centred on both sides: the map predicts how a user's interest departs from the mean."""
        mean = embeddings.mean(0)
        x, y = embeddings - mean, interest - interest.mean(0, keepdims=True)
        weights = np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ y)
        return cls(mean.astype(np.float32), weights.astype(np.float32))

    def __call__(self, embeddings: np.ndarray) -> np.ndarray:
        return ((embeddings - self.user_mean) @ self.weights).astype(np.float32)


def mapped_interest(embeddings: np.ndarray, interest: np.ndarray, ridge: float = RIDGE) -> np.ndarray:
    """The part of each row's interest (R, D) that its HLLM user embedding (R, Du) predicts linearly:
    a ridge regression over the rows, centred on both sides (`InterestMap`).

    Why (grounded-v3): the Creator reads only the HLLM embedding, and v2's choices also followed the
    part of the history mean it does not hold. Over 3,000 amazon-scientific rows a probe trained on
    2,400 rows' HLLM embeddings (`scripts/selector_probe.py`) picks v3's fact, or none, on 69% of the
    other 600 rows (48% without the user), v2's on 53% (47%)."""
    return InterestMap.fit(embeddings, interest, ridge)(embeddings)


class FactCatalogue:
    """Each item's candidate facts exactly as the grounded teacher lists them (the Creator's fact
    selector chooses among them)."""

    def __init__(self, catalogue: pd.DataFrame, fact_chars: int) -> None:
        self.records, self.fact_chars = _records(catalogue), fact_chars
        self.common = common_categories(catalogue["categories"])

    def facts(self, item: str) -> list[Fact]:
        return _facts_of(self.records, item, self.fact_chars, self.common)

    def history_means(self, histories: list[list[str]], encoder: PhraseEncoder) -> np.ndarray:
        """(R, D) the teacher's user vectors: the mean embedding of each history's titles (raw ids)."""
        return _user_vectors([[i for i in h if i in self.records] for h in histories], self.records, encoder)


def _other_rows(users: np.ndarray, seed: int) -> np.ndarray:
    """For each row, a seeded random row of another user (-1 when the sample has one user only)."""
    rng = np.random.default_rng(seed)
    others = rng.integers(0, len(users), len(users))
    for row in np.flatnonzero(users[others] == users):  # few: redraw among the other users' rows
        candidates = np.flatnonzero(users != users[row])
        others[row] = rng.choice(candidates) if len(candidates) else -1
    return others


def _records(items: pd.DataFrame) -> Records:
    """Plain dicts: a pandas lookup per field and row would cost more than the grounding itself."""
    columns = ["title", "selling_points", "brand", "categories", "description"]
    return items[columns].astype(object).fillna("").to_dict("index")


def _facts_of(items: Records, item: str, fact_chars: int, common: set[str]) -> list[Fact]:
    row = items[item]
    visible = row["selling_points"][:fact_chars]
    if len(row["selling_points"]) > fact_chars:
        visible = re.sub(r"\S*$", "", visible)  # a word cut in half is no fact
    return item_facts(visible, row["brand"], row["categories"], row["description"], common)


def _user_vectors(histories: list[list[str]], items: Records, encoder: PhraseEncoder) -> np.ndarray:
    titles = sorted({items[i]["title"] for history in histories for i in history})
    embedded = dict(zip(titles, encoder.encode(titles), strict=True))
    vectors = [
        np.mean([embedded[items[i]["title"]] for i in history], 0) if history else np.zeros(encoder.width)
        for history in histories
    ]
    return np.stack(vectors).astype(np.float32)


def _profile_phrases(history: list[str], items: Records, common: set[str]) -> Iterator[str]:
    """The profile's candidates: the history's category levels and brands."""
    for item in history:
        for level in items[item]["categories"].split(","):
            if (level := _clean(level)) and level not in common:
                yield level
        if brand := items[item]["brand"].strip():
            yield brand
