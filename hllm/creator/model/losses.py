"""The Creator's losses as plain functions of tensors, all in fp32: target-token cross entropy
(creative and recon), symmetric InfoNCE (align) and user-item matching BCE (cls).

Dims: B rows, T tokens, H width, K negatives per row, C tower width, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from hllm.models.losses import info_nce

IGNORE = -100  # label of a token that is not predicted


def target_token_loss(hidden: Tensor, labels: Tensor, head: Callable[[Tensor], Tensor]) -> Tensor:
    """Causal LM loss over the labelled tokens only, mean over them.

    Position t predicts token t + 1, so only the hidden states just before a label reach the LM
    head: no (B, T, V) logits for the prompt (the reference computed them for every token).

    Args:
        hidden: (B, T, H) last hidden states.
        labels: (B, T) token ids, IGNORE where the token is not a target.
        head: the LM head, (n, H) -> (n, V).
    """
    return mean_token_loss(sequence_log_likelihood(hidden, labels, head), labels)


def sequence_log_likelihood(hidden: Tensor, labels: Tensor, head: Callable[[Tensor], Tensor]) -> Tensor:
    """Each row's summed log-probability of its labelled tokens (B,), 0 for a row with none."""
    next_labels = labels[:, 1:]  # (B, T-1)
    predicting = next_labels != IGNORE
    logits = head(hidden[:, :-1][predicting]).float()  # (n, V)
    token = -F.cross_entropy(logits, next_labels[predicting], reduction="none")  # (n,)
    rows = predicting.nonzero()[:, 0]  # (n,) the row of each labelled token
    return torch.zeros(len(labels), device=token.device).index_add(0, rows, token)


def mean_token_loss(row_log_likelihoods: Tensor, labels: Tensor) -> Tensor:
    """The causal LM loss from each row's summed log-likelihood (B,): minus their sum over the
    labelled tokens' count."""
    return -row_log_likelihoods.sum() / (labels[:, 1:] != IGNORE).sum()


def contrast_loss(own: Tensor, other: Tensor) -> Tensor:
    """-log sigmoid(own - other), mean over rows: a pairwise logistic loss on what the row's user adds
    to two titles' log-likelihoods (B,) each, the teacher's title for this user and its title for
    another user of the same item.

    Each is a gain over the same model without the user (as DPO's reference policy): on raw
    log-likelihoods the titles' own probabilities (length, wording) dominate the difference, and a
    first run on them (weight 1) pulled the LM off its titles (held-out creative loss 0.69 against
    0.12; hallucination 0.62)."""
    return -F.logsigmoid(own - other).mean()


def align_loss(user: Tensor, profile: Tensor, scale: Tensor, *, threshold: float = 0.99) -> Tensor:
    """Symmetric InfoNCE between each row's user vector and its profile encoding, in-batch negatives.

    In each direction a candidate whose cosine with the row's positive exceeds `threshold` (the row
    itself, or a duplicate profile/user) is masked, so identical profiles are never pushed apart.

    Args:
        user: (B, D) user vectors (normalised inside).
        profile: (B, D) profile encodings (normalised inside).
        scale: scalar inverse temperature.
    """
    forward = info_nce(user, profile, profile, scale, threshold=threshold).loss
    backward = info_nce(profile, user, user, scale, threshold=threshold).loss
    return 0.5 * (forward + backward)


def matching_loss(
    head: Callable[[Tensor, Tensor], Tensor], users: Tensor, items: Tensor, negatives: Tensor, valid: Tensor
) -> Tensor:
    """BCE of user-item matching: each row's own item is a positive, its valid negatives are 0.

    Mean over every scored pair (the positives and the valid negatives).

    Args:
        head: (n, C) users, (n, C) items -> (n,) logits.
        users: (B, C) user-tower outputs.
        items: (B, C) item-tower outputs of each row's own item.
        negatives: (B, K, C) item-tower outputs of the negatives.
        valid: (B, K) bool, False for a negative that must not count (the row's own item, an item
            of the user's history).
    """
    batch, k = valid.shape
    positive = head(users, items)  # (B,)
    paired = users.unsqueeze(1).expand(-1, k, -1)[valid]  # (m, C)
    negative = head(paired, negatives[valid])  # (m,)
    logits = torch.cat([positive, negative]).float()
    labels = torch.cat([torch.ones_like(positive), torch.zeros_like(negative)]).float()
    return F.binary_cross_entropy_with_logits(logits, labels)
