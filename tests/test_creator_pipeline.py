"""Creator end to end on tiny random models through the real CLI: train (and resume), generate,
infer (and resume after a crash), lookup, evaluate; k-means assignment and top-N pruning; bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from hllm.config import dump_config, load_config
from hllm.creator.evaluate import other_rows, teacher_lift, variant_metrics
from hllm.creator.infer.clusters import assign_clusters, fit_kmeans, top_clusters
from hllm.creator.infer.infer import UserEmbedder, embed_shards, infer, lookup_title, read_embeddings
from hllm.creator.model.dataset import trainable_rows
from hllm.creator.model.model import CreativeLLM
from hllm.creator.model.training import load_creator
from hllm.errors import UserError
from hllm.runs import load_run
from hllm.train import fit
from tests.support import assert_one_line_error, cycle_rows, run_cli, tiny_overrides

CREATOR_YAML = """
name: creator
creator:
  model: {backbone: tiny-llama, mode: lora, lora_rank: 4, max_title_tokens: 12, max_fact_tokens: 16}
  loss: {cls_dim: 16, cls_catalogue_negatives: 4}
  train: {holdout: 0.25}
  infer: {clusters: 4, top_n: 2, threshold: 0.0, shard_users: 10, generate_batch: 4, max_new_tokens: 6}
train: {epochs: 2, batch_size: 8, lr: 3.0e-3, warmup: 0.0, log_every: 1, accelerator: cpu}
"""


@pytest.fixture(scope="module")
def workspace(tiny_run: Path, tmp_path_factory) -> dict:
    """A tiny HLLM run, its rows.parquet and a Creator config over them."""
    folder = tmp_path_factory.mktemp("creator")
    rows = cycle_rows(load_run(tiny_run).data)
    rows.to_parquet(folder / "rows.parquet")
    (folder / "creator.yaml").write_text(CREATOR_YAML)
    overrides = [
        f"out_dir={folder}",
        f"creator.model.hllm_run={tiny_run}",
        f"creator.train.rows={folder / 'rows.parquet'}",
    ]
    return {"folder": folder, "config": folder / "creator.yaml", "overrides": overrides, "rows": rows}


@pytest.fixture(scope="module")
def creator_run(workspace) -> Path:
    """`hllm creator train` for 2 steps, then `--resume` to the end of 2 epochs."""
    args = ("creator", "train", workspace["config"], *workspace["overrides"])
    code, out, err = run_cli(*args, "train.max_steps=2")
    assert code == 0, err
    run = workspace["folder"] / "creator"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["train_state"]["step"] == 2
    code, out, err = run_cli(*args, "--resume")
    assert code == 0, err
    assert "valid loss" in out
    return run


def test_train_writes_the_run_and_resumes_to_the_end(creator_run, workspace):
    state = torch.load(creator_run / "checkpoints" / "last.ckpt", weights_only=False)["train_state"]
    metrics = json.loads((creator_run / "metrics.json").read_text())
    rows = workspace["rows"]
    held_out = json.loads((creator_run / "split.json").read_text())["held_out_users"]
    usable = trainable_rows(rows)  # every row with a profile trains; the kept ones also creative
    training = usable[~usable["user_id"].isin(held_out)]
    assert len(held_out) == 9  # a quarter of 36 users
    assert len(training) > (training["kept"]).sum()  # rejected rows with a profile train too
    assert metrics["train_rows"] == len(training)
    assert state["step"] == 2 * -(-len(training) // 8) and state["epoch"] == 2
    assert [entry["epoch"] for entry in metrics["valid_history"]] == [1, 2]
    saved = (creator_run / "config.yaml").read_text()
    assert saved.count(str(workspace["folder"] / "rows.parquet")) == 1
    assert list(yaml.safe_load(saved)) == ["name", "out_dir", "train", "eval", "creator"]


def test_generate_prints_titles_beside_the_original_and_history(creator_run):
    code, out, err = run_cli("creator", "generate", creator_run, "--user", "u1", "--item", "i3", "--n", "2")
    assert code == 0, err
    assert "black tape" in out  # i3's original title
    assert "most recent items" in out and "for user 2" in out


def test_cluster_assignment_is_the_kmeans_assignment():
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(center, 0.3, (30, 4)) for center in (-3, 0, 3)]).astype(np.float32)
    points[:, 0] *= np.repeat([1.0, 10.0, 0.1], 30)  # clusters of very different norms
    centroids = fit_kmeans(points, 3, iterations=20, restarts=1)
    labels = assign_clusters(points, centroids)
    distances = ((points[:, None, :] - centroids[None]) ** 2).sum(-1)
    assert np.array_equal(labels, distances.argmin(1))
    # the reference's inner-product argmax disagrees on such data: it favours long centroids
    assert not np.array_equal(labels, (points @ centroids.T).argmax(1))


def test_more_clusters_than_users_is_a_user_error():
    with pytest.raises(Exception, match="must not exceed the number of users"):
        fit_kmeans(np.zeros((3, 2), dtype=np.float32), 4)


def test_top_n_pruning_keeps_exactly_the_expected_pairs():
    scores = np.array(
        [
            [0.9, 0.2, 0.6],
            [0.8, 0.9, 0.6],
            [0.1, 0.95, 0.6],
            [0.85, 0.3, 0.1],
        ]
    )
    clusters, items, kept = top_clusters(scores, top_n=2, threshold=0.5)
    # item 0: 0.9 (c0), 0.85 (c3); item 1: 0.95 (c2), 0.9 (c1); item 2: a three-way tie, lowest two
    assert list(zip(clusters, items, strict=True)) == [(0, 0), (3, 0), (2, 1), (1, 1), (0, 2), (1, 2)]
    assert list(kept) == [0.9, 0.85, 0.95, 0.9, 0.6, 0.6]
    clusters, items, kept = top_clusters(scores, top_n=3, threshold=0.92)
    assert (list(clusters), list(items), list(kept)) == ([2], [1], [0.95])
    assert len(top_clusters(scores, top_n=4, threshold=0.99)[0]) == 0


def test_embedding_shards_split_across_ranks_cover_every_user_once(creator_run, tmp_path):
    run = load_creator(creator_run)
    written = [embed_shards(run, tmp_path / "two", rank=rank, world_size=2) for rank in (0, 1)]
    assert written == [2, 2]  # 36 users in shards of 10
    embed_shards(run, tmp_path / "one")
    users, two = read_embeddings(tmp_path / "two", 36)
    _, one = read_embeddings(tmp_path / "one", 36)
    assert list(users) == [str(u) for u in run.hllm.data.user_ids]
    assert np.allclose(one, two, atol=1e-6)
    ray_batch = UserEmbedder.__new__(UserEmbedder)
    ray_batch.run = run
    frame = ray_batch(pd.DataFrame({"user_id": ["u5", "u7"]}))
    assert np.allclose(np.stack(frame["embedding"]), two[[5, 7]], atol=1e-5)


def test_infer_writes_titles_and_assignments_and_lookup_serves_them(creator_run, tmp_path):
    out = tmp_path / "infer"
    code, stdout, err = run_cli("creator", "infer", creator_run, "--out", out, "--items", "i1,i3,i5")
    assert code == 0, err
    titles = pd.read_parquet(out / "titles.parquet")
    assignments = pd.read_parquet(out / "assignments.parquet")
    assert len(assignments) == 36 and set(assignments["cluster"]) <= set(range(4))
    assert len(titles) == 3 * 2 and set(titles["item_id"]) == {"i1", "i3", "i5"}
    assert not titles.duplicated(["cluster", "item_id"]).any()
    assert {"cluster", "item_id", "title", "score", "kept", "reasons"} <= set(titles.columns)
    user = "u2"
    cluster = int(assignments.set_index("user_id").loc[user, "cluster"])
    title, source = lookup_title(out, user, "i3")
    match = titles[(titles["cluster"] == cluster) & (titles["item_id"] == "i3") & titles["kept"]]
    if len(match):
        assert (title, source) == (match["title"].iloc[0], f"cluster {cluster}")
    else:
        assert (title, source) == ("black tape", "original")
    code, stdout, _ = run_cli("creator", "lookup", out, "--user", user, "--item", "i3")
    assert code == 0 and stdout.startswith(title)


def test_infer_resumes_after_a_crash_without_redoing_titles(creator_run, tmp_path, monkeypatch):
    run = load_creator(creator_run)
    items = ["i1", "i2", "i3", "i4", "i5"]  # 5 items x top 2 = 10 pairs, 3 batches of 4
    whole = tmp_path / "whole"
    embed_shards(run, whole)
    infer(run, whole, items=items)
    crashed = tmp_path / "crashed"
    shutil.copytree(whole / "embeddings", crashed / "embeddings")
    calls, crash_at = [], [2]
    real = CreativeLLM.generate

    def counted(self, *args, **kwargs):
        calls.append(len(args[0]))
        if len(calls) in crash_at:
            raise RuntimeError("simulated crash")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(CreativeLLM, "generate", counted)
    with pytest.raises(RuntimeError, match="simulated crash"):
        infer(run, crashed, items=items)
    assert len(list((crashed / "titles").glob("part-*.parquet"))) == 1
    calls.clear()
    crash_at.clear()
    report = infer(run, crashed, items=items)
    assert report["titles_generated"] == 10 - 4 and sum(calls) == 6
    expected = pd.read_parquet(whole / "titles.parquet")
    resumed = pd.read_parquet(crashed / "titles.parquet")
    pd.testing.assert_frame_equal(resumed, expected)


def test_evaluate_reports_every_variant(creator_run, tmp_path):
    out = tmp_path / "eval"
    code, stdout, err = run_cli("creator", "evaluate", creator_run, "--out", out)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rows"] == 9
    for variant in ("full", "random_user", "no_user"):
        assert {"personalisation_lift", "hallucination_rate", "wins_over_original"} <= set(metrics[variant])
        for key in ("hallucination_rate", "wins_over_original"):  # shares of the 9 rows
            rows = metrics[variant][key] * 9
            assert rows == pytest.approx(round(rows)), (variant, key)
    generated = pd.read_parquet(out / "generated.parquet")
    assert (generated["random_user_id"] != generated["user_id"]).all()
    assert "personalisation lift" in stdout


def test_teacher_lift_judges_the_kept_rows_and_an_unchanged_title_lifts_nothing(workspace, tiny_run):
    rows, hllm = workspace["rows"], load_run(tiny_run)
    result = teacher_lift(hllm, rows, ["tfidf", "none"], fact_chars=200, resamples=50)
    assert set(result) == {"rows", "changed", "hllm", "tfidf"}  # "none" judges nothing
    assert result["rows"] == rows["kept"].sum() and result["changed"] == 1.0
    for judge in ("hllm", "tfidf"):
        low, high = result[judge]["personalisation_lift_ci"]
        assert low <= result[judge]["personalisation_lift"] <= high
    unchanged = teacher_lift(
        hllm, rows.assign(personalised_title=rows["original_title"]), ["tfidf"], fact_chars=200
    )
    assert unchanged["changed"] == 0.0
    for judge in ("hllm", "tfidf"):
        assert unchanged[judge]["personalisation_lift"] == pytest.approx(0.0, abs=1e-6)
        assert unchanged[judge]["wins_over_original"] == 0.0


def test_variant_metrics_by_hand():
    own = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    other = own[torch.tensor(other_rows(2, 0))]  # each row's other user is the other row
    titles = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    originals = torch.tensor([[0.6, 0.8], [0.6, 0.8]])
    metrics = variant_metrics(own, other, titles, originals, [True, False], [False, False])
    # gains own: 0.8-0.6=0.2, 1.0-0.8=0.2; other: 0.6-0.8=-0.2, 0.0-0.6=-0.6
    assert metrics["wins_over_original"] == 1.0
    assert metrics["mean_gain"] == pytest.approx(0.2)
    assert metrics["personalisation_lift"] == pytest.approx(((0.2 + 0.2) + (0.2 + 0.6)) / 2)
    assert metrics["hallucination_rate"] == 0.5


def test_a_run_without_an_hllm_checkpoint_is_a_one_line_error(workspace, tiny_run, tmp_path):
    empty = tmp_path / "not-trained"
    empty.mkdir()
    (empty / "config.yaml").write_text((tiny_run / "config.yaml").read_text())  # a run never trained
    args = ("creator", "train", workspace["config"], *workspace["overrides"])
    code, _, err = run_cli(*args, f"creator.model.hllm_run={empty}", f"out_dir={tmp_path}")
    assert_one_line_error(code, err, "no checkpoint")


def test_rows_missing_columns_are_a_one_line_error(workspace, tmp_path):
    workspace["rows"].drop(columns=["interests"]).to_parquet(tmp_path / "rows.parquet")
    args = ("creator", "train", workspace["config"], *workspace["overrides"])
    code, _, err = run_cli(*args, f"creator.train.rows={tmp_path / 'rows.parquet'}", f"out_dir={tmp_path}")
    assert_one_line_error(code, err, "missing column(s) interests")


def test_unknown_item_and_too_many_clusters_are_one_line_errors(creator_run, tmp_path):
    code, _, err = run_cli("creator", "generate", creator_run, "--user", "u1", "--item", "nope")
    assert_one_line_error(code, err, "unknown item id 'nope'")
    bigger = tmp_path / "run"
    shutil.copytree(creator_run, bigger)
    config = load_config(bigger / "config.yaml", ["creator.infer.clusters=37"])
    (bigger / "config.yaml").write_text(dump_config(config))
    code, _, err = run_cli("creator", "infer", bigger, "--out", tmp_path / "out", "--items", "i1")
    assert_one_line_error(code, err, "37 clusters for 36 users")


def test_an_empty_generation_is_a_one_line_error(creator_run, monkeypatch):
    monkeypatch.setattr(CreativeLLM, "generate", lambda self, prompts, *a, **k: [[""] for _ in prompts])
    code, _, err = run_cli("creator", "generate", creator_run, "--user", "u1", "--item", "i3", "--n", "1")
    assert_one_line_error(code, err, "generated an empty title")


def test_a_user_llm_of_another_width_is_a_one_line_error(creator_run, cycle_data, tmp_path):
    fit(
        load_config(
            None,
            [
                *tiny_overrides(cycle_data, tmp_path, name="wide"),
                "model.user.backbone=small-llama-64",
                "train.max_steps=1",
                "train.epochs=1",
            ],
        )
    )
    moved = tmp_path / "creator"
    shutil.copytree(creator_run, moved)
    config = load_config(moved / "config.yaml", [f"creator.model.hllm_run={tmp_path / 'wide'}"])
    (moved / "config.yaml").write_text(dump_config(config))
    code, _, err = run_cli("creator", "generate", moved, "--user", "u1", "--item", "i3")
    assert_one_line_error(code, err, "width 32", "width 64")


def test_hllm_judge_embeds_the_original_title_as_the_catalogue_item(creator_run):
    from hllm.creator.evaluate import TitleScorer

    run = load_creator(creator_run)
    scorer = TitleScorer(run.hllm, run.model.item_table)
    items = ["i1", "i4"]
    originals = [str(run.hllm.data.item_titles[run.hllm.data.item_index(item)]) for item in items]
    embedded = scorer.titles(items, originals)
    rows = torch.tensor([run.hllm.data.item_index(item) for item in items])
    assert torch.allclose(embedded, run.model.item_table[rows], atol=1e-5)
    changed = scorer.titles(items, [f"{title} for science lab" for title in originals])
    assert not torch.allclose(changed, embedded, atol=1e-3)


def test_an_interrupted_training_resumes_exactly(workspace, tmp_path, monkeypatch):
    from hllm.creator.model.training import fit_creator

    def train(name: str, *, resume: bool = False) -> dict:
        overrides = [
            *workspace["overrides"],
            f"out_dir={tmp_path}",
            f"name={name}",
            "train.checkpoint_every=1",
        ]
        fit_creator(load_config(workspace["config"], [*overrides, "train.epochs=1"]), resume=resume)
        return torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=False)

    straight = train("straight")
    real, calls = CreativeLLM.training_loss, []

    def crashing(self, batch):
        calls.append(1)
        if len(calls) == 3:  # two steps done and checkpointed, the third never finishes
            raise RuntimeError("simulated crash")
        return real(self, batch)

    monkeypatch.setattr(CreativeLLM, "training_loss", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train("resumed")
    monkeypatch.setattr(CreativeLLM, "training_loss", real)
    resumed = train("resumed", resume=True)
    rows = trainable_rows(workspace["rows"])
    held_out = json.loads((tmp_path / "straight" / "split.json").read_text())["held_out_users"]
    steps = -(-(~rows["user_id"].isin(held_out)).sum() // 8)  # one epoch of batches of 8
    assert straight["train_state"]["step"] == resumed["train_state"]["step"] == steps >= 3
    for key in ("projector.weight", "matcher.user_tower.weight", "end_token"):
        assert torch.equal(straight["model"][key], resumed["model"][key]), key


def test_patience_stops_a_creator_run_on_the_held_out_loss(workspace, tmp_path, monkeypatch):
    """Held-out losses 2, 1, 1 (a tie: no gain), 1.5: patience 2 stops after epoch 4 of 8, and
    best.ckpt is epoch 2's."""
    from hllm.creator.model import training

    losses = iter([2.0, 1.0, 1.0, 1.5, 0.5])
    monkeypatch.setattr(training, "validation_loss", lambda model, batches, device: {"loss": next(losses)})
    overrides = [*workspace["overrides"], f"out_dir={tmp_path}", "train.epochs=8", "train.patience=2"]
    result = training.fit_creator(load_config(workspace["config"], overrides))
    assert result["epochs"] == 4 and result["best_epoch"] == 2
    assert [entry["loss"] for entry in result["valid_history"]] == [2.0, 1.0, 1.0, 1.5]
    best = torch.load(tmp_path / "creator" / "checkpoints" / "best.ckpt", weights_only=False)
    assert best["train_state"]["epoch"] == 2


def test_creator_trains_under_bf16_autocast_when_asked(workspace, tmp_path, monkeypatch):
    """train.precision=bf16-mixed runs every training loss under CPU bf16 autocast (before the fix
    in epoch.py it silently trained in fp32 on one device) and still learns a finite loss."""
    from hllm.creator.model.training import fit_creator

    real, seen = CreativeLLM.training_loss, []

    def spy(self, batch):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real(self, batch)

    monkeypatch.setattr(CreativeLLM, "training_loss", spy)
    overrides = [*workspace["overrides"], f"out_dir={tmp_path}", "train.precision=bf16-mixed"]
    fit_creator(load_config(workspace["config"], [*overrides, "train.epochs=1"]))
    run = tmp_path / "creator"
    steps = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["train_state"]["step"]
    # every training step under bf16 autocast; the held-out loss (the other calls) stays fp32
    assert steps >= 3 and [dtype for on, dtype in seen if on] == [torch.bfloat16] * steps
    assert len(seen) > steps  # the held-out loss ran too, outside autocast
    metrics = json.loads((run / "metrics.json").read_text())
    assert np.isfinite(metrics["valid_history"][-1]["loss"])


def test_a_second_stage_starts_from_a_creator_run_with_the_lm_frozen(creator_run, workspace, tmp_path):
    """`creator.model.init_from` loads a run's best weights before the first step and
    `creator.train.lm_lr=0` keeps the LM's LoRA weights there while the projector learns (fresh
    LoRA weights could not equal trained ones). A first stage that held out other users is refused:
    this run's held-out users could be ones it trained on."""
    from hllm.creator.model.training import fit_creator

    overrides = [
        *workspace["overrides"],
        f"out_dir={tmp_path}",
        f"creator.model.init_from={creator_run}",
        "creator.train.lm_lr=0",
        "train.max_steps=2",
    ]
    result = fit_creator(load_config(workspace["config"], overrides))
    start = torch.load(creator_run / "checkpoints" / "best.ckpt", weights_only=False)["model"]
    after = torch.load(tmp_path / "creator" / "checkpoints" / "last.ckpt", weights_only=False)["model"]
    lora = [key for key in start if "lora_" in key]
    assert lora and all(torch.equal(after[key], start[key]) for key in lora)
    assert not torch.equal(after["projector.weight"], start["projector.weight"])
    assert result["trainable_params"] == sum(
        value.numel()
        for key, value in start.items()
        if key.startswith(("projector", "matcher", "align", "end"))
    )
    other_split = [*overrides, "creator.train.seed=1", f"out_dir={tmp_path / 'other'}"]
    with pytest.raises(UserError, match="held out other users"):
        fit_creator(load_config(workspace["config"], other_split))
