"""Run Megatron-Core on CPU (gloo backend) for development and CI.

Megatron-Core assumes CUDA in a few places. This module is the one place that handles them;
`enable_cpu_mode()` is idempotent and must run before a model is built. What it changes:

1. `torch.cuda.current_device()` returns `"cpu"` (Megatron passes it as `device=` when it
   allocates parameters, rotary tables and `GlobalMemoryBuffer` scratch tensors).
2. The model-parallel RNG tracker (`tensor_parallel.random`) forks the CPU generator instead
   of the CUDA one, so dropout and TP-sharded init keep their named, reproducible streams.
3. `torch.cuda.manual_seed*` become no-ops (they would queue lazy CUDA calls).

It only acts when CUDA is unavailable or when explicitly forced (CPU run on a GPU host);
nothing else in the package touches these internals.
"""

from __future__ import annotations

import contextlib

import torch

_ENABLED = False


def cpu_mode_enabled() -> bool:
    return _ENABLED


def _make_cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Named RNG streams over the CPU generator (same interface as Megatron's tracker)."""

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise RuntimeError(f"seed {seed} already exists")
            if name in self.states_:
                raise RuntimeError(f"rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise RuntimeError(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker


def enable_cpu_mode(force: bool = False) -> None:
    """Patch Megatron-Core's CUDA assumptions so models build and train on CPU."""
    global _ENABLED
    if _ENABLED:
        return
    if torch.cuda.is_available() and not force:
        return
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.manual_seed = lambda seed: None  # type: ignore[assignment]
    torch.cuda.manual_seed_all = lambda seed: None  # type: ignore[assignment]
    tracker_cls = _make_cpu_rng_tracker_class()
    mrandom.CudaRNGStatesTracker = tracker_cls
    mrandom._CUDA_RNG_STATE_TRACKER = tracker_cls()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _ENABLED = True
