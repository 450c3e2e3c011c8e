"""Keep Megatron-Core's checkpoint-writer helper process alive through stop signals.

The torch_dist save path (megatron-core 0.16) lazily starts a multiprocessing manager that
outlives each save. Slurm and `scancel --signal` deliver SIGUSR1/SIGTERM to every process of
a job step, so that helper would die and the very checkpoint the signal asks for would fail
(BrokenPipeError). Starting it in advance with those signals ignored (an ignored signal stays
ignored in the child) lets the trainer's own handler turn the signal into a clean save.

Megatron starts that manager with the "spawn" method (a fresh interpreter, which an at-fork
hook never reaches), so it would outlive a SIGKILLed trainer, and keep its resource tracker
alive, for good. It is started here with "fork" instead, from the main thread after
`lifetime.tie_forked_children()`, so it dies with the trainer.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable

from hybrid_megatron.lifetime import tie_forked_children


def start_checkpoint_writer_ignoring(signals: Iterable[signal.Signals]) -> None:
    import multiprocessing as mp

    try:  # private state of megatron-core's async filesystem writer; absent in other versions
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    if not hasattr(filesystem_async, "_results_queue"):
        return
    tie_forked_children()
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
    try:
        if filesystem_async._results_queue is None:
            filesystem_async._results_queue = mp.get_context("fork").Manager().Queue()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
