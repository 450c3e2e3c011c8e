"""Step timing, throughput over a sliding window, ETA, and the one-line step log."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

__all__ = [
    "StepTimer",
    "ThroughputMeter",
    "eta",
    "format_count",
    "format_duration",
    "format_flops",
    "format_step_line",
]


class StepTimer:
    """Wall time of steps: `start()` ... `stop() -> seconds`.

    `sync` runs before reading the clock at `stop()` (pass `torch.cuda.synchronize` to time
    queued GPU work); `clock` is injectable for tests."""

    def __init__(
        self,
        clock: Callable[[], float] = time.perf_counter,
        sync: Callable[[], object] | None = None,
    ):
        self._clock = clock
        self._sync = sync
        self._created = clock()
        self._started: float | None = None

    def start(self) -> None:
        self._started = self._clock()

    def stop(self) -> float:
        if self._started is None:
            raise RuntimeError("StepTimer.stop() called without start()")
        if self._sync is not None:
            self._sync()
        seconds = self._clock() - self._started
        self._started = None
        return seconds

    def elapsed(self) -> float:
        """Seconds since the timer was created."""
        return self._clock() - self._created


class ThroughputMeter:
    """Tokens/s and seconds/step over the last `window` steps.

    The first `warmup_steps` steps (compilation, allocator warmup) are left out once later
    steps exist; before that they are all there is, so they are used."""

    def __init__(self, window: int = 20, warmup_steps: int = 1):
        if window < 1 or warmup_steps < 0:
            raise ValueError("window must be >= 1 and warmup_steps >= 0")
        self.warmup_steps = warmup_steps
        self._warmup: list[tuple[int, float]] = []
        self._recent: deque[tuple[int, float]] = deque(maxlen=window)

    def update(self, tokens: int, seconds: float) -> None:
        """Record one step that processed `tokens` in `seconds`."""
        if len(self._warmup) < self.warmup_steps:
            self._warmup.append((tokens, seconds))
        else:
            self._recent.append((tokens, seconds))

    def _samples(self) -> list[tuple[int, float]]:
        return list(self._recent) or self._warmup

    @property
    def tokens_per_s(self) -> float | None:
        samples = self._samples()
        seconds = sum(s for _, s in samples)
        return sum(t for t, _ in samples) / seconds if seconds > 0 else None

    @property
    def seconds_per_step(self) -> float | None:
        samples = self._samples()
        return sum(s for _, s in samples) / len(samples) if samples else None


def eta(step: int, total_steps: int, seconds_per_step: float | None) -> float | None:
    """Seconds left to reach `total_steps` from `step`; None when the pace is unknown."""
    if seconds_per_step is None:
        return None
    return max(total_steps - step, 0) * seconds_per_step


def format_duration(seconds: float) -> str:
    """Compact duration: 42s, 3m05s, 1h02m, 2d03h."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _three_digits(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def format_count(n: float) -> str:
    """950, 12.3k, 2.50M, 1.20B."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return _three_digits(n / div) + unit
    return f"{n:.0f}"


def format_flops(tflops: float) -> str:
    """A TFLOP/s value in readable units: 45.1 TFLOP/s, 2.10 GFLOP/s, 1.23 PFLOP/s."""
    for scale, unit in ((1e3, "P"), (1.0, "T"), (1e-3, "G")):
        if tflops >= scale:
            return f"{_three_digits(tflops / scale)} {unit}FLOP/s"
    return f"{_three_digits(tflops * 1e6)} MFLOP/s"


def format_step_line(
    step: int,
    total_steps: int,
    loss: float,
    lr: float,
    grad_norm: float | None = None,
    tokens_per_s: float | None = None,
    tflops_per_device: float | None = None,
    mfu: float | None = None,
    mem_gb: float | None = None,
    eta_s: float | None = None,
) -> str:
    """`step 120/2000 | loss 3.214 | lr 2.9e-04 | gnorm 0.81 | 12.3k tok/s | 45.1 TFLOP/s |
    MFU 38.2% | mem 12.1 GB | ETA 1h02m`; fields that are None are left out."""
    parts = [f"step {step}/{total_steps}", f"loss {loss:.3f}", f"lr {lr:.1e}"]
    if grad_norm is not None:
        parts.append(f"gnorm {grad_norm:.2f}")
    if tokens_per_s is not None:
        parts.append(f"{format_count(tokens_per_s)} tok/s")
    if tflops_per_device is not None:
        parts.append(format_flops(tflops_per_device))
    if mfu is not None:
        parts.append(f"MFU {100 * mfu:.1f}%")
    if mem_gb is not None:
        parts.append(f"mem {mem_gb:.1f} GB")
    if eta_s is not None and math.isfinite(eta_s):
        parts.append(f"ETA {format_duration(eta_s)}")
    return " | ".join(parts)
