"""Run Megatron-Core on CPU (gloo backend) for development and CI.

Megatron-Core assumes CUDA in a few places. This module is the one place that handles them;
`enable_cpu_mode()` is idempotent and must run before a model is built. What it changes:

1. `torch.cuda.current_device()` returns `"cpu"` (Megatron passes it as `device=` when it
   allocates parameters, rotary tables and `GlobalMemoryBuffer` scratch tensors).
2. The model-parallel RNG tracker (`tensor_parallel.random`) forks the CPU generator instead
   of the CUDA one, so dropout and TP-sharded init keep their named, reproducible streams.
3. `torch.cuda.manual_seed*` and `torch.cuda.synchronize` become no-ops (the first would
   queue lazy CUDA calls, the second is called by checkpoint saving).
4. `Tensor.cuda()` returns the tensor itself (Megatron moves the tied output embedding to
   CUDA before all-reducing it between the first and last pipeline stage).
5. Modules that allocate with a literal `device="cuda"` (the pipeline schedules' token
   counters, checkpoint save/load helpers, the optimizer's grad-norm and found-inf buffers,
   the context-parallel rotary slice, which also asks for pinned memory) see a `torch` whose
   factory functions map that device to CPU and drop `pin_memory`.
6. `cuda_tensor_type_names()`: Megatron's optimizer checks `param.type()` against
   'torch.cuda.FloatTensor'; inside this context (used only around optimizer construction
   and `step`) CPU tensors report the CUDA type name.

It only acts when CUDA is unavailable or when explicitly forced (CPU run on a GPU host);
nothing else in the package touches these internals.
"""

from __future__ import annotations

import contextlib
import types

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


_FACTORIES = ("zeros", "ones", "empty", "empty_like", "full", "tensor", "arange")
_MODULES_WITH_CUDA_LITERALS = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.utils",
    "megatron.core.models.common.embeddings.rope_utils",
)


def _cpu_device(device):
    if device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda"):
        return "cpu"
    return device


def _torch_with_cpu_factories() -> types.ModuleType:
    """A stand-in for the `torch` module whose factory functions turn 'cuda' into 'cpu'."""
    proxy = types.ModuleType("torch")
    proxy.__dict__.update(torch.__dict__)
    for name in _FACTORIES:
        fn = getattr(torch, name)

        def factory(*args, _fn=fn, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu_device(kwargs["device"])
            kwargs.pop("pin_memory", None)  # needs an accelerator
            return _fn(*args, **kwargs)

        setattr(proxy, name, factory)
    return proxy


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
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    tracker_cls = _make_cpu_rng_tracker_class()
    mrandom.CudaRNGStatesTracker = tracker_cls
    mrandom._CUDA_RNG_STATE_TRACKER = tracker_cls()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    import importlib

    cpu_torch = _torch_with_cpu_factories()
    for name in _MODULES_WITH_CUDA_LITERALS:
        importlib.import_module(name).torch = cpu_torch
    _ENABLED = True


@contextlib.contextmanager
def cuda_tensor_type_names():
    """While active (and CPU mode is on), `tensor.type()` of a CPU tensor reads 'torch.cuda.*'.

    Scoped to Megatron's optimizer, whose constructor and gradient clipping assert CUDA type
    names; everything else keeps the real names.
    """
    if not _ENABLED:
        yield
        return
    original = torch.Tensor.type

    def cuda_named_type(self, *args, **kwargs):
        if not args and not kwargs and self.device.type == "cpu":
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, *args, **kwargs)

    torch.Tensor.type = cuda_named_type  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.type = original  # type: ignore[method-assign]
