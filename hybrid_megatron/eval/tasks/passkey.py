"""Passkey retrieval (landmark attention / LongLoRA prompt).

The filler "The grass is green. ..." is cut to a number of characters (the haystack size) and
split around the pass key line at the requested depth (random when `depth` is None, as in
the original). The model continues "What is the pass key? The pass key is"; the score is
whether the first integer it generates equals the key.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from hybrid_megatron.eval.tasks.base import Rendered, Task
from hybrid_megatron.eval.tasks.haystack import NOISE

DESCRIPTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "them. I will quiz you about the important information there."
)
INFO = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key?"
ANSWER_PREFIX = " The pass key is"
MAX_NEW_TOKENS = 16


@dataclass
class PasskeyState:
    key: int
    depth: float


class PasskeyTask(Task):
    metric = "passkey"
    unit = "filler characters"

    def __init__(
        self,
        name: str = "passkey",
        *,
        depth: float | None = None,
        min_key: int = 1,
        max_key: int = 50000,
        max_new_tokens: int = MAX_NEW_TOKENS,
    ) -> None:
        if depth is not None and not 0 <= depth <= 100:
            raise ValueError(f"depth is a percent in [0, 100], got {depth}")
        if not 0 <= min_key <= max_key:
            raise ValueError("passkey needs 0 <= min_key <= max_key")
        self.name = name
        self.depth = depth
        self.min_key, self.max_key = min_key, max_key
        self.max_new_tokens = max_new_tokens
        self._filler = NOISE

    @property
    def chance_score(self) -> float:
        return 100.0 / (self.max_key - self.min_key + 1)

    def _filler_chars(self, n: int) -> str:
        while len(self._filler) < n:
            self._filler = " ".join([self._filler, self._filler])
        return self._filler[:n]

    def draw(self, rng: random.Random, index: int, target_length: int) -> PasskeyState:
        key = rng.randint(self.min_key, self.max_key)
        depth = 100.0 * rng.random() if self.depth is None else float(self.depth)
        return PasskeyState(key, depth)

    def render(self, state: PasskeyState, size: int) -> Rendered:
        n_prefix = round(size * state.depth / 100.0)
        lines = [
            DESCRIPTION,
            self._filler_chars(n_prefix),
            INFO.format(key=state.key),
            self._filler_chars(size - n_prefix),
            QUESTION,
        ]
        return Rendered(
            input="\n".join(lines),
            answer_prefix=ANSWER_PREFIX,
            outputs=[str(state.key)],
            depth=state.depth,
            metadata={"haystack_size": size},
        )
