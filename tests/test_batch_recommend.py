"""Batch recommendations: every user once, sharded runs equal one process, a killed run resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from hllm.evaluate import item_table, recommend_items
from hllm.runs import load_run
from hllm.serving import batch
from hllm.serving.batch import SETTINGS, recommend_all
from hllm.serving.export import load_artifact
from tests.support import assert_one_line_error, copy_artifact, run_cli

USERS = 36  # CYCLE_USERS
SHARD = 10  # -> 4 shards, the last one short


def read_all(out: Path) -> pd.DataFrame:
    parts = sorted(out.glob("part-*.parquet"))
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)


@pytest.fixture(scope="module")
def single(tiny_run, tmp_path_factory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("batch") / "single"
    summary = recommend_all(tiny_run, out, k=3, shard_users=SHARD, rank=0, world_size=1)
    assert summary | {"users_per_s": None} == {
        "users": USERS,
        "shards": 4,
        "written": 4,
        "skipped": 0,
        "users_per_s": None,
    }
    return read_all(out)


def test_every_user_once_with_top_k_matching_recommend(single, tiny_run):
    assert len(single) == USERS and single["user_id"].is_unique
    run = load_run(tiny_run)
    table = item_table(run.model, run.data.num_items, run.item_tokens, batch_size=64)
    for u in (0, 17, 35):  # the one-user path of `hllm recommend --user` ranks the same items
        row = single[single["user_id"] == str(run.data.user_ids[u])].iloc[0]
        history = run.data.sequence(u).tolist()
        expected, scores = recommend_items(run.model, table, history, k=3, max_history=5)
        assert list(row["item_ids"]) == [str(run.data.item_ids[i]) for i in expected]
        assert list(row["scores"]) == pytest.approx(scores, abs=1e-5)
        assert not set(row["item_ids"]) & {str(run.data.item_ids[i]) for i in history}


def test_two_ranks_write_what_one_process_writes(single, tiny_run, tmp_path):
    out = tmp_path / "sharded"
    first = recommend_all(tiny_run, out, k=3, shard_users=SHARD, rank=0, world_size=2)
    assert first["shards"] == 2 and sorted(p.name for p in out.glob("part-*")) == [
        "part-00000.parquet",
        "part-00002.parquet",
    ]
    recommend_all(tiny_run, out, k=3, shard_users=SHARD, rank=1, world_size=2)
    pd.testing.assert_frame_equal(read_all(out), single)


def test_a_killed_run_resumes_without_redoing_shards(single, tiny_run, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    real, calls = batch.score_users, []

    def dies_in_shard_two(source, users, k):
        calls.append(len(users))
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a kill in the middle of the third shard
        return real(source, users, k)

    monkeypatch.setattr(batch, "score_users", dies_in_shard_two)
    with pytest.raises(KeyboardInterrupt):
        recommend_all(tiny_run, out, k=3, shard_users=SHARD, rank=0, world_size=1)
    assert sorted(p.name for p in out.iterdir()) == [
        "part-00000.parquet",
        "part-00001.parquet",
        "settings.json",
    ]
    finished = {p: p.stat().st_mtime_ns for p in out.glob("part-*")}
    monkeypatch.setattr(batch, "score_users", real)
    summary = recommend_all(tiny_run, out, k=3, shard_users=SHARD, rank=0, world_size=1)
    assert (summary["written"], summary["skipped"]) == (2, 2)
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in finished.items())  # not rewritten
    pd.testing.assert_frame_equal(read_all(out), single)


def test_other_settings_are_refused_in_the_same_folder(tiny_run, tmp_path):
    recommend_all(tiny_run, tmp_path / "o", k=3, shard_users=SHARD, rank=0, world_size=1)
    code, _, err = run_cli("recommend", tiny_run, "--all-users", "--out", tmp_path / "o", "-k", "4")
    assert_one_line_error(code, err, "other settings")


def test_cli_from_an_artifact_with_a_users_file(tiny_artifact, tmp_path):
    tiny_artifact = copy_artifact(tiny_artifact, tmp_path / "artifact")  # its HNSW index is saved beside it
    artifact = load_artifact(tiny_artifact, verify=False)
    wanted = artifact.users[:3]
    (tmp_path / "users.txt").write_text("\n".join(wanted) + "\n\n", encoding="utf-8")
    out = tmp_path / "recs"
    code, stdout, err = run_cli(
        "recommend",
        tiny_artifact,
        "--users",
        tmp_path / "users.txt",
        "--out",
        out,
        "-k",
        "2",
        "--index",
        "hnsw",
        "--set",
        "serve.hnsw_ef_search=77",
    )
    assert code == 0, err
    settings = json.loads((out / SETTINGS).read_text())
    assert settings["kind"] == "hnsw" and settings["hnsw_ef_search"] == 77
    assert json.loads(stdout.splitlines()[-1])["users"] == 3
    frame = read_all(out)
    assert frame["user_id"].tolist() == wanted
    assert all(len(ids) == 2 and len(scores) == 2 for ids, scores in zip(frame["item_ids"], frame["scores"]))
    catalogue = set(artifact.item_ids[1:])
    assert all(set(ids) <= catalogue for ids in frame["item_ids"])


def test_bad_batch_requests_are_one_line(tiny_run, tmp_path):
    (tmp_path / "users.txt").write_text("u1\nnobody\n", encoding="utf-8")
    code, _, err = run_cli("recommend", tiny_run, "--users", tmp_path / "users.txt", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "nobody", "users.txt:2")
    code, _, err = run_cli("recommend", tiny_run, "--all-users")
    assert_one_line_error(code, err, "--out DIR")
    code, _, err = run_cli("recommend", tiny_run, "--all-users", "--out", tmp_path / "o", "--index", "hnsw")
    assert_one_line_error(code, err, "export it", "--index")
    code, _, err = run_cli(
        "recommend", tiny_run, "--all-users", "--out", tmp_path / "o", "--set", "serve.k=3"
    )
    assert_one_line_error(code, err, "artifact", "--set")
