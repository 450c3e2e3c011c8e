"""RULER's common words extraction (cwe): find the most repeated words in a numbered list.

`num_cw` common words appear `freq_cw` times each and every other word `freq_ucw` times, all
shuffled into "1. word 2. word ..."; the haystack size is the number of distinct words. Below
a 4096-token target RULER uses 6/1 repeats and a smaller solved example ("short" variant), and
so does this. It also takes the short variant when the long one's smallest prompt (example
plus 10 x 30 common words) would fill more than `LONG_MAX_FILL` of the target (e.g. 4K bytes
with the byte tokenizer, where RULER would fail), unless `short` is set explicitly.
Words come from the shipped list, then distinct adjective-noun compounds once it runs out.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from hybrid_megatron.eval.tasks.base import Rendered, Task
from hybrid_megatron.eval.tasks.words import common_word_pool, random_key_word

TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\n"
    "Question: What are the 10 most common words in the above list?"
)
ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
MAX_NEW_TOKENS = 120
SHORT_TARGET = 4096
LONG_MAX_FILL = 0.8


def numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


@dataclass
class CweState:
    seed: int
    fewshot: str
    freq_cw: int
    freq_ucw: int
    order: list[str]  # distinct words in random order; the first `num_cw` are the common ones
    short: bool
    rng: random.Random = field(repr=False, default_factory=random.Random)


class CommonWordsTask(Task):
    metric = "string_match_all"
    unit = "distinct words"

    def __init__(
        self,
        name: str = "cwe",
        *,
        freq_cw: int = 30,
        freq_ucw: int = 3,
        num_cw: int = 10,
        num_fewshot: int = 1,
        short: bool | None = None,
        max_new_tokens: int = MAX_NEW_TOKENS,
    ) -> None:
        if num_cw < 1 or freq_cw <= freq_ucw or freq_ucw < 1:
            raise ValueError("cwe needs num_cw >= 1 and freq_cw > freq_ucw >= 1")
        self.name = name
        self.freq_cw, self.freq_ucw, self.num_cw = freq_cw, freq_ucw, num_cw
        self.num_fewshot = num_fewshot
        self.short = short
        self.max_new_tokens = max_new_tokens
        self._short = bool(short)

    def setup(self, count_tokens: Callable[[str], int], target_length: int, seed: int) -> None:
        """Pick RULER's long or short variant for this target length."""
        self._short = target_length < SHORT_TARGET if self.short is None else self.short
        if self.short is None and not self._short:
            probe = self.draw(random.Random(f"{seed}/{self.name}/variant"), -1, target_length)
            r = self.render(probe, self.min_size(probe))
            min_length = count_tokens(r.input + r.answer_prefix) + self.max_new_tokens
            if min_length > LONG_MAX_FILL * target_length:
                self._short = True

    def _example(self, rng: random.Random, words: list[str], cw: int, ucw: int) -> tuple[str, list]:
        common = words[: self.num_cw]
        items = common * cw + words[self.num_cw :] * ucw
        rng.shuffle(items)
        return numbered(items), common

    def draw(self, rng: random.Random, index: int, target_length: int) -> CweState:
        short = self._short
        n_fs, fs_cw, fs_ucw = (20, 3, 1) if short else (40, 10, 3)
        pool = common_word_pool()
        shots = []
        for _ in range(self.num_fewshot):
            context, answer = self._example(rng, rng.sample(pool, n_fs), fs_cw, fs_ucw)
            shots.append(TEMPLATE.format(context=context) + ANSWER_PREFIX + " " + numbered(answer))
        fewshot = "".join(s + "\n" for s in shots)
        freq_cw, freq_ucw = (6, 1) if short else (self.freq_cw, self.freq_ucw)
        seed = rng.getrandbits(64)
        order = rng.sample(pool, len(pool))
        return CweState(seed, fewshot, freq_cw, freq_ucw, order, short, random.Random(seed))

    def _words(self, state: CweState, n: int) -> list[str]:
        if len(state.order) < n:
            seen = set(state.order)
            while len(state.order) < n:
                word = random_key_word(state.rng)
                if word not in seen:
                    seen.add(word)
                    state.order.append(word)
        return state.order[:n]

    def min_size(self, state: CweState) -> int:
        return self.num_cw

    def render(self, state: CweState, size: int) -> Rendered:
        rng = random.Random(f"{state.seed}/{size}")
        context, answer = self._example(
            rng, self._words(state, size), state.freq_cw, state.freq_ucw
        )
        return Rendered(
            input=state.fewshot + TEMPLATE.format(context=context),
            answer_prefix=ANSWER_PREFIX,
            outputs=answer,
            metadata={"haystack_size": size, "variant": "short" if state.short else "long"},
        )
