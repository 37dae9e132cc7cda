"""SASRec: attention reads earlier items only."""

from __future__ import annotations

import torch

from hllm.models.sasrec import build_sasrec


def test_attention_reads_earlier_items_only():
    model = build_sasrec(10, 4, width=8, dropout=0.0).eval()
    full = torch.ones(1, 4, dtype=torch.bool)
    states = model.encode_sequence(torch.tensor([[1, 2, 3, 4]]), full)  # (1, 4, 8)
    changed = model.encode_sequence(torch.tensor([[1, 2, 3, 9]]), full)
    torch.testing.assert_close(states[0, :3], changed[0, :3])  # the last item leaks into no earlier position
    assert not torch.allclose(states[0, 3], changed[0, 3])
