"""Core types of the task generators: the sample record and the task interface.

A task splits its randomness in two: `draw` makes every size-independent choice for one
sample (needles, keys, depths, seeds), and `render` turns that state plus a haystack size into
text deterministically. The fitter (`fitting.py`) then searches the size whose prompt fits the
target length, so the same sample keeps its needles while its haystack grows or shrinks.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

from hybrid_megatron.eval.tasks.errors import EvalDataError


class SupportsEncode(Protocol):
    """Any tokenizer: `encode(text)` returns the token ids of `text`."""

    def encode(self, text: str) -> list[int]: ...


@dataclass
class Sample:
    """One evaluation prompt.

    The model is fed `input + answer_prefix` (that is `prompt`) and generates at most
    `max_new_tokens`. `length` is RULER's length: prompt tokens + `max_new_tokens`, always
    <= `target_length`. `depth` is the percent depth of the (first) queried needle in the
    haystack, when the task has one.
    """

    index: int
    task: str
    input: str
    answer_prefix: str
    outputs: list[str]
    length: int
    target_length: int
    max_new_tokens: int
    depth: float | None = None
    metric: str = "string_match_all"
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """The text to feed the model."""
        return self.input + self.answer_prefix

    @property
    def prompt_tokens(self) -> int:
        return self.length - self.max_new_tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sample:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class Rendered:
    """A task's text for one sample at one haystack size."""

    input: str
    answer_prefix: str
    outputs: list[str]
    depth: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


class Task(ABC):
    """A prompt generator. Subclasses set `name`, `max_new_tokens`, `metric`, `unit`."""

    name: str
    max_new_tokens: int
    metric: str = "string_match_all"
    unit: str = "haystack units"

    def setup(self, count_tokens: Any, target_length: int, seed: int) -> None:  # noqa: B027
        """Prepare state shared by all samples of one (tokenizer, target length, seed)."""

    @abstractmethod
    def draw(self, rng: random.Random, index: int, target_length: int) -> Any:
        """Every size-independent random choice for sample `index`."""

    @abstractmethod
    def render(self, state: Any, size: int) -> Rendered:
        """The sample's text with a haystack of `size` units (deterministic)."""

    def min_size(self, state: Any) -> int:
        """The smallest valid haystack size for `state`."""
        return 0

    @property
    def chance_score(self) -> float | None:
        """Expected score (x100) of guessing a well-formed answer at random (None: not known)."""
        return None

    @property
    def max_samples(self) -> int | None:
        """How many distinct samples the task can make (None: unlimited)."""
        return None

    def check_sample_count(self, count: int) -> None:
        """Raise EvalDataError if `count` samples (indices 0..count-1) exceed `max_samples`."""
        limit = self.max_samples
        if limit is not None and count > limit:
            raise EvalDataError(
                f"task '{self.name}' can make {limit} distinct samples (one per question of "
                f"its data file) but {count} were asked for; pass at most {limit} samples "
                "(--num-samples). Questions are not repeated, as in RULER."
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
