"""The hallucination filter on hand-written rewrites of real Amazon items, kept and rejected."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest

from hllm.creator.data.hallucination import REASONS, Verdict, check_title, collect_brands

Catalogues = dict[str, dict[str, dict[str, str]]]

CATALOGUES = {
    "scientific": "amazon-scientific/Scientific.item.json",
    "office": "amazon-office/Office.item.json",
}
# name: (catalogue, item id), with the item's original title.
ITEMS = {
    "staples": ("scientific", "1"),  # Stanley TRA708T Sharpshooter 1/2-Inch ... Staples, Steel (1000 Count).
    "screws": ("scientific", "3"),  # Kreg SML-C125-500 1-1/4-Inch #8 Coarse Pocket Hole Screws ... 500-Pack.
    "casters": ("scientific", "40"),  # 4 Pack Caster Wheels ... Red Polyurethane Wheels (4 inch with brake).
    "mist": ("scientific", "119"),  # Mist Coolant Lubrication Spray System For 8mm Air Pipe CNC Lathe ...
    "fastener": ("scientific", "159"),  # 3M Dual Lock Reclosable Fastener TB3561/TB3562 ... 1 in x 10 ft ...
    "pens": ("office", "3"),  # BIC Round Stic Ball Pen, Fine Point, 0.8mm, Black, 12 Pens (GSF11-Blk)
}
TEACHER_CASTERS = (
    "Four Pack Swivel Plate Stem Brace Casters on Red Polyurethane Wheels (4 inch with brake) "
    "for Lab Equipment"
)
TEACHER_FASTENER = "ThreeMile 3M 3M 3M Lab Equipment 3M Lab Lab Lab LabLab 3M Lab"
TEACHER_MIST = "Smokey Lab Equipment 8mm Air Pipe Lathe Milling Machine 90% Clean & 10% Tireless 90% 100% 10"
LONG_AUDIENCE = (  # 27 words; the original has 13, so the limit is 25
    "Kreg Pocket Hole Screws for Woodworkers, Cabinet Makers, Furniture Builders, Carpenters, Hobbyists, "
    "Students, Teachers, Renovators, Homeowners, Office Managers, Lab Technicians, Shop Instructors and "
    "Weekend Warriors"
)


def case(item: str, kinds: str, title: str, name: str) -> pytest.ParameterSet:
    """One row: the rewrite of `item`, and the space-separated kinds it must be rejected for ("" = kept)."""
    return pytest.param(item, tuple(kinds.split()), title, id=name)


CASES = [
    # Faithful rewrites: reordered, shortened, audience phrases, number words, unit synonyms.
    case("casters", "", TEACHER_CASTERS, "teacher-casters-four-for-4-typo-kept"),
    case("casters", "", "4-Pack Red Swivel Casters with Brake \u2013 4\u2033 Wheels", "unicode-marks"),
    case("casters", "", "Best Service 4 Pack Red Casters with Brake, 90 Days Warranty", "source-claims"),
    case("staples", "", "Stanley Sharpshooter Steel Staples, 1/2 Inch Leg, 1000 Count", "unit-spelling"),
    case("staples", "", "Stanley TRA708T Heavy Duty Steel Staples for Lab Work", "audience-lab-work"),
    case("staples", "", "Stanley Sharpshooter Staples, Pack of 1,000", "pack-of-thousands-separator"),
    case("screws", "", "Kreg 1-1/4 Inch Coarse Pocket Hole Screws, 500 Count", "count-for-pack"),
    case("screws", "", "Kreg #8 Pocket Hole Screws for Your Home Workshop", "dropped-detail"),
    case("fastener", "", "3M Dual Lock Clear Fastener, 1 in x 10 ft, for Your Home Office", "home-office"),
    case("mist", "", "Mist Coolant Spray System for CNC Lathe with 8mm Air Pipe", "reordered"),
    case("pens", "", "BIC Round Stic Ball Pens, Twelve Black Fine Point Pens for Students", "number-word"),
    case("pens", "", "Fine Point BIC Ball Pen, 0.8 mm, Black, for Your Home Office", "spaced-unit"),
    # The weak teacher's real failures.
    case("fastener", "repetition model_name unsupported", TEACHER_FASTENER, "teacher-fastener-degenerate"),
    case("mist", "number model_name unsupported", TEACHER_MIST, "teacher-mist-invented-numbers"),
    # Invented facts.
    case("staples", "number", "Stanley Sharpshooter Steel Staples, 50% Stronger, 1000 Count", "percentage"),
    case("screws", "number", "Kreg Coarse Pocket Hole Screws, 750-Pack", "number"),
    case("fastener", "unit", "3M Dual Lock Clear Fastener, 1 in x 10 m", "metres-for-feet"),
    case("staples", "unit", "Stanley Sharpshooter Steel Staples, 1/2 ft Leg Length", "feet-for-inches"),
    case("fastener", "brand model_name", "Scotch Dual Lock Fastener, Clear, 1 in x 10 ft", "brand"),
    case("pens", "brand", "BIC and Pilot Round Stic Ball Pens, Fine Point, Black", "second-brand"),
    case("staples", "model_name", "Stanley TRA709X Sharpshooter Steel Staples", "model-code"),
    case("casters", "model_name", "4 Pack Swivel Casters with ABS Brake", "acronym"),
    case("screws", "model_name", "Kreg PocketPro Coarse Pocket Hole Screws", "camelcase-name"),
    case("mist", "model_name", "Smokey Mist Coolant Spray System for CNC Lathe", "first-word-name"),
    case("staples", "material", "Stanley Sharpshooter Titanium Staples", "titanium"),
    case("screws", "material", "Kreg Stainless Steel Pocket Hole Screws", "stainless"),
    case("pens", "material", "BIC Round Stic Ball Pen with Bamboo Barrel", "bamboo"),
    case("screws", "claim", "Best-Selling Kreg Pocket Hole Screws, 500-Pack", "best-selling"),
    case("screws", "claim", "#1 Kreg Pocket Hole Screws", "number-one"),
    case("pens", "claim", "FDA Approved BIC Round Stic Ball Pens", "fda-approved"),
    case("fastener", "claim", "3M Dual Lock Waterproof Clear Fastener", "waterproof"),
    # Degenerate or unpersonalised output.
    case("pens", "repetition", "BIC Pens for School, BIC Pens for Office, BIC Pens for Home", "repetition"),
    case("pens", "empty", "", "empty"),
    case("pens", "empty", " 12 / 0.8 !!", "no-letters"),
    case("screws", "too_long unsupported", LONG_AUDIENCE, "too-long"),
    case("staples", "unsupported", "Stanley Sharpshooter Staples for Aquarium Divers Snorkeling", "drifted"),
    case("pens", "unchanged", "bic round stic ball pen fine point 0.8mm black 12 pens gsf11-blk", "same"),
]


@cache
def load_catalogue(path: Path) -> dict[str, dict[str, str]]:
    return json.loads(path.read_text())


def source_text(item: dict[str, str]) -> str:
    return " ".join(item[field] or "" for field in ("title", "description", "brand", "categories"))


def check(item: dict[str, str], title: str, brands: frozenset[str]) -> Verdict:
    return check_title(
        title, original_title=item["title"], source_text=source_text(item), known_brands=brands
    )


@pytest.fixture(scope="module")
def catalogues(shared_data: Path) -> Catalogues:
    return {name: load_catalogue(shared_data / path) for name, path in CATALOGUES.items()}


@pytest.fixture(scope="module")
def brands(catalogues: Catalogues) -> frozenset[str]:
    return collect_brands(item["brand"] for catalogue in catalogues.values() for item in catalogue.values())


@pytest.mark.parametrize(("item_name", "kinds", "title"), CASES)
def test_check_title(
    item_name: str, kinds: tuple[str, ...], title: str, catalogues: Catalogues, brands: frozenset[str]
) -> None:
    catalogue, item_id = ITEMS[item_name]
    verdict = check(catalogues[catalogue][item_id], title, brands)
    assert verdict.kept == (kinds == ()), verdict.reasons
    assert verdict.kinds == kinds, verdict.reasons
    assert all(reason.partition(": ")[0] in REASONS for reason in verdict.reasons)


def test_every_reason_kind_is_reached_by_a_case() -> None:
    reached = {kind for row in CASES for kind in row.values[1]}
    assert reached == set(REASONS)


def test_all_reasons_are_reported_with_details(catalogues: Catalogues, brands: frozenset[str]) -> None:
    verdict = check(catalogues["scientific"]["119"], TEACHER_MIST, brands)
    numbers = ("number: 90%", "number: 10%", "number: 100%", "number: 10")
    assert verdict.reasons == (*numbers, "model_name: Smokey", "unsupported: smokey, tireless")


def test_generic_word_brands_do_not_fire(catalogues: Catalogues) -> None:
    verdict = check(
        catalogues["scientific"]["1"],
        "Stanley Universal Staples for Lab Work",
        frozenset({"lab", "universal"}),
    )
    assert verdict == Verdict(kept=True, reasons=())


def test_max_extra_words_sets_the_length_limit(catalogues: Catalogues) -> None:
    item = catalogues["office"]["3"]  # 12 words
    title = "BIC Round Stic Ball Pens, Fine Point, Black, for Young Students and Teachers"  # 13 words
    source = source_text(item)
    assert check_title(title, original_title=item["title"], source_text=source, max_extra_words=1).kept
    verdict = check_title(title, original_title=item["title"], source_text=source, max_extra_words=0)
    assert verdict.reasons == ("too_long: 13 words > 12",)


def test_kinds_are_distinct_and_in_reasons_order() -> None:
    verdict = Verdict(kept=False, reasons=("claim: best", "number: 90%", "claim: new", "number: 7"))
    assert verdict.kinds == ("number", "claim")


def test_a_title_handed_back_unchanged_is_rejected_but_invents_nothing() -> None:
    verdict = check_title(
        "Glass Beaker Set.", original_title="Glass Beaker Set.", source_text="Glass Beaker Set."
    )
    assert verdict.kinds == ("unchanged",) and not verdict.kept and not verdict.invents
    assert Verdict(kept=False, reasons=("unchanged: same", "claim: best")).invents


def test_collect_brands_normalises_and_drops_non_brands() -> None:
    raw = ["Stanley", " 3M ", "AT&amp;T", "Paper  Mate", "", None, "Unknown", "x", "stanley"]
    assert collect_brands(raw) == frozenset({"stanley", "3m", "at&t", "paper mate"})


def test_words_of_the_users_interests_may_be_added(catalogues: Catalogues) -> None:
    item = catalogues["scientific"]["1"]
    title = "Stanley Sharpshooter Staples for Upholstery Crafting Projects"
    common = {"original_title": item["title"], "source_text": source_text(item)}
    assert check_title(title, **common).kinds == ("unsupported",)
    assert check_title(title, **common, allowed_text="upholstery; crafting").kept
