"""The fact selector: which of an item's own facts a user's title adds, read from the user embedding.

Why: the Creative LLM reads the user through one soft token and, trained on thousands of grounded
rows, still wrote the same title for most users (BENCHMARKS.md, "Why the Creative LLM ignores the
user"). So the choice is made here, explicitly, and written into the prompt as text
(`layout.ANGLE_CUE`): the LM only has to place facts it is shown.

The selector predicts the user's interest in the grounded teacher's encoder space from the HLLM
user embedding (a ridge regression, `grounded.InterestMap`, fitted on the training users' history
means only), then chooses among the item's facts exactly as the teacher does
(`grounded.choose_facts`): the facts that interest the user more than the original title, best
first, composed without repeats. Under grounded-v3 rows, whose teacher reads the same embedding
through the same kind of map, its choice is the teacher's wherever the two maps agree.

Dims: R rows, K candidates, Du user width, D encoder width.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from hllm.creator.data.grounded import Fact, InterestMap, PhraseEncoder, choose_facts


class FactSelector(nn.Module):
    """The interest map as buffers (saved with the run): interest = (user - user_mean) @ interest_map."""

    def __init__(self, user_width: int, fact_width: int) -> None:
        super().__init__()
        self.register_buffer("user_mean", torch.zeros(user_width))
        self.register_buffer("interest_map", torch.zeros(user_width, fact_width))

    @torch.no_grad()
    def fit(self, users: Tensor, history_means: Tensor) -> None:
        """Fit the map from (R, Du) user embeddings to (R, D) history means, in closed form."""
        fitted = InterestMap.fit(users.float().cpu().numpy(), history_means.float().cpu().numpy())
        self.user_mean.copy_(torch.from_numpy(fitted.user_mean))
        self.interest_map.copy_(torch.from_numpy(fitted.weights))

    def interests(self, users: Tensor) -> np.ndarray:
        """(R, D) predicted interests of (R, Du) user embeddings (the teacher's own arithmetic)."""
        fitted = InterestMap(self.user_mean.cpu().numpy(), self.interest_map.cpu().numpy())
        return fitted(users.detach().float().cpu().numpy())

    def choose(
        self, users: Tensor | None, items: list[tuple[str, list[Fact]]], encoder: PhraseEncoder
    ) -> list[list[str]]:
        """The facts each row's title should add, for (original title, candidate facts) per row.
        `users` None (the no-user ablation): no interest, so no fact."""
        if users is None:
            return [[] for _ in items]
        interests = self.interests(users)
        # every distinct phrase of the batch in one encoder pass, not a row at a time
        phrases = sorted({text for original, facts in items for text in (original, *(f.text for f in facts))})
        embedded = dict(zip(phrases, encoder.encode(phrases), strict=True))
        chosen = []
        for (original, facts), interest in zip(items, interests, strict=True):
            scores = np.array([float(embedded[fact.text] @ interest) for fact in facts])
            chosen.append(choose_facts(original, facts, scores, float(embedded[original] @ interest))[1])
        return chosen
