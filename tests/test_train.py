"""The Fabric loop on tiny random models: learning, exact resume, checkpoints, guard rails."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from hllm import train as train_module
from hllm.checkpoints import FROZEN_ITEM_LLM
from hllm.config import load_config
from hllm.data.dataset import prepare_dataset
from hllm.data.text import pack_items
from hllm.epoch import LOSS_WINDOW, GuardRails, TrainState
from hllm.errors import UserError
from hllm.evaluate import evaluate
from hllm.models.build import build_model, cache_frozen_items, hash_weights
from hllm.models.hllm import HLLM
from hllm.runs import load_run
from hllm.train import fit, launch_fabric, make_batches, make_fabric, record_validation
from hllm.training_log import make_logger
from tests.support import tiny_overrides


def test_overfits_a_deterministic_pattern_to_recall_at_1(cycle_data, tmp_path):
    config = load_config(None, tiny_overrides(cycle_data, tmp_path, train__epochs=40, train__patience=40))
    result = fit(config)
    assert result["test"]["recall@1"] == 1.0
    assert result["valid"]["recall@1"] == 1.0
    saved = json.loads((tmp_path / "tiny" / "metrics.json").read_text())
    assert saved["test"] == result["test"]
    assert saved["protocol"]["items_ranked"] == 12


def test_top_layer_training_learns_over_cached_states(cycle_data, tmp_path):
    """train_layers=1 learns the pattern; the layer below never moves; the cached path encodes items
    as the full Item LLM does from their text."""
    extra = {"model__item__train_layers": 1, "train__in_batch_negatives": "true", "train__epochs": 40}
    config = load_config(None, tiny_overrides(cycle_data, tmp_path, train__patience=40, **extra))
    result = fit(config)
    assert result["test"]["recall@1"] == 1.0
    run = load_run(tmp_path / "tiny")
    fresh, _ = build_model(config, run.data)
    trained, initial = run.model.item_encoder.model.encoder.layer, fresh.item_encoder.model.encoder.layer
    torch.testing.assert_close(trained[0].state_dict(), initial[0].state_dict(), atol=0, rtol=0)
    assert not torch.equal(trained[1].output.dense.weight, initial[1].output.dense.weight)
    ids = torch.arange(run.data.num_items)
    with torch.no_grad():
        cached = run.model.encode_items(ids, None)
        from_text = run.model.encode_items(ids, pack_items(run.item_tokens, ids.numpy()))
    torch.testing.assert_close(cached, from_text, atol=1e-5, rtol=0)


def test_frozen_item_outputs_are_stored_once_under_the_weights_key(cycle_data, tmp_path, monkeypatch):
    """With a store, a frozen Item LLM's catalogue outputs are written once, read back equal to a
    fresh encoding without running the Item LLM, and other weights get an entry of their own."""
    config = load_config(None, tiny_overrides(cycle_data, tmp_path, model__item__mode="frozen"))
    data = prepare_dataset(config.data)
    model, item_tokens = build_model(config, data)
    store = tmp_path / "store"
    cache_frozen_items(model, item_tokens, batch_size=4, device="cpu")
    fresh = model.item_cache.clone()
    cache_frozen_items(model, item_tokens, batch_size=4, device="cpu", store=store)
    torch.testing.assert_close(model.item_cache, fresh, atol=0, rtol=0)
    assert len(list((store / "item-outputs").glob("*.pt"))) == 1

    encoder_forward = model.item_encoder.forward
    monkeypatch.setattr(model.item_encoder, "forward", lambda packed: pytest.fail("re-encoded"))
    model.item_cache = None
    cache_frozen_items(model, item_tokens, batch_size=4, device="cpu", store=store)
    torch.testing.assert_close(model.item_cache, fresh, atol=0, rtol=0)

    monkeypatch.setattr(model.item_encoder, "forward", encoder_forward)
    with torch.no_grad():
        next(model.item_encoder.parameters()).add_(1.0)
    cache_frozen_items(model, item_tokens, batch_size=4, device="cpu", store=store)
    assert not torch.equal(model.item_cache, fresh)
    assert len(list((store / "item-outputs").glob("*.pt"))) == 2


def test_in_batch_negatives_add_the_batch_items_once(cycle_data, tmp_path):
    """The bank: the sampled negatives, then every other item of the batch, each once; a top-layer
    step sends gradient to the top layer only, never from text (the cached states stand in)."""
    extra = {"model__item__train_layers": 1, "train__in_batch_negatives": "true", "train__num_negatives": 3}
    config = load_config(None, tiny_overrides(cycle_data, tmp_path, **extra))
    data = prepare_dataset(config.data)
    model, item_tokens = build_model(config, data)
    cache_frozen_items(model, item_tokens, batch_size=64, device="cpu")
    batch = make_batches(config, data, model, item_tokens)[0]
    assert batch.text is None
    embeddings = model.encode_items(batch.batch_items, None)
    negatives, bank_ids, gather = model._negative_bank(batch, embeddings)
    assert bank_ids[:3].tolist() == batch.negatives.tolist()
    assert sorted(bank_ids.tolist()) == batch.batch_items.tolist()
    assert gather(negatives).shape == (len(batch.batch_items), embeddings.shape[1])
    model.training_loss(batch).backward()
    layers = model.item_encoder.model.encoder.layer
    assert layers[1].output.dense.weight.grad.abs().sum() > 0
    assert layers[0].output.dense.weight.grad is None


@pytest.mark.parametrize("mode", ["finetune", "frozen"])
def test_two_epochs_equal_one_epoch_then_resume(cycle_data, tmp_path, monkeypatch, mode):
    """Also with a frozen Item LLM, which its checkpoints leave out and the resumed run rebuilds."""
    extra = {"train__epochs": 2, "model__item__mode": mode}
    straight = load_config(None, tiny_overrides(cycle_data, tmp_path, name="straight", **extra))
    fit(straight)

    interrupted = load_config(None, tiny_overrides(cycle_data, tmp_path, name="resumed", **extra))
    real_save = train_module.save_checkpoint

    def save_then_die(fabric, path, state, **kwargs):
        real_save(fabric, path, state, **kwargs)
        if path.name == "last.ckpt":
            raise KeyboardInterrupt  # killed right after the first epoch's checkpoint

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        fit(interrupted)
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    fit(interrupted, resume=True)

    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["train_state"]["step"] == b["train_state"]["step"] > 0
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


def test_a_resumed_run_continues_the_csv_log_from_its_checkpoint(cycle_data, tmp_path, monkeypatch):
    """Killed at step 8 before its checkpoint is written (the last one holds step 6): the resumed run
    keeps the rows up to step 6 as they were and logs steps 7 and 8 once more, so each appears once."""
    extra = {"train__epochs": 2, "train__checkpoint_every": 2}  # 4 steps an epoch
    config = load_config(None, tiny_overrides(cycle_data, tmp_path, **extra))
    log = tmp_path / "tiny" / "logs" / "metrics.csv"
    real_save = train_module.save_checkpoint

    def die_at_step_8(fabric, path, state, **kwargs):
        if path.name == "last.ckpt" and state["train_state"]["step"] == 8:
            raise KeyboardInterrupt
        real_save(fabric, path, state, **kwargs)

    monkeypatch.setattr(train_module, "save_checkpoint", die_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        fit(config)
    with open(log, newline="") as f:
        crashed = list(csv.DictReader(f))
    assert [row["step"] for row in crashed] == ["1", "2", "3", "4", "4", "5", "6", "7", "8"]  # 4: valid
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    fit(config, resume=True)

    with open(log, newline="") as f:
        resumed = list(csv.DictReader(f))
    assert [row["step"] for row in resumed] == ["1", "2", "3", "4", "4", "5", "6", "7", "8", "8"]
    assert resumed[:7] == crashed[:7]
    assert resumed[-1]["valid/recall@1"] and not resumed[-2]["valid/recall@1"]


def test_a_resumed_tensorboard_log_hides_the_steps_after_its_checkpoint(tmp_path):
    """Event files are never deleted: the resumed run's events replace those past the checkpoint."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    checkpoint = tmp_path / "last.ckpt"
    for attempt, steps in enumerate([range(1, 9), range(7, 10)]):  # killed after step 8, resumed at 6
        logger = make_logger("tensorboard", tmp_path, checkpoint)
        for step in steps:
            logger.log_metrics({"train/loss": step + attempt / 2}, step)
        logger.finalize("success")
        torch.save({"train_state": {"step": 6}}, checkpoint)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = [(event.step, event.value) for event in events.Scalars("train/loss")]
    assert logged == [(step, step + (step > 6) / 2) for step in range(1, 10)]


@pytest.mark.parametrize("mode", ["finetune", "frozen"])
def test_checkpoint_round_trip_gives_the_same_metrics(cycle_data, tmp_path, mode):
    config = load_config(None, tiny_overrides(cycle_data, tmp_path, train__epochs=2, model__item__mode=mode))
    result = fit(config)
    run = load_run(tmp_path / "tiny")
    again = evaluate(
        run.model,
        run.data,
        "test",
        item_tokens=run.item_tokens,
        ks=[1, 5],
        max_history=config.data.max_history,
    )
    assert again == result["test"]


def test_a_frozen_item_llm_stays_out_of_checkpoints_and_is_checked_on_load(cycle_data, tmp_path):
    """A frozen Item LLM's weights are the config's own: checkpoints keep only their fingerprint,
    and a run rebuilt with other weights is refused in one line instead of scoring with them."""
    config = load_config(None, tiny_overrides(cycle_data, tmp_path, model__item__mode="frozen"))
    fit(config)
    path = tmp_path / "tiny" / "checkpoints" / "best.ckpt"
    saved = torch.load(path, weights_only=False)
    assert saved["model"] and not [name for name in saved["model"] if name.startswith("item_encoder.")]
    run = load_run(tmp_path / "tiny")
    assert saved[FROZEN_ITEM_LLM] == hash_weights(run.model.item_encoder)
    assert any(name.startswith("item_encoder.") for name in run.model.state_dict())  # export needs them

    torch.save(saved | {FROZEN_ITEM_LLM: "0" * 64}, path)
    with pytest.raises(UserError, match="frozen Item LLM .* weights differ"):
        load_run(tmp_path / "tiny")


def test_learns_ml100k_far_beyond_chance(ml100k_small, tmp_path):
    """30 steps on ~50 real users lower the loss and rank the next item far above chance.

    Beating popularity needs pretrained item features (the slow demo test checks that).
    """
    config = load_config(
        None,
        [
            f"data.path={ml100k_small.stats['path']}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.prompt=''",
            "data.max_history=20",
            "model.item.backbone=tiny-bert",
            "model.user.backbone=tiny-llama",
            "model.item.mode=frozen",
            "train.negatives=catalogue",
            "train.max_steps=30",
            "train.epochs=30",
            "train.batch_size=16",
            "train.lr=3e-3",
            "train.log_every=1",
            f"out_dir={tmp_path}",
            "name=ml",
            "train.accelerator=cpu",
            "eval.metric=recall@10",
        ],
    )
    result = fit(config)
    with open(tmp_path / "ml" / "logs" / "metrics.csv") as f:
        losses = [float(row["train/loss"]) for row in csv.DictReader(f) if row["train/loss"]]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    chance = 10 / (ml100k_small.num_items - 1)
    assert result["valid"]["recall@10"] > 5 * chance


@pytest.mark.slow
def test_demo_config_beats_popularity_by_half(tmp_path):
    """The demo's HLLM (pretrained MiniLM) reaches 1.5x popularity's test Recall@10."""
    from hllm.demo import DEMO_CONFIG, run_demo

    result = run_demo(DEMO_CONFIG, [f"out_dir={tmp_path}", f"data.cache_dir={tmp_path / 'c'}"])
    assert result["test"]["recall@10"] >= 1.5 * result["popularity"]["recall@10"]
    saved = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert saved["popularity"] == result["popularity"]


def test_guard_rails_warn_on_collapse_and_a_stuck_loss():
    printed = []

    class FakeFabric:
        def print(self, message):
            printed.append(message)

    starts_parallel = GuardRails(FakeFabric())
    for cosine in (0.97, 0.96, 0.97, 0.98):  # starts parallel, spreads, then closes past its start
        starts_parallel.check({"loss": 6.2, "item_cosine": cosine})
    assert len(printed) == 2
    assert "start nearly parallel" in printed[0] and "collapsing" in printed[1]
    printed.clear()

    guard = GuardRails(FakeFabric())
    for _ in range(2 * LOSS_WINDOW):
        guard.check({"loss": 6.2, "item_cosine": 0.2})
    guard.end_epoch()
    assert len(printed) == 1 and "has not moved" in printed[0]
    guard.check({"loss": 1.0, "item_cosine": 0.99})
    assert "collapsing" in printed[-1]

    printed.clear()
    learning = GuardRails(FakeFabric())
    for step in range(2 * LOSS_WINDOW):
        learning.check({"loss": 6.0 - 0.1 * step, "item_cosine": 0.3})
    learning.end_epoch()
    assert printed == []


def _weights(path):
    return torch.load(path, weights_only=False)["model"]


def test_lora_trains_adapters_and_leaves_the_item_llm_untouched(cycle_data, tmp_path):
    config = load_config(
        None,
        tiny_overrides(
            cycle_data, tmp_path, model__item__mode="lora", train__max_steps=2, train__checkpoint_every=1
        ),
    )
    fit(config)
    run = load_run(tmp_path / "tiny", checkpoint="last")
    trained = _weights(tmp_path / "tiny" / "checkpoints" / "last.ckpt")
    lora = [name for name in trained if "lora_" in name and name.startswith("item_encoder.")]
    assert lora, "no LoRA adapters in the item encoder"
    base = run.model.item_encoder.model.embeddings.word_embeddings.weight
    fresh = load_config(None, tiny_overrides(cycle_data, tmp_path))
    from hllm.models.build import build_model

    untouched, _ = build_model(fresh, run.data)
    assert torch.equal(base, untouched.item_encoder.model.embeddings.word_embeddings.weight)
    assert any(
        not torch.equal(trained[name], torch.zeros_like(trained[name])) for name in lora if "lora_B" in name
    ), "LoRA B matrices never moved from their zero init"


@pytest.mark.parametrize(
    "extra",
    [
        {"train__accumulate": 2, "train__gradient_checkpointing": True},
        {
            "train__precision": "bf16-mixed",
            "model__item__pooling": "token",
            "model__item__backbone": "tiny-llama",
        },
    ],
    ids=["accumulate+checkpointing", "bf16-mixed+decoder-items"],
)
def test_training_options_run_and_count_optimizer_steps(cycle_data, tmp_path, extra, monkeypatch):
    real, autocast = HLLM.training_loss, []

    def spy(self, batch):
        autocast.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return real(self, batch)

    monkeypatch.setattr(HLLM, "training_loss", spy)
    config = load_config(None, tiny_overrides(cycle_data, tmp_path, train__epochs=1, **extra))
    result = fit(config)
    steps_per_epoch = -(-4 // config.train.accumulate)  # 36 windows / batch 8 -> 4 batches
    assert result["train"]["steps"] == steps_per_epoch
    assert all(value == value for value in result["test"].values())  # no NaN metrics
    # bf16-mixed on one device: every training step under bf16 autocast; 32-true: none
    expected = torch.bfloat16 if config.train.precision == "bf16-mixed" else False
    assert len(autocast) == 4 and all(value == expected for value in autocast)


class PrintingFabric:
    """What `record_validation` needs of Fabric: printing and logging, here recorded."""

    def __init__(self) -> None:
        self.printed: list[str] = []
        self.logged: list[dict] = []

    def print(self, message: str) -> None:
        self.printed.append(message)

    def log_dict(self, metrics: dict, step: int) -> None:
        self.logged.append(metrics)


def test_a_tie_is_no_improvement_and_counts_towards_patience():
    fabric, state = PrintingFabric(), TrainState()
    improved = []
    for epoch, value in enumerate([0.2, 0.3, 0.3, 0.1, 0.35], start=1):
        state.epoch = epoch
        improved.append(record_validation(fabric, state, {"recall@1": value}, "recall@1"))
    assert improved == [True, True, False, False, True]
    assert (state.best, state.best_epoch, state.bad_epochs) == (0.35, 5, 0)
    assert [entry["epoch"] for entry in state.valid_history] == [1, 2, 3, 4, 5]
    assert fabric.logged[2] == {"valid/recall@1": 0.3}


def test_a_loss_selects_its_lowest_value_and_no_validation_data_keeps_the_latest():
    fabric, state = PrintingFabric(), TrainState()
    losses = [2.0, 1.0, 1.0, 1.5]
    improved = [record_validation(fabric, state, {"loss": v}, "loss", maximise=False) for v in losses]
    assert improved == [True, True, False, False] and state.bad_epochs == 2
    empty = TrainState(epoch=3, bad_epochs=2)
    assert record_validation(fabric, empty, {}, "loss", maximise=False)
    assert (empty.best_epoch, empty.bad_epochs) == (3, 0)
    with pytest.raises(UserError, match="no 'recall@3'"):
        record_validation(fabric, TrainState(), {"recall@1": 0.5}, "recall@3")


def test_tensorboard_logger_writes_event_files(cycle_data, tmp_path):
    config = load_config(
        None, tiny_overrides(cycle_data, tmp_path, train__max_steps=2, train__logger="tensorboard")
    )
    fit(config)
    assert list((tmp_path / "tiny" / "tensorboard").glob("events.out.tfevents.*"))
    assert not (tmp_path / "tiny" / "logs").exists()


def test_tensorboard_missing_is_a_one_line_error(cycle_data, tmp_path, monkeypatch):
    from lightning.fabric.loggers import tensorboard

    monkeypatch.setattr(tensorboard, "_TENSORBOARD_AVAILABLE", False)
    monkeypatch.setattr(tensorboard, "_TENSORBOARDX_AVAILABLE", False)
    config = load_config(None, tiny_overrides(cycle_data, tmp_path, train__logger="tensorboard"))
    with pytest.raises(UserError, match="pip install tensorboard") as error:
        make_fabric(config, tmp_path / "tiny")
    assert error.value.where == "train.logger"


def test_fabric_errors_are_one_line_user_errors():
    """`launch_fabric` is how every command (training, `hllm creator infer`) starts Fabric."""
    with pytest.raises(UserError) as error:
        launch_fabric("creator.infer.devices", accelerator="cpu", strategy="no-such-strategy")
    assert error.value.where == "creator.infer.devices"
    assert "no-such-strategy" in error.value.message and "\n" not in error.value.message
