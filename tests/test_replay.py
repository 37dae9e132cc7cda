"""Online equals offline: a tiny run trained without its new items, served without them, the new
items added through POST /items, the test users replayed through POST /recommend."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from hllm.config import load_config
from hllm.evaluate import evaluate_split
from hllm.runs import load_run
from hllm.serving.app import create_app
from hllm.serving.export import export_run, load_artifact
from hllm.serving.replay import add_items, drop_items, item_fields, replay_users, served_rank
from hllm.train import fit
from tests.support import tiny_overrides


@pytest.fixture(scope="module")
def cold_run(cycle_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step tiny HLLM trained with a quarter of the cycle's items held out as new."""
    out = tmp_path_factory.mktemp("cold-run")
    overrides = ["data.cold_items=0.25", "train.max_steps=4", "train.epochs=1"]
    fit(load_config(None, [*tiny_overrides(cycle_data, out), *overrides]))
    return out / "tiny"


def test_served_new_items_score_as_offline(cold_run, tmp_path):
    run = load_run(cold_run)
    new = [str(run.data.item_ids[i]) for i in run.data.holdout.held_out]
    offline = evaluate_split(run.config, run.model, run.data, run.item_tokens, "test")
    assert len(new) == 3 and offline["new/users"] > 0  # some test targets are new items

    served_folder = drop_items(export_run(cold_run, tmp_path / "artifact"), tmp_path / "served", set(new))
    client = TestClient(create_app(load_artifact(served_folder)))
    assert client.get("/health").json()["items"] == run.data.num_items - 1 - len(new)
    add_items(client, new, item_fields(run.config.data, new, run.data.stats["text_fields"]))
    assert client.get("/health").json()["items"] == run.data.num_items - 1

    online = replay_users(client, run.data, run.config.eval.ks)
    assert online["users"] == offline["users"]
    for key, value in online.items():
        assert value == pytest.approx(offline[key], abs=1e-4), key


def test_a_served_tie_ranks_by_catalogue_index_as_offline(cold_run):
    """Items of identical text score alike; the server may list them in any order, the rank
    follows the evaluator: higher scores first, then ties of lower catalogue index."""
    data = load_run(cold_run).data
    first, second, third = (str(data.item_ids[i]) for i in (1, 2, 3))
    served = [{"id": third, "score": 0.9}, {"id": second, "score": 0.5}, {"id": first, "score": 0.5}]
    assert served_rank(served, data, target=2, depth=10) == 3  # item 1 ties and comes first
    assert served_rank(served, data, target=1, depth=10) == 2
    assert served_rank(served, data, target=3, depth=10) == 1
    assert served_rank(served, data, target=4, depth=10) == 11  # not served: a miss
