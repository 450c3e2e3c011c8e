"""Task names and their RULER configurations; `get_task` builds a generator by name."""

from __future__ import annotations

import inspect
from typing import Any

from hybrid_megatron.eval.tasks.base import Task
from hybrid_megatron.eval.tasks.common_words import CommonWordsTask
from hybrid_megatron.eval.tasks.freq_words import FreqWordsTask
from hybrid_megatron.eval.tasks.niah import NiahTask
from hybrid_megatron.eval.tasks.passkey import PasskeyTask
from hybrid_megatron.eval.tasks.qa import QaTask
from hybrid_megatron.eval.tasks.variable_tracking import VariableTrackingTask

# name -> (generator class, RULER's options for it: scripts/synthetic.yaml)
_SPECS: dict[str, tuple[type[Task], dict[str, Any]]] = {
    "niah_single_1": (NiahTask, {"haystack": "noise"}),
    "niah_single_2": (NiahTask, {"haystack": "essay"}),
    "niah_single_3": (NiahTask, {"haystack": "essay", "type_needle_v": "uuids"}),
    "niah_multikey_1": (NiahTask, {"haystack": "essay", "num_needle_k": 4}),
    "niah_multikey_2": (NiahTask, {"haystack": "needle"}),
    "niah_multikey_3": (
        NiahTask,
        {"haystack": "needle", "type_needle_k": "uuids", "type_needle_v": "uuids"},
    ),
    "niah_multivalue": (NiahTask, {"haystack": "essay", "num_needle_v": 4}),
    "niah_multiquery": (NiahTask, {"haystack": "essay", "num_needle_q": 4}),
    "vt": (VariableTrackingTask, {"num_chains": 1, "num_hops": 4}),
    "cwe": (CommonWordsTask, {"freq_cw": 30, "freq_ucw": 3, "num_cw": 10}),
    "fwe": (FreqWordsTask, {"alpha": 2.0}),
    "qa_1": (QaTask, {"dataset": "squad"}),
    "qa_2": (QaTask, {"dataset": "hotpotqa"}),
    "passkey": (PasskeyTask, {}),
}

RULER_TASKS: tuple[str, ...] = tuple(n for n in _SPECS if n != "passkey")
TASKS: list[str] = list(_SPECS)
# Tasks that need no user-provided files with their default options.
SYNTHETIC_TASKS: tuple[str, ...] = tuple(
    n for n, (cls, opts) in _SPECS.items() if cls is not QaTask and opts.get("haystack") != "essay"
)
# Options a runner may pass to every task; tasks that read no files ignore them.
SHARED_OPTIONS = frozenset({"data_dir", "essay_path", "qa_path"})


def get_task(name: str, **options: Any) -> Task:
    """The generator for task `name` with RULER's settings, overridden by `options`.

    Raises `MissingTaskDataError` when the task needs a local file that is absent (essay or
    QA tasks), so a runner can skip it with the error's message.
    """
    if name not in _SPECS:
        raise ValueError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}")
    cls, defaults = _SPECS[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "name"}
    unknown = set(options) - accepted - SHARED_OPTIONS
    if unknown:
        raise ValueError(
            f"task '{name}' has no option(s) {', '.join(sorted(unknown))}; "
            f"it accepts {', '.join(sorted(accepted))}"
        )
    kwargs = {**defaults, **{k: v for k, v in options.items() if k in accepted}}
    return cls(name, **kwargs)
