"""InfoNCE and full-catalogue softmax against hand-computed values; LogitScale clamping."""

import math

import pytest
import torch
import torch.nn.functional as F

from hllm.models.losses import LogitScale, binary_cross_entropy, catalogue_softmax, info_nce

# Two rows in 2-D. Normalised: users (1,0), (0,1); targets (1,1)/sqrt2, (0,1);
# negatives (1,0), (0,1), (-1,0). Row 1's target equals negative 1, so the filter masks it there.
USER = [[1.0, 0.0], [0.0, 2.0]]
TARGET = [[1.0, 1.0], [0.0, 1.0]]
NEGATIVES = [[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]]


def _tensors(requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor(x, requires_grad=requires_grad) for x in (USER, TARGET, NEGATIVES))


def test_info_nce_matches_hand_computed_loss():
    s, r = 10.0, 1 / math.sqrt(2)
    # row 0: positive cos = r, negatives cos = 1, 0, -1, none masked (target cos r, r, -r)
    loss0 = -s * r + math.log(math.exp(s * r) + math.exp(s) + math.exp(0.0) + math.exp(-s))
    # row 1: positive cos = 1, negatives cos = 0, [1 masked], 0
    loss1 = -s + math.log(math.exp(s) + math.exp(0.0) + math.exp(0.0))
    out = info_nce(*_tensors(), torch.tensor(s))
    assert out.loss.item() == pytest.approx((loss0 + loss1) / 2, rel=1e-6)
    assert out.accuracy == 0.5  # row 0's positive (7.07) loses to negative 0 (10)
    assert out.top_k_accuracy == {1: 0.5}  # row width 4: larger ks are skipped
    assert out.negatives_kept == 2.5  # 3 in row 0, 2 in row 1


def test_filter_removes_duplicate_of_target_but_keeps_a_different_negative():
    user, target, s = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.6, 0.8]]), 5.0
    near = torch.tensor([[0.6, 0.8001]])  # cosine with the target > 0.99
    other = torch.tensor([[0.8, 0.6]])  # cosine 0.96: a different item, kept
    out = info_nce(user, target, torch.cat([near, other]), torch.tensor(s))
    expected = -s * 0.6 + torch.logsumexp(torch.tensor([s * 0.6, s * 0.8]), 0).item()
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.negatives_kept == 1.0


def test_row_with_every_negative_masked_has_finite_loss_and_gradients():
    user, target = torch.randn(1, 4, requires_grad=True), torch.randn(1, 4, requires_grad=True)
    negatives = target.detach().repeat(3, 1).requires_grad_()
    log_scale = torch.tensor(2.0, requires_grad=True)
    out = info_nce(user, target, negatives, log_scale.exp())
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.negatives_kept == 0.0
    for grad in (user.grad, target.grad, negatives.grad, log_scale.grad):
        assert torch.isfinite(grad).all()


def test_gradients_reach_inputs_and_log_scale():
    user, target, negatives = _tensors(requires_grad=True)
    logit_scale = LogitScale()
    info_nce(user, target, negatives, logit_scale()).loss.backward()
    for grad in (user.grad, target.grad, negatives.grad, logit_scale.log_scale.grad):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_zero_vector_gives_no_nan():
    user, target, _ = _tensors(requires_grad=True)
    negatives = torch.tensor([[0.0, 0.0], [1.0, 0.0]], requires_grad=True)
    out = info_nce(user, target, negatives, torch.tensor(10.0))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(negatives.grad).all()


def test_bf16_inputs_are_computed_in_fp32():
    user, target, negatives = (torch.randn(4, 8).bfloat16() for _ in range(3))
    out = info_nce(user, target, negatives, torch.tensor(20.0, dtype=torch.bfloat16))
    assert out.loss.dtype == torch.float32
    reference = info_nce(user.float(), target.float(), negatives.float(), torch.tensor(20.0))
    assert out.loss.item() == pytest.approx(reference.loss.item(), rel=1e-6)


def test_custom_gather_builds_the_bank_once_and_passes_gradients():
    calls = []

    def double(bank: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(bank.shape))
        return torch.cat([bank, bank])

    user, target, negatives = _tensors(requires_grad=True)
    s, r = 10.0, 1 / math.sqrt(2)
    out = info_nce(user, target, negatives, torch.tensor(s), gather=double)
    out.loss.backward()
    assert calls == [(3, 2)]
    # every negative appears twice: same hand computation as above with doubled terms
    loss0 = -s * r + math.log(math.exp(s * r) + 2 * (math.exp(s) + 1 + math.exp(-s)))
    loss1 = -s + math.log(math.exp(s) + 4)
    assert out.loss.item() == pytest.approx((loss0 + loss1) / 2, rel=1e-6)
    assert out.negatives_kept == 5.0
    assert negatives.grad.abs().sum() > 0


def test_catalogue_softmax_matches_manual_cross_entropy_without_pad():
    generator = torch.Generator().manual_seed(0)
    user = torch.randn(3, 4, generator=generator, requires_grad=True)
    table = torch.randn(6, 4, generator=generator, requires_grad=True)
    with torch.no_grad():
        table[0] = user[0] * 5  # PAD row: would be the best logit if it were a candidate
    targets, s = torch.tensor([2, 5, 1]), 7.0
    logits = F.normalize(user, dim=-1) @ F.normalize(table, dim=-1).T * s  # (3, 6)
    expected = F.cross_entropy(logits[:, 1:], targets - 1)  # PAD column dropped
    out = catalogue_softmax(user, table, targets, torch.tensor(s))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.negatives_kept == 4.0  # 6 items - PAD - target
    out.loss.backward()
    assert torch.isfinite(table.grad).all() and table.grad.abs().sum() > 0


def test_catalogue_softmax_scores_each_rows_own_positive():
    """`positives` replaces each row's target column only: the rest of the table is untouched."""
    generator = torch.Generator().manual_seed(1)
    user, table = torch.randn(2, 4, generator=generator), torch.randn(5, 4, generator=generator)
    positives = torch.randn(2, 4, generator=generator, requires_grad=True)
    targets, s = torch.tensor([3, 3]), 5.0
    logits = F.normalize(user, dim=-1) @ F.normalize(table, dim=-1).T  # (2, 5)
    logits[:, 3] = (F.normalize(user, dim=-1) * F.normalize(positives, dim=-1)).sum(-1)
    expected = F.cross_entropy(logits[:, 1:] * s, targets - 1)
    out = catalogue_softmax(user, table, targets, torch.tensor(s), positives=positives)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    out.loss.backward()
    assert positives.grad.abs().sum() > 0


def test_catalogue_softmax_leaves_excluded_items_out_of_the_softmax():
    """An excluded item (a new item of the protocol) is no negative: the loss is the loss over the
    table without it, and its row gets no gradient."""
    generator = torch.Generator().manual_seed(2)
    user = torch.randn(3, 4, generator=generator)
    table = torch.randn(6, 4, generator=generator, requires_grad=True)
    targets, scale = torch.tensor([1, 2, 5]), torch.tensor(5.0)
    excluded = torch.tensor([False, False, False, True, False, False])
    out = catalogue_softmax(user, table, targets, scale, excluded=excluded)
    kept = [0, 1, 2, 4, 5]
    without = catalogue_softmax(user, table.detach()[kept], torch.tensor([1, 2, 4]), scale)
    assert out.loss.item() == pytest.approx(without.loss.item(), rel=1e-6)
    assert out.negatives_kept == 3.0  # 6 items - PAD - the new item - the target
    out.loss.backward()
    assert table.grad[3].abs().sum() == 0 and table.grad[4].abs().sum() > 0


def test_catalogue_softmax_rejects_pad_target():
    with pytest.raises(ValueError, match="padding"):
        catalogue_softmax(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 3]), torch.tensor(1.0))


def test_logit_scale_init_and_clamp():
    logit_scale = LogitScale()
    assert logit_scale().item() == pytest.approx(1 / 0.07, abs=1e-6)
    assert logit_scale.temperature == pytest.approx(0.07, rel=1e-6)
    with torch.no_grad():
        logit_scale.log_scale.fill_(7.0)
    assert logit_scale().item() == pytest.approx(100.0, rel=1e-6)
    assert logit_scale.log_scale.item() == pytest.approx(math.log(100.0), rel=1e-6)
    with torch.no_grad():
        logit_scale.log_scale.fill_(-3.0)
    assert logit_scale().item() == 1.0


def test_fixed_logit_scale_is_a_buffer():
    logit_scale = LogitScale(0.05, learnable=False)
    assert list(logit_scale.parameters()) == []
    assert "log_scale" in logit_scale.state_dict()
    assert logit_scale().item() == pytest.approx(20.0, rel=1e-6)


def test_logit_scale_rejects_temperature_outside_clamp():
    with pytest.raises(ValueError, match="temperature"):
        LogitScale(0.001)


def test_excluded_negatives_are_masked_per_row():
    user = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    target = user.clone()
    negatives = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    excluded = torch.tensor([[True, False, False], [False, False, False]])
    out = info_nce(user, target, negatives, torch.tensor(1.0), excluded=excluded)
    # row 0 keeps negatives 1 (its own target: filtered at cos 1) -> only 2; row 1 loses 0 by
    # the duplicate filter and keeps 1 and 2
    row0 = torch.tensor([1.0, 0.6])
    row1 = torch.tensor([1.0, 0.0, 0.8])
    expected = ((torch.logsumexp(row0, 0) - 1.0) + (torch.logsumexp(row1, 0) - 1.0)) / 2
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert out.negatives_kept == 1.5


def test_binary_cross_entropy_matches_hand_computed_loss():
    user = torch.tensor([[1.0, 2.0], [0.5, -1.0]], requires_grad=True)
    target = torch.tensor([[1.0, 0.0], [0.0, -2.0]])  # dot products 1.0 and 2.0
    negative = torch.tensor([[0.0, 1.0], [2.0, 0.0]])  # dot products 2.0 and 1.0

    def log_sigmoid(x: float) -> float:
        return -math.log(1 + math.exp(-x))

    # -log sigmoid(positive) - log(1 - sigmoid(negative)), averaged over the two rows
    row0 = -log_sigmoid(1.0) - log_sigmoid(-2.0)
    row1 = -log_sigmoid(2.0) - log_sigmoid(-1.0)
    out = binary_cross_entropy(user, target, negative)
    assert out.loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    assert out.accuracy == 0.5  # row 0's negative (2) beats its positive (1)
    assert out.negatives_kept == 1.0
    out.loss.backward()
    assert torch.isfinite(user.grad).all() and user.grad.abs().sum() > 0
