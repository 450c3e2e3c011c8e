"""Long-context evaluation: offline task generators (`tasks`) and RULER scorers (`scoring`)."""

from hybrid_megatron.eval.scoring import (
    postprocess_pred,
    score_samples,
    score_task,
    string_match_all,
    string_match_part,
)
from hybrid_megatron.eval.tasks import (
    TASKS,
    MissingTaskDataError,
    Sample,
    TargetLengthError,
    generate_grid,
    generate_samples,
    get_task,
)

__all__ = [
    "TASKS",
    "MissingTaskDataError",
    "Sample",
    "TargetLengthError",
    "generate_grid",
    "generate_samples",
    "get_task",
    "postprocess_pred",
    "score_samples",
    "score_task",
    "string_match_all",
    "string_match_part",
]
