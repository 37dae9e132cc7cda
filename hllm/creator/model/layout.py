"""Token layout of the Creative LLM's sequences, and their padding to the longest in a batch.

    creative:  HEADER [USER] "Original title: ..." "Selling points: ..." [ANGLE] CUE | target title </s>
    recon:     [USER] RECON_CUE | profile </s>
    profile:   profile [END]                      (the align encoder reads the hidden state at END)

[ANGLE] ("Angle: fact; fact" or "Angle: none") is there only in a Creator with a fact selector
(`selector.py`): the teacher's facts in training, the selector's choice when generating.
[USER] and [END] are placeholder ids whose input embeddings the model overwrites (the projected
user embedding; a learned vector). Only the part after `|` is a target. No chat template: the
model is fine-tuned on exactly this layout. Sequences are never padded to a fixed length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hllm.creator.model.losses import IGNORE

HEADER = "Write a product title for one shopper.\nShopper:"
TITLE_CUE, POINTS_CUE, ANSWER_CUE = "\nOriginal title:", "\nSelling points:", "\nTitle for this shopper:"
RECON_CUE = "\nThis shopper is interested in:\n"
ANGLE_CUE, NO_ANGLE = "\nAngle:", "none"


@dataclass(frozen=True)
class Sequence:
    """Token ids with their labels (IGNORE outside the target) and the [USER] position (-1: none)."""

    ids: list[int]
    labels: list[int]
    user_position: int = -1


def angle_text(facts: list[str]) -> str:
    """The [ANGLE] line's text for the facts a title should add."""
    return "; ".join(facts) if facts else NO_ANGLE


def profile_text(interests: list[str]) -> str:
    return "\n".join(f"- {interest}" for interest in interests)


class PromptLayout:
    """Encodes the three sequences with one tokenizer, each part cut to its token budget."""

    def __init__(
        self,
        tokenizer,
        *,
        max_fact_tokens: int = 96,
        max_title_tokens: int = 48,
        max_profile_tokens: int = 48,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_fact_tokens = max_fact_tokens
        self.max_title_tokens = max_title_tokens
        self.max_profile_tokens = max_profile_tokens
        self.eos = tokenizer.eos_token_id
        self.placeholder = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self._header = self._encode(HEADER)

    def _encode(self, text: str, limit: int | None = None) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"][:limit]

    def _body(self, title: str, points: str, angle: str | None) -> list[int]:
        angled = (
            [] if angle is None else self._encode(ANGLE_CUE) + self._encode(" " + angle, self.max_fact_tokens)
        )
        return (
            self._encode(TITLE_CUE)
            + self._encode(" " + title.strip(), self.max_title_tokens)
            + self._encode(POINTS_CUE)
            + self._encode(" " + points.strip(), self.max_fact_tokens)
            + angled
            + self._encode(ANSWER_CUE)
        )

    def prompt(
        self, title: str, points: str, *, with_user: bool = True, angle: str | None = None
    ) -> Sequence:
        """The generation prompt; `with_user=False` drops the [USER] position (the no-user ablation),
        `angle` (`angle_text`) adds the [ANGLE] line."""
        user = [self.placeholder] if with_user else []
        ids = self._header + user + self._body(title, points, angle)
        return Sequence(ids, [IGNORE] * len(ids), len(self._header) if with_user else -1)

    def creative(self, title: str, points: str, target: str, *, angle: str | None = None) -> Sequence:
        prompt = self.prompt(title, points, angle=angle)
        answer = self._encode(" " + target.strip(), self.max_title_tokens) + [self.eos]
        return Sequence(prompt.ids + answer, prompt.labels + answer, prompt.user_position)

    def recon(self, interests: list[str]) -> Sequence:
        cue = [self.placeholder] + self._encode(RECON_CUE)
        answer = self._encode(profile_text(interests), self.max_profile_tokens) + [self.eos]
        return Sequence(cue + answer, [IGNORE] * len(cue) + answer, 0)

    def profile(self, interests: list[str]) -> list[int]:
        """The profile text followed by the [END] placeholder (always the last id)."""
        return self._encode(profile_text(interests), self.max_profile_tokens) + [self.placeholder]


@dataclass
class Padded:
    """Sequences padded to the longest: ids, attention mask, labels, [USER] position per row."""

    ids: Tensor  # (B, T)
    mask: Tensor  # (B, T) bool
    labels: Tensor  # (B, T)
    user_position: Tensor  # (B,) index of the [USER] position, -1 where none

    def to(self, device: torch.device | str) -> Padded:
        return Padded(
            self.ids.to(device), self.mask.to(device), self.labels.to(device), self.user_position.to(device)
        )


def pad(sequences: list[Sequence], pad_id: int, *, side: str = "right") -> Padded:
    """Pad to the longest sequence of the batch; left padding (for generation) shifts the [USER] positions."""
    width = max(len(s.ids) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    user_position = torch.full((len(sequences),), -1, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        start = width - len(sequence.ids) if side == "left" else 0
        end = start + len(sequence.ids)
        ids[row, start:end] = torch.tensor(sequence.ids)
        labels[row, start:end] = torch.tensor(sequence.labels)
        mask[row, start:end] = True
        if sequence.user_position >= 0:
            user_position[row] = start + sequence.user_position
    return Padded(ids, mask, labels, user_position)
