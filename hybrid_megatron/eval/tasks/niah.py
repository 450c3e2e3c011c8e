"""RULER's needle-in-a-haystack family (niah_single_*, niah_multikey_*, multivalue, multiquery).

Needle: "One of the special magic {type_needle_v} for {key} is: {value}." Haystacks: "noise"
(the grass/sky line repeated, one per line), "needle" (every line a distractor needle) and
"essay" (user-provided text, needles inserted at sentence starts). Without a fixed `depth`,
needles go to random lines (noise/needle) or to distinct depths drawn from RULER's 40 `DEPTHS`
(essay), as in RULER; with `depth`, the queried needles go exactly there.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

from hybrid_megatron.eval.tasks.base import Rendered, Task
from hybrid_megatron.eval.tasks.haystack import (
    DEPTHS,
    NOISE,
    Essay,
    depth_index,
    essay_context,
    insert_items,
    load_essay,
    resolve_essay_path,
)
from hybrid_megatron.eval.tasks.words import VALUE_TYPES, random_value

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to "
    "memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
# RULER's singular wording, used when exactly one value is asked for.
TEMPLATE_ONE = (
    "A special magic {type_needle_v} is hidden within the following text. Make sure to "
    "memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What is the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
ANSWER_PREFIX_ONE = (
    " The special magic {type_needle_v} for {query} mentioned in the provided text is"
)
MAX_NEW_TOKENS = 128
HAYSTACKS = ("noise", "needle", "essay")


@dataclass
class NiahState:
    seed: int
    needles: list[tuple[float, str]]  # (depth percent, needle text), in shuffled order
    query_depths: list[float]  # depths of the queried keys' needles
    query: str
    answers: list[str]
    keys: list[str]
    distractors: list[str] = field(default_factory=list)  # needle haystack, grown lazily
    rng: random.Random | None = None


class NiahTask(Task):
    metric = "string_match_all"

    def __init__(
        self,
        name: str = "niah",
        *,
        haystack: str = "noise",
        type_needle_k: str = "words",
        type_needle_v: str = "numbers",
        num_needle_k: int = 1,
        num_needle_v: int = 1,
        num_needle_q: int = 1,
        depth: float | None = None,
        essay_path: str | os.PathLike | None = None,
        data_dir: str | os.PathLike | None = None,
        max_new_tokens: int = MAX_NEW_TOKENS,
    ) -> None:
        if haystack not in HAYSTACKS:
            raise ValueError(f"haystack must be one of {HAYSTACKS}, got '{haystack}'")
        for t in (type_needle_k, type_needle_v):
            if t not in VALUE_TYPES:
                raise ValueError(f"needle types must be one of {VALUE_TYPES}, got '{t}'")
        if min(num_needle_k, num_needle_v, num_needle_q) < 1:
            raise ValueError("num_needle_k/v/q must be >= 1")
        if depth is not None and not 0 <= depth <= 100:
            raise ValueError(f"depth is a percent in [0, 100], got {depth}")
        self.name = name
        self.haystack = haystack
        self.type_k, self.type_v = type_needle_k, type_needle_v
        self.num_k = max(num_needle_k, num_needle_q)  # RULER: enough keys to query
        self.num_v, self.num_q = num_needle_v, num_needle_q
        self.depth = depth
        self.max_new_tokens = max_new_tokens
        self.unit = {"noise": "noise lines", "needle": "distractor needles", "essay": "words"}[
            haystack
        ]
        self.essay: Essay | None = None
        if haystack == "essay":
            self.essay = load_essay(resolve_essay_path(name, essay_path, data_dir))

    @property
    def chance_score(self) -> float | None:
        """One 7-digit number per queried value guessed at random (numbers only)."""
        return 100.0 / 9_000_000 if self.type_v == "numbers" else None

    def _needle(self, key: str, value: str) -> str:
        return NEEDLE.format(type_needle_v=self.type_v, key=key, value=value)

    def draw(self, rng: random.Random, index: int, target_length: int) -> NiahState:
        keys: list[str] = []
        while len(keys) < self.num_k:
            key = random_value(rng, self.type_k)
            if key not in keys:
                keys.append(key)
        values = [[random_value(rng, self.type_v) for _ in range(self.num_v)] for _ in keys]
        queried = rng.sample(range(self.num_k), self.num_q)
        needles = [(k, self._needle(keys[k], v)) for k in range(self.num_k) for v in values[k]]
        rng.shuffle(needles)
        if self.haystack == "essay":
            depths = [float(d) for d in rng.sample(DEPTHS, len(needles))]
        else:
            depths = [100.0 * rng.random() for _ in needles]
        if self.depth is not None:
            depths = [self.depth if k in queried else d for (k, _), d in zip(needles, depths)]
        queries = [keys[k] for k in queried]
        query = (
            queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
        )
        return NiahState(
            seed=rng.getrandbits(64),
            needles=[(d, text) for d, (_, text) in zip(depths, needles)],
            query_depths=[d for d, (k, _) in zip(depths, needles) if k in queried],
            query=query,
            answers=[v for k in queried for v in values[k]],
            keys=keys,
        )

    def _distractors(self, state: NiahState, n: int) -> list[str]:
        if state.rng is None:
            state.rng = random.Random(state.seed)
        while len(state.distractors) < n:
            key = random_value(state.rng, self.type_k)
            if key not in state.keys:
                state.distractors.append(self._needle(key, random_value(state.rng, self.type_v)))
        return state.distractors[:n]

    def render(self, state: NiahState, size: int) -> Rendered:
        if self.haystack == "essay":
            assert self.essay is not None
            context = essay_context(self.essay, size, state.needles)
        else:
            lines = [NOISE] * size if self.haystack == "noise" else self._distractors(state, size)
            items = [(depth_index(d, size), text) for d, text in state.needles]
            context = "\n".join(insert_items(lines, items))
        one = self.num_q * self.num_v == 1
        type_v = self.type_v[:-1] if one else self.type_v
        fmt = {"type_needle_v": type_v, "query": state.query}
        template = TEMPLATE_ONE if one else TEMPLATE
        prefix = ANSWER_PREFIX_ONE if one else ANSWER_PREFIX
        return Rendered(
            input=template.format(context=context, **fmt),
            answer_prefix=prefix.format(**fmt),
            outputs=list(state.answers),
            depth=state.query_depths[0],
            metadata={"needle_depths": [d for d, _ in state.needles], "haystack_size": size},
        )
