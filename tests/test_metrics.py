"""Ranking metrics on a hand-computed 4-user example; tie-honest ranks; history masking."""

import math

import pytest
import torch

from hllm.metrics import mask_history, mrr, ndcg_at_k, recall_at_k, summarize, summarize_buckets, target_ranks

RANKS = torch.tensor([1, 3, 12, 300])


def test_per_user_values_are_float64():
    assert recall_at_k(RANKS, 10).tolist() == [1.0, 1.0, 0.0, 0.0]
    assert ndcg_at_k(RANKS, 50).tolist() == pytest.approx([1.0, 0.5, 1 / math.log2(13), 0.0])
    assert mrr(RANKS).tolist() == pytest.approx([1.0, 1 / 3, 1 / 12, 1 / 300])
    assert recall_at_k(RANKS, 5).dtype == ndcg_at_k(RANKS, 5).dtype == mrr(RANKS).dtype == torch.float64


def test_summarize_four_users():
    summary = summarize(RANKS, [5, 10, 50, 200])
    expected = {
        "recall@5": 0.5,  # ranks 1, 3
        "recall@10": 0.5,
        "recall@50": 0.75,  # + rank 12
        "recall@200": 0.75,  # rank 300 is never a hit
        "ndcg@5": 0.375,  # (1 + 1/log2(4)) / 4
        "ndcg@10": 0.375,
        "ndcg@50": 0.4425595,  # (1 + 0.5 + 1/log2(13)) / 4
        "ndcg@200": 0.4425595,
        "mrr": 0.355,  # (1 + 1/3 + 1/12 + 1/300) / 4 = 1.42 / 4
        "users": 4,
    }
    assert list(summary) == list(expected)
    assert summary == pytest.approx(expected, abs=1e-7)


def test_summarize_rejects_no_users():
    with pytest.raises(ValueError, match="no users"):
        summarize(torch.tensor([], dtype=torch.long), [10])


def test_target_ranks_breaks_ties_by_item_index():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.1, 0.5]]).repeat(4, 1)
    targets = torch.tensor([0, 2, 4, 1])
    # one item higher (0.9), then the tied items with a lower index come first
    assert target_ranks(scores, targets).tolist() == [2, 3, 4, 1]


def test_target_ranks_allows_masked_non_targets():
    scores = torch.tensor([[float("-inf"), 0.2, 0.3, float("-inf")]])
    assert target_ranks(scores, torch.tensor([1])).tolist() == [2]


@pytest.mark.parametrize(
    ("position", "value"),
    [(1, float("nan")), (2, float("nan")), (2, float("inf")), (1, float("-inf"))],
    ids=["nan-target", "nan-other", "posinf-other", "neginf-target"],
)
def test_target_ranks_rejects_nan_and_infinite_scores(position: int, value: float):
    scores = torch.tensor([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]])
    scores[0, position] = value
    with pytest.raises(ValueError, match="rank"):
        target_ranks(scores, torch.tensor([1, 1]))


def test_mask_history_masks_history_and_pad_but_never_the_target():
    scores = torch.arange(12, dtype=torch.float32).reshape(2, 6)
    history = torch.tensor([[3, 1, 3, 0], [0, 0, 0, 2]])
    targets = torch.tensor([3, 5])  # user 0's target repeats a history item
    masked = mask_history(scores, history, targets)
    inf = float("-inf")
    assert masked is scores
    assert masked.tolist() == [[inf, inf, 2.0, 3.0, 4.0, 5.0], [inf, 7.0, inf, 9.0, 10.0, 11.0]]
    assert target_ranks(masked, targets).tolist() == [3, 1]


def test_mask_history_rejects_pad_target():
    with pytest.raises(ValueError, match="padding"):
        mask_history(torch.zeros(1, 4), torch.tensor([[1, 2]]), torch.tensor([0]))


def test_summarize_buckets_flat_keys_and_counts():
    members = {
        "new": torch.tensor([True, False, True, False]),  # ranks 1 and 12
        "tail": torch.tensor([False, False, False, False]),
    }
    summary = summarize_buckets(RANKS, members, [10])
    assert summary["new/users"] == 2
    assert summary["new/recall@10"] == 0.5
    assert summary["new/ndcg@10"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert summary["new/mrr"] == pytest.approx((1 + 1 / 12) / 2)
    assert summary["tail/users"] == 0 and "tail/recall@10" not in summary  # no NaN for an empty bucket
