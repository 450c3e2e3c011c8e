"""What one `hybrid-megatron eval` invocation runs: settings, task options, CPU threads."""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hybrid_megatron.errors import ConfigError
from hybrid_megatron.eval.models import (
    resolve_device,
    resolve_dtype,
)
from hybrid_megatron.eval.plan import PPL_TASK
from hybrid_megatron.eval.tasks import (
    TASKS,
    MissingTaskDataError,
    get_task,
)
from hybrid_megatron.procenv import available_cores


def _dtype_label(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class EvalSettings:
    """Everything one `hybrid-megatron eval` invocation needs."""

    output: Path
    models: list[str] = field(default_factory=list)  # paths, comma lists or globs
    all_checkpoints: list[str] = field(default_factory=list)  # run dirs: every checkpoint
    tasks: list[str] = field(default_factory=lambda: ["niah_single_1"])
    lengths: list[int] = field(default_factory=lambda: [4096])
    num_samples: int = 10
    seed: int = 42
    batch_size: int = 1
    device: str = "auto"
    dtype: str | None = None
    max_new_tokens: int | None = None  # overrides every task's generation budget
    task_options: dict[str, Any] = field(default_factory=dict)  # "key" or "task.key"
    grid: bool = False
    depths: list[float] | None = None
    model_template: str | None = None
    tokenizer: str | None = None
    attn_implementation: str | None = None
    ppl_data: str | None = None
    ppl_pack: bool = False
    ppl_bin_width: int | None = None
    log_every: int = 10
    stop_after: int | None = None  # stop after this many newly finished samples (this rank)
    aggregate: bool = True
    plots: bool = True
    wait_timeout: float = 600.0
    verify_conversion: bool = True
    check_generation: bool = True  # cached vs full-forward decoding on each model's 1st prompt
    threads: int | None = None  # CPU threads per process (None: see `cpu_threads`)

    def __post_init__(self) -> None:
        self.output = Path(self.output)

    def sample_settings(self, device: torch.device | None = None) -> dict[str, Any]:
        """What shapes the samples, the predictions and their scores (must match on restart);
        `device`: the resolved device (its type and the dtype it implies are recorded)."""
        import transformers

        device = device or resolve_device(self.device)
        return {
            "dtype": _dtype_label(resolve_dtype(self.dtype, device)),
            "device": device.type,
            "attn_implementation": self.attn_implementation,
            "batch_size": self.batch_size,
            "transformers": transformers.__version__,
            "torch": torch.__version__.split("+")[0],
            "seed": self.seed,
            "task_options": self.task_options,
            "max_new_tokens": self.max_new_tokens,
            "model_template": self.model_template,
            "tokenizer": self.tokenizer,
            "ppl": {
                "data": self.ppl_data,
                "pack": self.ppl_pack or self.ppl_data is None,
                "bin_width": self.ppl_bin_width,
            },
        }


# ----------------------------------------------------------------------------- tasks


def _accepted_options(task: str) -> set[str]:
    from hybrid_megatron.eval.tasks import registry

    cls = registry._SPECS[task][0]
    return set(inspect.signature(cls.__init__).parameters) - {"self", "name"}


def task_options_for(settings: EvalSettings, task: str) -> dict[str, Any]:
    """Options of one task: unscoped ones it accepts, `task.key` ones, --max-new-tokens."""
    from hybrid_megatron.eval.tasks.registry import SHARED_OPTIONS

    accepted = _accepted_options(task) | set(SHARED_OPTIONS)
    opts: dict[str, Any] = {}
    for key, value in settings.task_options.items():
        scope, _, name = key.rpartition(".")
        if scope == task or (not scope and name in accepted):
            opts[name] = value
    if settings.max_new_tokens is not None:
        opts["max_new_tokens"] = settings.max_new_tokens
    return opts


def check_tasks(settings: EvalSettings) -> None:
    """Unknown tasks, options no task takes and grid-incapable tasks fail before any work."""
    known = [*TASKS, PPL_TASK]
    for task in settings.tasks:
        if task not in known:
            raise ConfigError(f"unknown task '{task}'; choose from {', '.join(known)}.")
    gen_tasks = [t for t in settings.tasks if t != PPL_TASK]
    for key in settings.task_options:
        scope, _, name = key.rpartition(".")
        if scope:
            if scope not in gen_tasks:
                raise ConfigError(f"--task-option {key}: '{scope}' is not among --tasks.")
            if name not in _accepted_options(scope):
                raise ConfigError(
                    f"--task-option {key}: task '{scope}' has no option '{name}'; it accepts "
                    f"{', '.join(sorted(_accepted_options(scope)))}."
                )
        elif not any(name in _accepted_options(t) for t in gen_tasks):
            raise ConfigError(f"--task-option {key}: none of the tasks has an option '{name}'.")


def grid_tasks(settings: EvalSettings) -> list[str]:
    """Tasks evaluated at every grid depth: those with a needle depth (niah_*, passkey)."""
    if not settings.grid:
        return []
    return [t for t in settings.tasks if t != PPL_TASK and "depth" in _accepted_options(t)]


def missing_data(settings: EvalSettings) -> dict[str, str]:
    """task -> reason, for tasks whose data files are absent (they are skipped)."""
    skipped = {}
    for task in settings.tasks:
        if task == PPL_TASK:
            if settings.ppl_data is not None and not Path(settings.ppl_data).expanduser().exists():
                skipped[task] = (
                    f"perplexity data {settings.ppl_data} does not exist; pass --ppl-data with "
                    "a .jsonl/.txt file or directory, or leave it out for synthetic documents."
                )
            continue
        try:
            gen = get_task(task, **task_options_for(settings, task))
        except MissingTaskDataError as err:
            skipped[task] = str(err)
            continue
        except ValueError as err:
            raise ConfigError(f"task '{task}': {err}") from err
        gen.check_sample_count(settings.num_samples)
    return skipped


# ----------------------------------------------------------------------------- threads

# Below this many parameters a model's matrix products are too small to keep several CPU
# threads busy: one thread per process is fastest, and immune to an oversubscribed machine
# (measured with bench/bench_threads.py; the README has the figures).
SMALL_MODEL_PARAMS = 20_000_000


def cpu_threads(model: torch.nn.Module, requested: int | None) -> int:
    """Threads for CPU evaluation: `requested`, else OMP_NUM_THREADS if set, else one for a
    small model and the cores shared by this node's processes for a larger one."""
    if requested:
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    if sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS:
        return 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", 1)))
    return max(1, available_cores() // max(1, local))


def parse_task_options(pairs: Sequence[str]) -> dict[str, Any]:
    """['key=value', 'task.key=value'] -> dict; values parsed as YAML scalars (1, 0.5, true)."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--task-option '{pair}' is not KEY=VALUE (e.g. num_needle_v=2).")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = value
    return out
