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
    max_evals: int = 60,
) -> Fit:
    """Largest `size` in [min_size, max_size] with `length_of(size) <= budget`.

    `length_of` should be (close to) non-decreasing in size. `guess` and `slope` (tokens per
    unit) seed the search, typically from the previous sample. Raises `DoesNotFit` when
    `min_size` is already over budget.
    """
    cache: dict[int, int] = {}

    def f(s: int) -> int:
        if s not in cache:
            cache[s] = length_of(s)
        return cache[s]

    if f(min_size) > budget:
        raise DoesNotFit(cache[min_size])
    lo, hi = min_size, (max_size + 1 if max_size is not None else None)
    if slope is None or slope <= 0:
        slope = _probe_slope(f, budget, min_size, hi)
        lo = max((s for s, n in cache.items() if n <= budget), default=min_size)
        his = [s for s, n in cache.items() if n > budget]
        if his:
            hi = min(his) if hi is None else min(hi, min(his))
    step = 0
    nxt = guess if guess is not None else lo + math.floor((budget - f(lo)) / slope)
    while (hi is None or hi - lo > 1) and len(cache) < max_evals:
        step += 1
        nxt = max(nxt, lo + 1)
        if hi is not None:
            nxt = min(nxt, hi - 1)
            if step % 4 == 0:  # safeguard against slow secant convergence
                nxt = (lo + hi) // 2
        prev_lo = lo
        if f(nxt) <= budget:
            lo = nxt
        else:
            hi = nxt
        if hi is not None and hi - lo > 1:
            slope = max((f(hi) - f(lo)) / (hi - lo), 1e-6)
        elif hi is None and lo > prev_lo:
            slope = max((f(lo) - f(prev_lo)) / (lo - prev_lo), 1e-6)
        nxt = lo + math.floor((budget - f(lo)) / slope)
    return Fit(size=lo, length=f(lo), slope=slope, evals=len(cache))


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
