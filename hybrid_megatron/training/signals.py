"""Turn SIGTERM / SIGUSR1 into a "checkpoint and stop" request agreed on by every rank."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from hybrid_megatron.megatron_compat.checkpoint_writer import start_checkpoint_writer_ignoring

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Records a received signal; `agreed()` is collective (any rank's signal stops all)."""

    def __init__(self, signals=DEFAULT_SIGNALS, enabled: bool = True) -> None:
        self.received: int | None = None
        self._previous = {}
        if enabled:
            start_checkpoint_writer_ignoring(signals)
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "signal"

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
