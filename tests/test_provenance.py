"""The committed benchmark records can be checked: each one's protocol card carries the hash of the
config stored with it, and the recipe files of configs/bench/ still produce those configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hllm.bench.run import record_config
from hllm.config import config_to_dict
from hllm.files import hash_json

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
RECORDS = ("results.json", "tuning.json", "ablations.json")
PLACES = {"data.path", "data.cache_dir", "out_dir"}


def load(name: str) -> list[dict]:
    return json.loads((BENCHMARKS / name).read_text())


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out |= flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value}
    return out


@pytest.mark.parametrize("name", RECORDS)
def test_every_committed_record_hashes_to_its_own_config(name):
    records = load(name)
    assert records
    for record in records:
        assert hash_json(record["config"]) == record["protocol"]["config_hash"], (
            f"{name}: {record['dataset']} {record['model']} seed {record['seed']}"
        )


@pytest.mark.parametrize("name", ["results.json", "ablations.json"])
def test_the_unverified_records_are_those_that_fail_the_check(name):
    unverified = json.loads((BENCHMARKS / "unverified" / name).read_text())
    assert unverified
    assert all(hash_json(r["config"]) != r["protocol"]["config_hash"] for r in unverified)


@pytest.mark.parametrize("name", ["results.json", "tuning.json"])
def test_the_recipe_files_reproduce_every_committed_config(name):
    """What a user reads in configs/bench/ is what produced the numbers: every key both the
    record's config and today's schema have, except where the files were (data.path, out_dir) and
    serve.* (defaults changed since; no benchmark reads them)."""
    for record in load(name):
        tuning = record.get("tuning", {})
        config = record_config(
            record["dataset"],
            record["model"],
            record["seed"],
            BENCHMARKS,
            quick=record["quick"],
            extra=record.get("overrides", tuning.get("chosen", [])),
            tag=record.get("tag", tuning.get("tag", "")),
        )
        ours, theirs = flat(config_to_dict(config)), flat(record["config"])
        compared = {key for key in ours.keys() & theirs.keys() - PLACES if not key.startswith("serve.")}
        assert {key: ours[key] for key in compared} == {key: theirs[key] for key in compared}, record["model"]


PRE_FIX_CACHE = "/work/main/.hllm_cache"  # where the protocol runs before the fix kept their cache


@pytest.mark.parametrize("folder", ["new-items", "temporal"])
@pytest.mark.parametrize("name", ["results.json", "tuning.json"])
def test_protocol_records_hash_to_their_config_or_differ_only_by_the_cache_dir(folder, name):
    """Protocol records written since the fix hash to their stored config. Those written before it
    (BENCHMARKS.md says which) stored `data.cache_dir` relative while their card hashed it absolute:
    made absolute, their config hashes to the card, so nothing else differs."""
    records = load(f"{folder}/{name}")
    assert records
    for record in records:
        config, card = record["config"], record["protocol"]["config_hash"]
        if hash_json(config) == card:
            continue
        assert config["data"]["cache_dir"] == ".hllm_cache", (
            record["dataset"],
            record["model"],
            record["seed"],
        )
        absolute = {**config, "data": {**config["data"], "cache_dir": PRE_FIX_CACHE}}
        assert hash_json(absolute) == card, (record["dataset"], record["model"], record["seed"])
