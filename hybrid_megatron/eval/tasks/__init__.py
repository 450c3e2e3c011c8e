"""Offline long-context task generators: RULER's 13 tasks, passkey and needle grids.

    from hybrid_megatron.eval.tasks import generate_samples
    samples = generate_samples("niah_single_1", tokenizer, target_length=4096, num_samples=10)

Every task is deterministic for a seed, reads only local files (essay and QA tasks need
user-provided data; see `haystack.py` and `qa.py`) and is fitted to the evaluated tokenizer.
"""

from hybrid_megatron.eval.tasks.base import Rendered, Sample, SupportsEncode, Task
from hybrid_megatron.eval.tasks.errors import (
    DATA_DIR_ENV,
    EvalDataError,
    MissingTaskDataError,
    TargetLengthError,
)
from hybrid_megatron.eval.tasks.generate import (
    DEFAULT_DEPTHS,
    GridCell,
    generate_grid,
    generate_samples,
    token_counter,
)
from hybrid_megatron.eval.tasks.registry import (
    RULER_TASKS,
    SYNTHETIC_TASKS,
    TASKS,
    get_task,
)

__all__ = [
    "DATA_DIR_ENV",
    "DEFAULT_DEPTHS",
    "RULER_TASKS",
    "SYNTHETIC_TASKS",
    "TASKS",
    "EvalDataError",
    "GridCell",
    "MissingTaskDataError",
    "Rendered",
    "Sample",
    "SupportsEncode",
    "TargetLengthError",
    "Task",
    "generate_grid",
    "generate_samples",
    "get_task",
    "token_counter",
]
