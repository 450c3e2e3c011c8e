"""RULER's frequent words extraction (fwe): the three most frequent coded words.

A vocabulary of random 6-letter words follows a Zipf law with exponent `alpha`; the top
ranked word is replaced by '...' (noise) and the answer is ranks 2-4. The haystack size is the
nominal word count `n`: word of rank k appears int(n * k^-alpha / zeta(alpha)) times. As in
RULER the vocabulary has (target - max_new_tokens) // 50 words unless `vocab_size` is set.
"""

from __future__ import annotations

import math
import random
import string
from dataclasses import dataclass

from hybrid_megatron.eval.tasks.base import Rendered, Task

TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three "
    "most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. "
    "Please ignore the dots '....'. What are the three most frequently appeared words in the "
    "above coded text?"
)
ANSWER_PREFIX = (
    " Answer: According to the coded text above, the three most frequently appeared words are:"
)
MAX_NEW_TOKENS = 50


def zeta(alpha: float, terms: int = 100_000) -> float:
    """Riemann zeta(alpha) for alpha > 1 (partial sum plus Euler-Maclaurin tail)."""
    if alpha <= 1:
        raise ValueError(f"zeta needs alpha > 1, got {alpha}")
    head = math.fsum(k**-alpha for k in range(1, terms))
    n = float(terms)
    return head + n ** (1 - alpha) / (alpha - 1) + 0.5 * n**-alpha + alpha * n ** (-alpha - 1) / 12


@dataclass
class FweState:
    seed: int
    vocab: list[str]  # rank order; vocab[0] == '...'


class FreqWordsTask(Task):
    metric = "string_match_all"
    unit = "words"

    def __init__(
        self,
        name: str = "fwe",
        *,
        alpha: float = 2.0,
        coded_wordlen: int = 6,
        vocab_size: int = -1,
        max_new_tokens: int = MAX_NEW_TOKENS,
    ) -> None:
        self.name = name
        self.alpha = alpha
        self.zeta = zeta(alpha)
        self.coded_wordlen = coded_wordlen
        self.vocab_size = vocab_size
        self.max_new_tokens = max_new_tokens

    def draw(self, rng: random.Random, index: int, target_length: int) -> FweState:
        size = self.vocab_size
        if size <= 0:
            size = (target_length - self.max_new_tokens) // 50
        size = max(size, 5)
        vocab: set[str] = set()
        while len(vocab) < size:
            vocab.add("".join(rng.choices(string.ascii_lowercase, k=self.coded_wordlen)))
        ranked = sorted(vocab)
        rng.shuffle(ranked)
        ranked[0] = "..."
        return FweState(rng.getrandbits(64), ranked)

    def counts(self, vocab_len: int, n: int) -> list[int]:
        return [int(n * k**-self.alpha / self.zeta) for k in range(1, vocab_len + 1)]

    def min_size(self, state: FweState) -> int:
        # Small enough that rank 4 still appears at least once.
        return math.ceil(self.zeta * 4**self.alpha)

    def render(self, state: FweState, size: int) -> Rendered:
        words = [
            w for w, c in zip(state.vocab, self.counts(len(state.vocab), size)) for _ in range(c)
        ]
        random.Random(f"{state.seed}/{size}").shuffle(words)
        return Rendered(
            input=TEMPLATE.format(context=" ".join(words)),
            answer_prefix=ANSWER_PREFIX,
            outputs=state.vocab[1:4],
            metadata={"haystack_size": size},
        )
