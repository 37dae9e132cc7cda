"""Hallucination-free filter: reject a rewritten title that states anything the item's own text does not.

In: a rewritten title, the original title and the item's source text (title, description, brand,
categories). Out: a `Verdict` whose reasons ("kind: detail") say what was unsupported.

Every check is deterministic and errs towards keeping faithful rewrites, so it has known blind spots:
- Title-Case words in the middle of a title are never judged, so typos ("Brace" for "Brake") and invented
  ordinary words ("Tireless") pass. An invented Capitalised word is caught only as the *first* word (the
  brand position in Amazon titles, where the teacher puts names like "Smokey") and only when it is neither in
  the source nor in `_COMMON_WORDS`, a short list of audience and marketing words; a faithful rewrite that
  opens with an ordinary word missing from that list ("Boost", "Innovative") is a false positive.
- Words are supported up to a plural "s"/"es"; number words one..twelve equal their digits; "pack",
  "count" and "pcs" are one unit, as are "inch"/"in"/'"' and "ft"/"feet"/"'".
- A number is supported when it occurs anywhere in the source, even in another role ("4" in "4 caster").
- A catalogue brand made only of common words or words the source has ("small parts") is not checked.
- Mid-title invented words are caught only in bulk (`unsupported`): two or more content words that
  neither the source nor the user's interests contain, over a quarter of the title's content words.
"""

from __future__ import annotations

import html
import re
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass

REASONS: tuple[str, ...] = tuple(
    "empty too_long unchanged repetition number unit brand model_name material claim unsupported".split()
)

UNSUPPORTED_WORDS, UNSUPPORTED_SHARE = 2, 0.25
_NUMBER_WORDS = dict(
    zip("one two three four five six seven eight nine ten eleven twelve".split(), map(str, range(1, 13)))
)
_NUMBER_WORD = re.compile(r"\b(?:" + "|".join(_NUMBER_WORDS) + r")\b")
# Unicode dashes, quotes and primes -> ASCII.
_PUNCTUATION = str.maketrans(
    "\u2010\u2011\u2012\u2013\u2014\u2015\u2212\u2018\u2019\u2032\u201c\u201d\u2033", "-------'''\"\"\""
)
_NUMBER = r"\d+(?:\.\d+)?(?:/\d+)?"
# A title's number must stand alone on its left ("TB3561" is a model code, not the number 3561);
# the source side is lenient so that "STNLSS1/2" still supports "1/2".
_TITLE_NUMBER = re.compile(rf"(?<![a-z0-9.#/])#?{_NUMBER}%?")
_SOURCE_NUMBER = re.compile(rf"#?{_NUMBER}%?")
# Each unit and its spellings; synonyms share one unit so "500 Count" supports "500-Pack".
_UNIT_SPELLINGS = {
    "inch": 'inches inch in "', "ft": "feet foot ft '", "yd": "yards yard yd", "mm": "mm", "cm": "cm",
    "m": "meters meter metres metre m", "l": "liters liter litres litre l", "ml": "ml", "kg": "kg",
    "oz": "ounces ounce oz", "lb": "pounds pound lbs lb", "g": "grams gram g", "gallon": "gallons gallon gal",
    "pack": "pack pk count ct pieces piece pcs pc", "v": "volts volt v", "w": "watts watt w",
    "amp": "amps amp", "psi": "psi", "mah": "mah", "grit": "grit",
}  # fmt: skip
_UNITS = {spelling: unit for unit, spellings in _UNIT_SPELLINGS.items() for spelling in spellings.split()}
_UNIT = "|".join(re.escape(unit) for unit in sorted(_UNITS, key=len, reverse=True))
_NUMBER_UNIT = re.compile(rf"(?<![a-z0-9.#/])({_NUMBER})\s?-?\s?({_UNIT})(?![a-z])")
_UNIT_OF_NUMBER = re.compile(rf"\b(pack|count|set) of ({_NUMBER})\b")
_GLUED_UNIT = re.compile(rf"{_NUMBER}(?:st|nd|rd|th|{_UNIT})")
_MATERIALS = (
    ("aluminum", "aluminium"), ("stainless",), ("steel",), ("iron",), ("metal", "metallic"), ("plastic",),
    ("wood", "wooden"), ("bamboo",), ("cotton",), ("wool",), ("leather",), ("glass",), ("ceramic",),
    ("fiberglass", "fibreglass"), ("copper",), ("brass",), ("titanium",), ("silicone",), ("nylon",),
    ("rubber",), ("foam",), ("polyester",), ("carbon fiber", "carbon fibre"), ("vinyl",), ("pvc",),
    ("acrylic",), ("polyurethane",), ("polypropylene",), ("paper",), ("cardboard",), ("canvas",),
)  # fmt: skip
# Longer phrases come first: a matched phrase is blanked out so "best-selling" is not also "best".
_CLAIMS = (
    ("best selling", "best seller", "bestselling", "bestseller"), ("best",), ("#1", "number 1"),
    ("top rated",), ("award winning",), ("guaranteed", "guarantee"), ("warranty",), ("certified",),
    ("approved",), ("fda",), ("organic",), ("eco friendly",), ("non toxic",), ("bpa free",),
    ("waterproof",), ("water resistant",), ("hypoallergenic",), ("patented",), ("clinically",),
    ("professional grade",), ("medical grade",), ("military grade",), ("premium",), ("luxury",),
    ("free shipping",), ("brand new",), ("new",), ("genuine",), ("authentic",), ("official",),
    ("original",), ("lifetime",), ("made in usa", "made in the usa"), ("cheapest",),
)  # fmt: skip
# Audience and marketing words a faithful rewrite may add; never judged as invented names or brands.
_COMMON_WORDS = frozenset("""
a an the your you our my all every for with and of to in on by from at
home office school work lab laboratory science scientific classroom desk desktop workshop shop garage
kitchen studio business team family kids students student teachers teacher scientists scientist
researchers engineers makers maker hobbyists crafters artists professionals pros diy everyday daily
essential essentials perfect ideal great reliable durable sturdy heavy duty easy simple smart handy
compact portable versatile practical quality high classic modern basic standard multi multipurpose set
kit pack tool tools supplies supply equipment accessories gear solution must have favorite favourite
trusted dependable efficient precise precision accurate strong secure clean smooth fast quick long
lasting lightweight small large big mini medium fine extra super ultra pro plus use projects project
industrial commercial creative writing printing study budget value upgrade ready safe
convenient organized organizer stylish elegant colorful universal generic
""".split())  # fmt: skip
# Material and claim words are judged by their own checks, never as invented names.
_JUDGED_WORDS = frozenset(
    word for group in _MATERIALS + _CLAIMS for phrase in group for word in phrase.split()
)


@dataclass(frozen=True)
class Verdict:
    """Whether a rewritten title is kept, and each reason ("kind: detail") it was not."""

    kept: bool
    reasons: tuple[str, ...]

    @property
    def invents(self) -> bool:
        """Rejected for something other than being the original title again (which invents nothing)."""
        return any(kind != "unchanged" for kind in self.kinds)

    @property
    def kinds(self) -> tuple[str, ...]:
        """The distinct kinds of `reasons`, in `REASONS` order."""
        found = {reason.split(":", 1)[0] for reason in self.reasons}
        return tuple(kind for kind in REASONS if kind in found)


def check_title(
    title: str,
    *,
    original_title: str,
    source_text: str,
    known_brands: Collection[str] = (),
    allowed_text: str = "",
    max_extra_words: int = 12,
) -> Verdict:
    """Run every check on `title`; it is kept only when none fires.

    Args:
        source_text: everything the item's own data says (title, description, brand, categories, joined).
        known_brands: catalogue brands as returned by `collect_brands`.
        allowed_text: words a rewrite may add besides the source's (the user's interests).
        max_extra_words: how many words longer than the original title a rewrite may be.
    """
    text = _normalise(title)
    if not re.search(r"[a-z]", text):
        return Verdict(kept=False, reasons=("empty: no letters",))
    original, source = _normalise(original_title), _normalise(source_text)
    source_words = set(_words(source))
    source_numbers = {_canonical_number(number) for number in _SOURCE_NUMBER.findall(source)}
    reasons = [
        *_too_long(title, original_title, max_extra_words),
        *_unchanged(text, original),
        *_repetition(text, original),
        *_numbers(text, source_numbers),
        *_units(text, source, source_numbers),
        *_brands(text, source, source_words, known_brands),
        *_model_names(_unify(title), source_words),
        *_phrases("material", _MATERIALS, text, source),
        *_phrases("claim", _CLAIMS, text, source),
        *_unsupported(text, source_words | set(_words(_normalise(allowed_text)))),
    ]
    return Verdict(kept=not reasons, reasons=tuple(reasons))


def collect_brands(brands: Iterable[str | None]) -> frozenset[str]:
    """The catalogue's brand names, normalised (lower-case, stripped, no empty / 'unknown' / one-letter)."""
    names = (" ".join(_normalise(brand).split()) for brand in brands if isinstance(brand, str))
    return frozenset(name for name in names if len(name) > 1 and name not in {"unknown", "generic", "n/a"})


def _unify(text: str) -> str:
    """Unescape HTML, unify dashes and quotes, drop thousands separators; case is kept."""
    text = html.unescape(text).translate(_PUNCTUATION)
    return re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)


def _normalise(text: str) -> str:
    text = re.sub(r"(\d)\s*percent\b", r"\1%", _unify(text).lower())
    return _NUMBER_WORD.sub(lambda match: _NUMBER_WORDS[match.group()], text)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text)


def _phrase_pattern(phrase: str, *, plural: bool = True) -> str:
    """Whole words; spaces and hyphens in `phrase` match each other, and a plural "s" is allowed."""
    pattern = r"[\s-]*".join(map(re.escape, re.split(r"[\s-]+", phrase)))
    return rf"(?<![a-z0-9]){pattern}{'s?' if plural else ''}(?![a-z0-9])"


def _contains(text: str, phrase: str, *, plural: bool = True) -> bool:
    return re.search(_phrase_pattern(phrase, plural=plural), text) is not None


def _is_supported_word(word: str, source_words: set[str]) -> bool:
    forms = (word, word + "s", word + "es", word.removesuffix("s"), word.removesuffix("es"))
    return any(form in source_words for form in forms)


def _canonical_number(number: str) -> str:
    """Drop "#" and trailing decimal zeros ("#8" -> "8", "6.50" -> "6.5"); a percentage keeps its "%"."""
    percent = "%" if number.endswith("%") else ""
    number = number.strip("#%")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number + percent


def _too_long(title: str, original_title: str, max_extra_words: int) -> list[str]:
    limit = len(original_title.split()) + max_extra_words
    count = len(title.split())
    return [f"too_long: {count} words > {limit}"] if count > limit else []


def _unchanged(text: str, original: str) -> list[str]:
    return ["unchanged: same as the original title"] if _words(text) == _words(original) else []


def _repetition(text: str, original: str) -> list[str]:
    """A word three times in a row, or a 1-3 word phrase three times (more often than in the original)."""
    words = _words(text)
    for first, second, third in zip(words, words[1:], words[2:]):
        if first == second == third and len(first) > 1:
            return [f"repetition: {first}"]
    original_words = _words(original)
    for size in (1, 2, 3):
        counts = Counter(zip(*(words[start:] for start in range(size))))
        original_counts = Counter(zip(*(original_words[start:] for start in range(size))))
        for phrase, count in counts.items():
            meaningful = any(len(word) > 1 and word not in _COMMON_WORDS for word in phrase)
            if count >= 3 and count > original_counts[phrase] and meaningful:
                return [f"repetition: {' '.join(phrase)}"]
    return []


def _numbers(text: str, source_numbers: set[str]) -> list[str]:
    supported = source_numbers | {number.rstrip("%") for number in source_numbers}
    unsupported = [
        number for number in _TITLE_NUMBER.findall(text) if _canonical_number(number) not in supported
    ]
    return [f"number: {number}" for number in dict.fromkeys(unsupported)]


def _number_units(text: str) -> set[tuple[str, str]]:
    pairs = {(number, _UNITS[unit]) for number, unit in _NUMBER_UNIT.findall(text)}
    pairs |= {(number, "pack") for _, number in _UNIT_OF_NUMBER.findall(text)}
    return {(_canonical_number(number), unit) for number, unit in pairs}


def _units(text: str, source: str, source_numbers: set[str]) -> list[str]:
    """A supported number given a unit the source never gives it ("10 inch" where the source says "10 ft")."""
    wrong = _number_units(text) - _number_units(source)
    return [f"unit: {number} {unit}" for number, unit in sorted(wrong) if number in source_numbers]


def _brands(text: str, source: str, source_words: set[str], known_brands: Collection[str]) -> list[str]:
    reasons = []
    for brand in known_brands:
        # Brands are never plural: "Weekend Warriors" is not the brand "warrior".
        if brand not in text or not _contains(text, brand, plural=False) or _contains(source, brand):
            continue
        if all(word in _COMMON_WORDS or word in source_words for word in _words(brand)):
            continue  # "lab", "small parts": ordinary words, not a claim about the maker
        reasons.append(f"brand: {brand}")
    return sorted(reasons)


def _model_names(title: str, source_words: set[str]) -> list[str]:
    """Codes (TB3561), acronyms (CNC), CamelCase (ThreeMile) and a first-word name, when not in the source."""
    tokens = re.findall(r"[A-Za-z0-9]+", title)
    capitals = [token for token in tokens if len(token) >= 3 and token.isalpha() and token.isupper()]
    shouting = len(capitals) * 2 > sum(len(token) >= 3 and token.isalpha() for token in tokens)
    reasons = []
    for position, token in enumerate(tokens):
        word = token.lower()
        if word.isdigit() or word in _NUMBER_WORDS or _is_supported_word(word, source_words):
            continue
        if any(character.isdigit() for character in word):
            invented = _GLUED_UNIT.fullmatch(word) is None
        elif word in _COMMON_WORDS or word in _JUDGED_WORDS:
            invented = False
        else:
            camel = re.search(r"[a-z][A-Z]", token) is not None
            invented = camel or (token in capitals and not shouting) or (position == 0 and token[0].isupper())
        if invented:
            reasons.append(f"model_name: {token}")
    return list(dict.fromkeys(reasons))


def _phrases(kind: str, groups: tuple[tuple[str, ...], ...], text: str, source: str) -> list[str]:
    """Each group of synonyms the title uses while the source uses none of them."""
    reasons = []
    for group in groups:
        used = [phrase for phrase in group if _contains(text, phrase)]
        if used and not any(_contains(source, phrase) for phrase in group):
            reasons.append(f"{kind}: {used[0]}")
        for phrase in used:
            text = re.sub(_phrase_pattern(phrase), " ", text)
    return reasons


def _unsupported(text: str, known_words: set[str]) -> list[str]:
    """Two or more content words found in neither the source nor the interests, making over a quarter of
    the title's content words: the title drifted away from its item (or is noise)."""
    content = [
        word for word in _words(text) if len(word) > 2 and word.isalpha() and word not in _COMMON_WORDS
    ]
    unknown = [
        word for word in content if word not in _JUDGED_WORDS and not _is_supported_word(word, known_words)
    ]
    if len(unknown) >= UNSUPPORTED_WORDS and len(unknown) > UNSUPPORTED_SHARE * len(content):
        return [f"unsupported: {', '.join(dict.fromkeys(unknown))}"]
    return []
