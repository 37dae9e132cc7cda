"""Every teacher and judge prompt, as module constants read from the versioned templates in `prompts/`.

A template is a YAML file: `version`, a `system` message, optional few-shot `examples` (user and
assistant turns) and the `user` message with `{placeholders}`. Every output row records the version
that produced it, so a reworded prompt never mixes silently with rows of the old one.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import yaml

from hllm.creator.data.llm import Conversation
from hllm.errors import UserError

TEMPLATES = Path(__file__).with_name("prompts")


@dataclass(frozen=True)
class Prompt:
    name: str
    version: str
    system: str
    examples: tuple[tuple[str, str], ...]  # (user, assistant) few-shot turns
    user: str

    @property
    def fields(self) -> frozenset[str]:
        return frozenset(name for _, name, _, _ in string.Formatter().parse(self.user) if name)

    def render(self, **values: str) -> Conversation:
        """The chat for one row; every placeholder must be given, and nothing else."""
        if set(values) != self.fields:
            raise ValueError(f"prompt {self.name} takes {sorted(self.fields)}, got {sorted(values)}")
        turns = [{"role": "system", "content": self.system}]
        for user, assistant in self.examples:
            turns += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        return [*turns, {"role": "user", "content": self.user.format_map(values)}]


def load_prompt(path: str | Path) -> Prompt:
    """Read one template file (`prompts/<name>.yaml`, or a user's own with the same keys)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        examples = tuple((turn["user"], turn["assistant"]) for turn in raw.get("examples") or ())
        return Prompt(path.stem, str(raw["version"]), raw["system"], examples, raw["user"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as error:
        raise UserError(f"not a prompt template ({type(error).__name__}: {error})", where=str(path)) from None


PROFILE = load_prompt(TEMPLATES / "profile.yaml")
REWRITE = load_prompt(TEMPLATES / "rewrite.yaml")
VERIFY = load_prompt(TEMPLATES / "verify.yaml")
JUDGE = load_prompt(TEMPLATES / "judge.yaml")
POLISH = load_prompt(TEMPLATES / "polish.yaml")
