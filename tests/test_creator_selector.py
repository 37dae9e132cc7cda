"""The Creator's fact selector: its two-step choice and loss by hand, its fit on a planted rule, the
teacher's labels, the [ANGLE] line, and a Creator trained and evaluated with it end to end (tiny
random models over a cycle catalogue whose items have brands, categories and descriptions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hllm.config import DataConfig, load_config
from hllm.creator.data.grounded import FactCatalogue, ground_rows
from hllm.creator.data.teacher import build_data, read_catalogue
from hllm.creator.infer.generation import ItemFacts
from hllm.creator.model.layout import ANGLE_CUE, PromptLayout, angle_text
from hllm.creator.model.selector import FactSelector
from hllm.creator_config import CreatorDataConfig, LLMConfig
from hllm.models.backbone import load_causal_lm
from hllm.train import fit
from tests.support import CYCLE_ITEMS, assert_one_line_error, run_cli, tiny_overrides, write_cycle_data
from tests.test_grounded import HashEncoder


def test_the_selector_chooses_the_grounded_v3_teachers_facts_from_the_embedding_alone(scientific) -> None:
    """Fitted on the same users, the selector's choice for every row is the teacher's: it reads the
    HLLM embedding through the same map and ranks and composes facts the same way. Without the
    user it adds no fact."""
    rng = np.random.default_rng(0)
    ids = list(scientific.index)
    rows = pd.DataFrame(
        {
            "user_id": [f"u{i}" for i in range(120)],
            "history_item_ids": [list(rng.choice(ids, 5, replace=False)) for _ in range(120)],
            "item_id": list(rng.choice(ids, 120)),
        }
    )
    embeddings = rng.standard_normal((120, 8)).astype(np.float32)
    encoder = HashEncoder()
    teacher = ground_rows(rows, scientific, encoder, fact_chars=200, hllm_users=embeddings)
    assert 0.2 < np.mean([len(f) > 0 for f in teacher.facts]) < 1  # some rows add facts, some not

    catalogue = FactCatalogue(scientific, 200)
    selector = FactSelector(8, encoder.width)
    users = torch.from_numpy(embeddings)
    selector.fit(users, torch.from_numpy(catalogue.history_means(list(rows["history_item_ids"]), encoder)))
    items = [(scientific.loc[item, "title"], catalogue.facts(item)) for item in rows["item_id"]]
    assert selector.choose(users, items, encoder) == teacher.facts
    assert selector.choose(None, items, encoder) == [[] for _ in items]


def test_the_angle_line_is_in_the_prompt_only_when_given() -> None:
    _, tokenizer = load_causal_lm("tiny-llama")
    layout = PromptLayout(tokenizer)
    cue = layout._encode(ANGLE_CUE)
    plain = layout.prompt("Lamp", "brand: Acme")
    angled = layout.creative("Lamp", "brand: Acme", "Lamp | Acme", angle=angle_text(["Acme"]))
    assert not _contains(plain.ids, cue) and _contains(angled.ids, cue)
    assert angle_text([]) == "none" and angle_text(["a", "b"]) == "a; b"


@pytest.fixture(scope="module")
def scientific(shared_data) -> pd.DataFrame:
    return read_catalogue(DataConfig(path=str(shared_data / "amazon-scientific")))


def _contains(ids: list[int], part: list[int]) -> bool:
    return any(ids[i : i + len(part)] == part for i in range(len(ids) - len(part) + 1))


CREATOR_YAML = """
name: creator
creator:
  data: {encoder: tiny-bert, fact_chars: 120}
  model: {backbone: tiny-llama, mode: lora, lora_rank: 4, max_title_tokens: 12, max_fact_tokens: 24,
          fact_selector: true}
  loss: {cls_dim: 16, cls_catalogue_negatives: 4}
  train: {holdout: 0.25}
  infer: {clusters: 3, top_n: 1, threshold: 0.0, shard_users: 20, generate_batch: 4, max_new_tokens: 6}
train: {epochs: 2, batch_size: 8, lr: 3.0e-3, warmup: 0.0, log_every: 1, accelerator: cpu}
"""


@pytest.fixture(scope="module")
def faceted(tmp_path_factory) -> dict:
    """Cycle data whose items carry a brand, categories and a description; a 4-step tiny HLLM run on
    it; grounded rows for every user; a Creator config with the fact selector over them."""
    folder = tmp_path_factory.mktemp("faceted")
    write_cycle_data(folder)
    items = pd.read_csv(folder / "cycle_items.csv")
    items["brand"] = [f"Maker{i % 3}" for i in range(CYCLE_ITEMS)]
    items["categories"] = [f"Shop, Aisle {i % 4}, Shelf Row {i}" for i in range(CYCLE_ITEMS)]
    items["description"] = [
        f"Sturdy frame build. Fits small rooms {i}. Easy clean design" for i in range(CYCLE_ITEMS)
    ]
    items.to_csv(folder / "cycle_items.csv", index=False)
    fit(load_config(None, [*tiny_overrides(folder, folder, data__max_history=5), "train.max_steps=4"]))
    hllm = folder / "tiny"
    data_config = load_config(None, tiny_overrides(folder, folder)).data
    settings = CreatorDataConfig(history_items=3, fact_chars=120, encoder="tiny-bert", interest_run=str(hllm))
    build_data(data_config, settings, LLMConfig(backend="grounded"), folder / "rows")
    (folder / "creator.yaml").write_text(CREATOR_YAML)
    overrides = [
        f"out_dir={folder}",
        f"creator.model.hllm_run={hllm}",
        f"creator.train.rows={folder / 'rows' / 'rows.parquet'}",
    ]
    return {
        "folder": folder,
        "catalogue": ItemFacts.read(data_config, 120),
        "args": ("creator", "train", folder / "creator.yaml", *overrides),
    }


def test_a_creator_with_the_selector_fits_it_then_writes_its_angles_in_every_variant(faceted, tmp_path):
    rows = pd.read_parquet(faceted["folder"] / "rows" / "rows.parquet")
    assert rows["facts"].map(len).gt(0).any()  # the teacher added facts: there is something to learn
    code, _, err = run_cli(*faceted["args"])
    assert code == 0, err
    run = faceted["folder"] / "creator"
    report = json.loads((run / "metrics.json").read_text())["fact_selector"]
    assert 0 <= report["train_agreement"] <= 1 and 0 <= report["held_out_agreement"] <= 1
    no_fact = rows.loc[rows["user_id"].isin(json.loads((run / "split.json").read_text())["held_out_users"])]
    assert report["held_out_agreement_no_user"] == round((no_fact["facts"].map(len) == 0).mean(), 4)
    weights = torch.load(run / "checkpoints" / "best.ckpt", weights_only=False)["model"]
    assert weights["selector.interest_map"].abs().sum() > 0  # fitted, and saved with the run

    code, _, err = run_cli("creator", "evaluate", run, "--out", tmp_path / "eval")
    assert code == 0, err
    generated = pd.read_parquet(tmp_path / "eval" / "generated.parquet")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for variant in ("full", "random_user", "no_user"):
        for angle, item in zip(generated[f"{variant}_angle"], generated["item_id"], strict=True):
            facts = [fact.text for fact in faceted["catalogue"].candidates(item)[1]]  # the item's own
            assert angle == "none" or set(angle.split("; ")) <= set(facts), (angle, facts)
        assert 0 <= metrics["selector_agrees_with_teacher"][variant] <= 1
    assert (generated["no_user_angle"] == "none").all()  # no user, no interest, no fact
    assert (generated["full_angle"] != "none").any()

    # scripts/rejudge.py judges the same titles again: the evaluation's own second judge, exactly
    script = Path(__file__).parents[1] / "scripts" / "rejudge.py"
    judge = metrics["second_judge"]
    done = subprocess.run(
        [sys.executable, str(script), str(run), str(tmp_path / "eval"), "--judges", f"{judge},tfidf"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    again = json.loads(done.stdout)
    assert again["rows"] == metrics["rows"] and set(again["tfidf"]) == {"full", "random_user", "no_user"}
    for variant in ("full", "random_user", "no_user"):
        for key in ("personalisation_lift", "personalisation_lift_ci", "wins_over_original"):
            assert again[judge][variant][key] == metrics[variant][f"second_judge_{key}"], (variant, key)

    code, out, err = run_cli("creator", "generate", run, "--user", "u1", "--item", "i3", "--n", "1")
    assert code == 0, err
    assert "facts the selector chose for this user:" in out

    code, out, err = run_cli("creator", "infer", run, "--out", tmp_path / "infer")
    assert code == 0, err
    titles = pd.read_parquet(tmp_path / "infer" / "titles.parquet")
    assert len(titles) == CYCLE_ITEMS  # top_n 1: one cluster per item


def test_the_selector_on_rows_without_facts_is_a_one_line_error(faceted, tmp_path):
    rows = pd.read_parquet(faceted["folder"] / "rows" / "rows.parquet").drop(columns=["facts"])
    rows.to_parquet(tmp_path / "rows.parquet")
    code, _, err = run_cli(
        *faceted["args"], f"creator.train.rows={tmp_path / 'rows.parquet'}", f"out_dir={tmp_path}"
    )
    assert_one_line_error(code, err, "--backend grounded")
