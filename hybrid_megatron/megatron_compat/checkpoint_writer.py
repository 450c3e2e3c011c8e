"""Keep Megatron-Core's checkpoint-writer helper process alive through stop signals.

The torch_dist save path (megatron-core 0.16) lazily starts a multiprocessing manager that
outlives each save. Slurm and `scancel --signal` deliver SIGUSR1/SIGTERM to every process of
a job step, so that helper would die and the very checkpoint the signal asks for would fail
(BrokenPipeError). Starting it in advance with those signals ignored (an ignored signal stays
ignored in the child) lets the trainer's own handler turn the signal into a clean save.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable


def start_checkpoint_writer_ignoring(signals: Iterable[signal.Signals]) -> None:
    try:  # private helper of megatron-core's async filesystem writer; absent in other versions
        from megatron.core.dist_checkpointing.strategies.filesystem_async import (
            _get_write_results_queue,
        )
    except ImportError:
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
    try:
        _get_write_results_queue()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
