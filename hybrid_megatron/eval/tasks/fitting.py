"""Find the largest haystack size whose prompt fits a token budget.

RULER binary-searches the haystack size once per task, re-tokenizing the whole prompt at each
step. Here each sample is fitted on its own with a safeguarded secant search: the prompt
length is close to linear in the size, so starting from the previous sample's size and
tokens-per-unit slope it usually takes 2-3 full tokenizations to find `size` such that
`size` fits and `size + 1` does not (or `size` is the maximum).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Fit:
    size: int  # the largest fitting haystack size found
    length: int  # its measured length (tokens, generation budget included)
    slope: float  # tokens per unit near `size`
    evals: int  # how many sizes were rendered and tokenized


class DoesNotFit(Exception):
    """Even `min_size` exceeds the budget; `length` is the length at `min_size`."""

    def __init__(self, length: int) -> None:
        super().__init__(length)
        self.length = length


def fit_size(
    length_of: Callable[[int], int],
    budget: int,
    *,
    min_size: int = 0,
    guess: int | None = None,
    slope: float | None = None,
    max_size: int | None = None,
    tolerance: float | None = None,
    max_evals: int = 60,
) -> Fit:
    """Largest `size` in [min_size, max_size] with `length_of(size) <= budget`.

    `length_of` should be (close to) non-decreasing in size. `guess` and `slope` (tokens per
    unit) seed the search. With `tolerance=None` the search only stops at a proven maximum
    (`size + 1` is over budget); with a number it also stops once a fitting size leaves less
    than max(tolerance, tokens per unit) unused, saving the confirming tokenization. Raises
    `DoesNotFit` when `min_size` is already over budget.
    """
    cache: dict[int, int] = {}

    def f(s: int) -> int:
        if s not in cache:
            cache[s] = length_of(s)
        return cache[s]

    base = f(min_size)
    if base > budget:
        raise DoesNotFit(base)
    lo, hi = min_size, (max_size + 1 if max_size is not None else None)
    if slope is None or slope <= 0:
        slope = _probe_slope(f, budget, min_size, hi)
        lo = max((s for s, n in cache.items() if n <= budget), default=min_size)
        over = [s for s, n in cache.items() if n > budget]
        if over:
            hi = min(over) if hi is None else min(hi, *over)

    def unit_tokens() -> float:
        """Average tokens per unit over the fitting range (robust to local wobble)."""
        return max((f(lo) - base) / (lo - min_size), 1e-9) if lo > min_size else slope

    def predict() -> int:
        local = unit_tokens()
        if hi is not None and hi - lo > 1 and f(hi) > f(lo):
            local = (f(hi) - f(lo)) / (hi - lo)  # secant across the bracket
        return lo + math.floor((budget - f(lo)) / local)

    nxt = guess if guess is not None else predict()
    step = 0
    while (hi is None or hi - lo > 1) and len(cache) < max_evals:
        if (
            tolerance is not None
            and lo > min_size
            and budget - f(lo) < max(tolerance, unit_tokens())
        ):
            break
        step += 1
        nxt = max(nxt, lo + 1)
        if hi is not None:
            nxt = min(nxt, hi - 1)
            if step % 3 == 0:  # safeguard against slow secant convergence
                nxt = (lo + hi) // 2
        if f(nxt) <= budget:
            lo = nxt
        else:
            hi = nxt
        nxt = predict()
    return Fit(size=lo, length=f(lo), slope=unit_tokens(), evals=len(cache))


def _probe_slope(f: Callable[[int], int], budget: int, min_size: int, hi: int | None) -> float:
    """Tokens per unit, from sizes growing 4x until they cover an eighth of the budget."""
    base = f(min_size)
    size = min_size + 16
    while True:
        if hi is not None and size >= hi:
            size = hi - 1
        if size <= min_size:
            return 1.0
        n = f(size)
        if n > budget // 8 or n > budget or (hi is not None and size >= hi - 1):
            return max((n - base) / (size - min_size), 1e-6)
        size = min_size + (size - min_size) * 4
