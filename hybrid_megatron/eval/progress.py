"""Progress lines of an evaluation sweep (samples done, samples/s, ETA by tokens)."""

from __future__ import annotations

import time
from collections.abc import Sequence


class Progress:
    """Progress lines: done/total samples, samples/s and an ETA weighted by sample length.

    A line every `every` samples, at least every `interval` seconds while work goes on, and at
    the end. Samples of different lengths cost very different times, so the ETA divides the
    tokens still to do by the tokens done per second (not samples by samples per second).
    """

    def __init__(
        self, lengths: Sequence[int], every: int, prefix: str, interval: float = 30.0
    ) -> None:
        self.total, self.every, self.prefix = len(lengths), max(1, every), prefix
        self.total_tokens = sum(lengths)
        self.done = self.done_tokens = 0
        self.interval = interval
        self.start = self.last = time.perf_counter()

    def update(self, n: int = 1, tokens: int = 0) -> None:
        before = self.done
        self.done += n
        self.done_tokens += tokens
        now = time.perf_counter()
        if (
            self.done // self.every > before // self.every
            or self.done == self.total
            or now - self.last >= self.interval
        ):
            self.last = now
            print(self.line(), flush=True)

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.done / elapsed
        token_rate = self.done_tokens / elapsed
        left_tokens = self.total_tokens - self.done_tokens
        left = left_tokens / token_rate if token_rate > 0 else float("inf")
        pct = 100.0 * self.done / max(self.total, 1)
        return (
            f"{self.prefix} {self.done}/{self.total} samples ({pct:.0f}%), "
            f"{rate:.2f} samples/s, elapsed {_duration(elapsed)}, ETA {_duration(left)}"
        )


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
