"""CreativeLLM on tiny random models: the [USER] position, each loss against a hand-computed or library
value, cls on one device, padding to the batch's longest sequence, the query-token user embedding."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hllm.config import load_config
from hllm.creator.model.dataset import CreatorBatches, make_examples
from hllm.creator.model.heads import ConcatHead, Matcher, MixerHead
from hllm.creator.model.layout import IGNORE, pad
from hllm.creator.model.losses import (
    align_loss,
    contrast_loss,
    matching_loss,
    sequence_log_likelihood,
    target_token_loss,
)
from hllm.creator.model.training import build_creator
from hllm.runs import load_run
from tests.support import cycle_rows


@pytest.fixture(scope="module")
def hllm_run(tiny_run: Path):
    return load_run(tiny_run)


def tiny_creator(hllm_run, **overrides: object):
    values = {
        "creator.model.backbone": "tiny-llama",
        "creator.model.mode": "full",
        "creator.loss.cls_dim": 16,
        **overrides,
    }
    config = load_config(None, [f"{key}={value}" for key, value in values.items()])
    return build_creator(config, hllm_run)


@pytest.fixture(scope="module")
def creator(hllm_run):
    model = tiny_creator(hllm_run, **{"creator.loss.recon": 1.0, "creator.loss.align": 1.0})
    model.cache_item_table()
    return model


def batches_of(model, hllm_run, rows: pd.DataFrame, **kwargs) -> CreatorBatches:
    examples = make_examples(rows, hllm_run.data, model.layout)
    options = {"batch_size": 4, "max_history": 5, "num_items": hllm_run.data.num_items, **kwargs}
    return CreatorBatches(examples, pad_id=model.layout.placeholder, **options)


def test_user_embedding_lands_at_its_position_and_nowhere_else(creator):
    layout = creator.layout
    prompts = [layout.prompt("red lamp", "a lamp"), layout.prompt("blue pen", "a pen for you")]
    padded = pad(prompts, creator.layout.placeholder, side="left")
    projected = torch.randn(2, creator.projector.out_features)
    embedded = creator.embed(padded, projected)
    plain = creator.lm.get_input_embeddings()(padded.ids)
    for row in range(2):
        user_position = int(padded.user_position[row])
        assert padded.ids[row, user_position] == creator.layout.placeholder
        assert user_position == int((~padded.mask[row]).sum()) + len(
            creator.layout._header
        )  # after the header
        assert torch.equal(embedded[row, user_position], projected[row])
        others = torch.arange(padded.ids.shape[1]) != user_position
        assert torch.equal(embedded[row, others], plain[row, others])


def test_user_embedding_changes_the_output_after_its_position_only(creator):
    padded = pad([creator.layout.prompt("red lamp", "a lamp")], creator.layout.placeholder)
    user_position = int(padded.user_position[0])
    with torch.no_grad():
        first = creator.hidden_states(padded, creator.embed(padded, torch.randn(1, 32)))
        second = creator.hidden_states(padded, creator.embed(padded, torch.randn(1, 32)))
    assert torch.allclose(
        first[0, :user_position], second[0, :user_position]
    )  # causal: the header cannot see the user
    assert not torch.allclose(first[0, user_position:], second[0, user_position:], atol=1e-4)


def test_different_histories_give_different_projected_users(creator):
    history = torch.tensor([[0, 0, 1, 2, 3], [0, 0, 7, 8, 9]])
    projected = creator.projector(creator.user_vectors(history))
    assert projected.shape == (2, creator.projector.out_features)
    assert not torch.allclose(projected[0], projected[1])
    # the projected vector's norm is set near an average token embedding's
    token_norm = creator.lm.get_input_embeddings().weight.detach().norm(dim=-1).mean()
    assert 0.3 < float(projected.detach().norm(dim=-1).mean() / token_norm) < 3


def test_target_token_loss_by_hand():
    # hidden states are the logits themselves (identity head), vocabulary of 3
    hidden = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[IGNORE, 1, 2]])  # position 0 predicts token 1, position 1 predicts 2
    expected = (-math.log(math.exp(0) / (math.exp(2) + 2)) - math.log(1 / (math.e + 2))) / 2
    assert target_token_loss(hidden, labels, nn.Identity()).item() == pytest.approx(expected, rel=1e-6)


def test_creative_and_recon_losses_equal_the_library_loss(creator, hllm_run):
    rows = cycle_rows(hllm_run.data).head(4)
    batch = batches_of(creator, hllm_run, rows, shuffle=False)[0]
    weights = creator.weights
    with torch.no_grad():
        creator.training_loss(batch)
        stats = dict(creator.last_stats)
        projected = creator.projector(creator.user_vectors(batch.history))
        for name, padded in (("creative", batch.creative), ("recon", batch.recon)):
            positions = (padded.mask.long().cumsum(-1) - 1).clamp(min=0)
            reference = creator.lm(
                inputs_embeds=creator.embed(padded, projected),
                attention_mask=padded.mask.long(),
                position_ids=positions,
                labels=padded.labels,
            ).loss
            assert stats[f"{name}_loss"] == pytest.approx(reference.item(), rel=1e-5)
    assert weights.recon == 1.0 and weights.align == 1.0


def test_creative_labels_cover_the_target_title_and_eos_only(creator):
    sequence = creator.layout.creative("red lamp", "a lamp", "red lamp for science lab")
    target = [t for t, label in zip(sequence.ids, sequence.labels, strict=True) if label != IGNORE]
    assert creator.layout.tokenizer.decode(target[:-1]).strip() == "red lamp for science lab"
    assert target[-1] == creator.layout.eos
    assert sequence.labels[: len(sequence.ids) - len(target)] == [IGNORE] * (len(sequence.ids) - len(target))


def test_align_loss_by_hand():
    user = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    profile = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # cosines: diag 1/sqrt2, 1; off 1/sqrt2 (u0,p0)...
    scale = torch.tensor(2.0)
    c = 1 / math.sqrt(2)
    # user -> profile: row 0 positive cos(u0,p0)=c, negative cos(u0,p1)=0; row 1: pos 1, neg cos(u1,p0)=c
    forward = (
        -math.log(math.exp(2 * c) / (math.exp(2 * c) + 1))
        - math.log(math.exp(2) / (math.exp(2) + math.exp(2 * c)))
    ) / 2
    # profile -> user: row 0 positive c, negative cos(p0,u1)=c; row 1 positive 1, negative cos(p1,u0)=0
    backward = (-math.log(1 / 2) - math.log(math.exp(2) / (math.exp(2) + 1))) / 2
    loss = align_loss(user, profile, scale, threshold=0.99)
    assert loss.item() == pytest.approx((forward + backward) / 2, rel=1e-6)


def test_align_loss_masks_duplicate_profiles():
    user = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # two users, one identical profile
    scale = torch.tensor(1.0)
    # user -> profile: the other profile duplicates the positive, so only the positive is left
    # (loss 0); profile -> user: the users differ, row 0 scores 1 vs 0, row 1 scores 0 vs 1
    backward = (-math.log(math.e / (math.e + 1)) - math.log(1 / (1 + math.e))) / 2
    assert align_loss(user, same, scale, threshold=0.99).item() == pytest.approx(backward / 2, rel=1e-6)
    assert align_loss(user, same, scale, threshold=1.01).item() > backward  # no filter: pushed apart


def test_matching_loss_by_hand():
    def head(users, items):
        return (users * items).sum(-1)

    users = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    items = torch.tensor([[3.0, 0.0], [0.0, 1.0]])  # positives: logits 3 and 2
    negatives = torch.tensor([[[1.0, 0.0], [0.0, 5.0]], [[0.0, -1.0], [7.0, 7.0]]])  # logits 1, 0 | -2, 14
    valid = torch.tensor([[True, True], [True, False]])

    def bce(logit: float, label: int) -> float:
        p = 1 / (1 + math.exp(-logit))
        return -math.log(p) if label else -math.log(1 - p)

    expected = (bce(3, 1) + bce(2, 1) + bce(1, 0) + bce(0, 0) + bce(-2, 0)) / 5
    assert matching_loss(head, users, items, negatives, valid).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("head", [ConcatHead(8), MixerHead(8, 2)])
def test_matching_heads_score_each_pair_on_its_own(head):
    users, items = torch.randn(5, 8), torch.randn(5, 8)
    together = head(users, items)
    alone = torch.stack([head(users[i : i + 1], items[i : i + 1])[0] for i in range(5)])
    assert together.shape == (5,) and torch.allclose(together, alone, atol=1e-6)


def test_cls_learns_on_one_process_with_catalogue_negatives(hllm_run):
    weights = {"creative": 0, "recon": 0, "align": 0, "cls": 1}
    model = tiny_creator(hllm_run, **{f"creator.loss.{name}": value for name, value in weights.items()})
    model.cache_item_table()
    rows = cycle_rows(hllm_run.data).head(1)  # batch of one: every negative is from the catalogue
    batches = batches_of(model, hllm_run, rows, batch_size=1, catalogue_negatives=6, seed=1)
    batch = batches[0]
    assert batch.negatives.shape == (1, 6)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=3e-3)
    losses = []
    for _ in range(60):
        loss = model.training_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert set(model.last_stats) == {"cls_loss"}
    # 1 positive and 6 negatives a head cannot tell apart cost their label entropy, 0.41:
    # below it, the head separates the user's item from the catalogue's
    floor = -(math.log(1 / 7) + 6 * math.log(6 / 7)) / 7
    assert losses[0] > 0.5 * floor and losses[-1] < 0.5 * floor


def test_batches_pad_to_their_longest_sequence_and_mark_bad_negatives(creator, hllm_run):
    rows = cycle_rows(hllm_run.data)
    rows.loc[1, "item_id"] = rows.loc[0, "item_id"]  # two rows share an item: not each other's negative
    rows.loc[1, "original_title"] = rows.loc[0, "original_title"]
    batches = batches_of(creator, hllm_run, rows, shuffle=False, catalogue_negatives=3)
    batch = batches[0]
    lengths = batch.creative.mask.sum(-1)
    assert batch.creative.ids.shape[1] == int(lengths.max()) < 100  # the longest row, never a fixed length
    assert batch.negatives.shape == (4, 3 + 3)
    assert not batch.valid[0, 0]  # row 0's first in-batch negative is row 1's item, the same item
    for row in range(4):
        history = set(batch.history[row].tolist())
        for item, ok in zip(batch.negatives[row].tolist(), batch.valid[row].tolist(), strict=True):
            assert ok == (item != int(batch.items[row]) and item not in history)


def test_batches_are_the_same_for_the_same_epoch(creator, hllm_run):
    batches = batches_of(creator, hllm_run, cycle_rows(hllm_run.data), seed=3)
    batches.set_epoch(2)
    first = batches[1]
    batches.set_epoch(0)
    batches.set_epoch(2)
    again = batches[1]
    assert torch.equal(first.creative.ids, again.creative.ids)
    assert torch.equal(first.negatives, again.negatives)


@pytest.mark.parametrize("count", [10, 11])
def test_each_rank_reads_its_own_share_of_the_examples(creator, hllm_run, count):
    """Two ranks cover every example once (one comes twice when the count is odd) in as many
    batches each, so no process waits on another for a gradient sync."""
    rows = pd.concat([cycle_rows(hllm_run.data)] * 3, ignore_index=True).iloc[:count]
    shares = [batches_of(creator, hllm_run, rows, seed=3, rank=rank, world_size=2) for rank in (0, 1)]
    for share in shares:
        share.set_epoch(1)
        read = [int(item) for index in range(len(share)) for item in share[index].items]
        assert read == [share.examples[i].item for i in share.order]  # the batches follow the share
    assert len(shares[0]) == len(shares[1]) == 2
    times = np.bincount(np.concatenate([share.order for share in shares]), minlength=count)
    assert times.min() == 1 and times.sum() == count + count % 2


def test_query_token_embedding_trains_and_differs_from_the_last_position(hllm_run):
    model = tiny_creator(hllm_run, **{"creator.model.user_embedding": "query"})
    model.cache_item_table()
    history = torch.tensor([[0, 0, 1, 2, 3]])
    last = F.normalize(
        model.hllm.user_encoder.last_state(model.item_vectors(history), history != 0).float(), dim=-1
    )
    users = model.user_vectors(history)
    assert not torch.allclose(users, last)
    users.sum().backward()
    assert model.query.grad is not None and model.query.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.hllm.parameters())  # the HLLM stays frozen


def test_matcher_scores_every_pair(creator):
    matcher = Matcher(6, 4, dim=8, head="mixer")
    users, items = torch.randn(3, 6), torch.randn(5, 4)
    scores = matcher.score_all(users, items, pairs_per_pass=4)
    assert scores.shape == (3, 5)
    with torch.no_grad():
        expected = matcher(users[2:3], items[4:5]).sigmoid()
    assert scores[2, 4].item() == pytest.approx(expected.item(), rel=1e-5)


def test_full_training_loss_backpropagates_into_projector_and_lm(creator, hllm_run):
    batch = batches_of(creator, hllm_run, cycle_rows(hllm_run.data))[0]
    creator.zero_grad()
    loss = creator.training_loss(batch)
    loss.backward()
    assert set(creator.last_stats) == {"creative_loss", "recon_loss", "align_loss", "cls_loss"}
    parts = creator.last_stats
    expected = parts["creative_loss"] + parts["recon_loss"] + parts["align_loss"] + 0.5 * parts["cls_loss"]
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert creator.projector.weight.grad.abs().sum() > 0
    assert creator.end_token.grad.abs().sum() > 0
    assert creator.lm.get_input_embeddings().weight.grad.abs().sum() > 0
    creator.zero_grad()


def test_sequence_log_likelihood_and_contrast_loss_by_hand():
    hidden = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]] * 3])
    labels = torch.tensor([[IGNORE, 1, 2], [IGNORE, IGNORE, IGNORE]])  # row 1 has no target
    first = math.log(1 / (math.exp(2) + 2)) + math.log(1 / (math.e + 2))
    totals = sequence_log_likelihood(hidden, labels, nn.Identity())
    torch.testing.assert_close(totals, torch.tensor([first, 0.0]))
    own, other = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(2.0))) / 2  # -log sigmoid(own - other)
    assert contrast_loss(own, other).item() == pytest.approx(expected, rel=1e-6)


def contrast_rows(data) -> pd.DataFrame:
    """cycle_rows with a contrast title: another user's title on kept rows, a copy of its own on row 1."""
    rows = cycle_rows(data)
    rows["contrast_title"] = rows["original_title"] + " for another reader"
    rows.loc[1, "contrast_title"] = rows.loc[1, "personalised_title"]  # the same title: no contrast
    return rows


def test_contrast_sequences_hold_another_users_title_on_kept_rows_only(creator, hllm_run):
    rows = contrast_rows(hllm_run.data)
    examples = make_examples(rows, hllm_run.data, creator.layout)
    layout = creator.layout
    for row, example in zip(rows.itertuples(), examples, strict=True):
        if row.kept and row.Index != 1:
            expected = layout.creative(row.original_title, row.selling_points, row.contrast_title)
        else:
            expected = layout.prompt(row.original_title, row.selling_points)  # the prompt alone
        assert example.contrast == expected
    plain = make_examples(cycle_rows(hllm_run.data), hllm_run.data, creator.layout)  # no column: none
    assert all(all(label == IGNORE for label in e.contrast.labels) for e in plain)


def test_contrast_loss_trains_the_user_projector(hllm_run):
    model = tiny_creator(hllm_run, **{"creator.loss.contrast": 2.0, "creator.loss.cls": 0.0})
    model.cache_item_table()
    batch = batches_of(model, hllm_run, contrast_rows(hllm_run.data), shuffle=False)[0]
    loss = model.training_loss(batch)
    loss.backward()
    parts = model.last_stats
    assert set(parts) == {"creative_loss", "recon_loss", "align_loss", "contrast_loss"}
    expected = parts["creative_loss"] + 0.5 * parts["recon_loss"] + 0.1 * parts["align_loss"]
    assert loss.item() == pytest.approx(expected + 2.0 * parts["contrast_loss"], rel=1e-5)
    assert model.projector.weight.grad.abs().sum() > 0
    off = batches_of(model, hllm_run, cycle_rows(hllm_run.data), shuffle=False)[0]  # no contrast titles
    model.training_loss(off)
    assert "contrast_loss" not in model.last_stats


def test_contrast_loss_is_chance_when_the_user_adds_nothing(hllm_run):
    """The loss compares what the user adds to each title over the no-user reference: a user
    position that holds what it holds without a user adds nothing, whatever the titles' own odds."""
    model = tiny_creator(hllm_run, **{"creator.loss.contrast": 1.0, "creator.loss.cls": 0.0})
    model.cache_item_table()
    placeholder = model.lm.get_input_embeddings().weight[model.layout.placeholder].detach()

    class Placeholder(nn.Module):
        def forward(self, users: torch.Tensor) -> torch.Tensor:
            return placeholder.expand(len(users), -1)

    model.projector = Placeholder()
    batch = batches_of(model, hllm_run, contrast_rows(hllm_run.data), shuffle=False)[0]
    with torch.no_grad():
        model.training_loss(batch)
    assert model.last_stats["contrast_loss"] == pytest.approx(math.log(2), abs=1e-5)
