"""Errors raised by the task generators; all are user mistakes with a named fix."""

from __future__ import annotations

from pathlib import Path

from hybrid_megatron.errors import ConfigError

DATA_DIR_ENV = "HYBRID_MEGATRON_EVAL_DATA"


class EvalDataError(ConfigError):
    """A user-provided evaluation data file is malformed; the message names the file and format."""


class MissingTaskDataError(EvalDataError):
    """A task needs a local data file that is not there (nothing is ever downloaded).

    Runners catch this to skip the task: `task`, `path` and `hint` say what is missing and how
    to provide it.
    """

    def __init__(self, task: str, what: str, path: str | Path | None, hint: str) -> None:
        self.task = task
        self.path = None if path is None else str(path)
        self.hint = hint
        where = f"'{path}' does not exist" if path is not None else "no file was given"
        super().__init__(
            f"task '{task}' needs {what}, but {where}. {hint} "
            f"(You can also set {DATA_DIR_ENV}=DIR or pass data_dir=DIR; nothing is downloaded.)"
        )


class TargetLengthError(ConfigError):
    """The target length is too short for the task's template, needles and generation budget."""
