"""SASRec through the one training loop: it learns the deterministic cycle to Recall@1 = 1."""

from __future__ import annotations

import torch

from hllm.config import load_config
from hllm.models.sasrec import build_sasrec
from hllm.train import fit
from tests.conftest import tiny_overrides


def test_sasrec_learns_the_cycle_to_recall_at_1(cycle_data, tmp_path):
    overrides = tiny_overrides(
        cycle_data,
        tmp_path,
        model__kind="sasrec",
        model__id__hidden_size=16,
        model__id__dropout=0.0,
        model__id__loss="full",
        train__lr=1e-2,
        train__epochs=12,
        train__patience=12,
    )
    result = fit(load_config(None, overrides))
    assert result["test"]["recall@1"] == 1.0
    assert result["valid"]["recall@1"] == 1.0


def test_attention_reads_earlier_items_only():
    model = build_sasrec(10, 4, width=8, dropout=0.0).eval()
    full = torch.ones(1, 4, dtype=torch.bool)
    states = model.encode_sequence(torch.tensor([[1, 2, 3, 4]]), full)  # (1, 4, 8)
    changed = model.encode_sequence(torch.tensor([[1, 2, 3, 9]]), full)
    torch.testing.assert_close(states[0, :3], changed[0, :3])  # the last item leaks into no earlier slot
    assert not torch.allclose(states[0, 3], changed[0, 3])
