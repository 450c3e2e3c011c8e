"""Scorers with RULER's definitions, the passkey check, and aggregation helpers.

RULER (scripts/eval): a prediction is first cleaned by `postprocess_pred` (strip, every control
character U+0000-U+001F becomes a newline, strip again); then, case-insensitively,
- string_match_all: per sample, the fraction of references that occur in the prediction;
- string_match_part: per sample, 1 if any reference occurs in it;
each averaged over samples as RULER does (sum / count, then x100, rounded to 2 decimals; the
same for the averages over tasks and lengths). QA tasks use `part`, every other RULER task
`all`. Passkey: 1 if the first integer in the prediction equals the key. A prediction is empty
("null") when nothing is left after the cleaning.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_CONTROL = re.compile(r"[\x00-\x1f]")
_INTEGER = re.compile(r"\d+")

METRICS = ("string_match_all", "string_match_part", "passkey")


def postprocess_pred(prediction: str) -> str:
    """RULER's cleaning: strip, control characters -> newline, strip."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def match_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction of `references` found in `prediction` (case-insensitive substring), 0..1."""
    if not references:
        raise ValueError("a sample needs at least one reference")
    pred = prediction.lower()
    return sum(1.0 for r in references if r.lower() in pred) / len(references)


def match_part(prediction: str, references: Sequence[str]) -> float:
    """1.0 if any of `references` is found in `prediction` (case-insensitive), else 0.0."""
    if not references:
        raise ValueError("a sample needs at least one reference")
    pred = prediction.lower()
    return max(1.0 if r.lower() in pred else 0.0 for r in references)


def passkey_match(prediction: str, references: Sequence[str] | str | int) -> float:
    """1.0 if the first integer in `prediction` equals the pass key, else 0.0."""
    if isinstance(references, (str, int)):
        references = [str(references)]
    m = _INTEGER.search(prediction)
    return 1.0 if m is not None and int(m.group()) == int(references[0]) else 0.0


_SAMPLE_METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "string_match_all": match_all,
    "string_match_part": match_part,
    "passkey": passkey_match,
}


def ruler_mean(values: Sequence[float]) -> float:
    """sum / count, in RULER's order of operations (not `statistics.fmean`: ties round alike)."""
    return sum(values) / len(values)


def _mean_x100(fn: Callable, preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} reference lists")
    if not preds:
        raise ValueError("no predictions to score")
    return round(ruler_mean([fn(p, r) for p, r in zip(preds, refs)]) * 100, 2)


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER's string_match_all over a task (no postprocessing here), x100, 2 decimals."""
    return _mean_x100(match_all, preds, refs)


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER's string_match_part over a task (no postprocessing here), x100, 2 decimals."""
    return _mean_x100(match_part, preds, refs)


def passkey_accuracy(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Percent of predictions whose first integer is the pass key, 2 decimals."""
    return _mean_x100(passkey_match, preds, refs)


def metric_for_task(task: str) -> str:
    """The metric RULER uses for `task`: qa -> string_match_part; passkey; else _all."""
    if task.startswith("qa"):
        return "string_match_part"
    if task.startswith("passkey"):
        return "passkey"
    return "string_match_all"


def score_sample(prediction: str, references: Sequence[str], metric: str) -> float:
    """One sample's score in [0, 1], after `postprocess_pred`."""
    if metric not in _SAMPLE_METRICS:
        raise ValueError(f"unknown metric '{metric}'; choose one of {', '.join(METRICS)}")
    return _SAMPLE_METRICS[metric](postprocess_pred(prediction), references)


def score_task(task: str, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """RULER's task score (x100, 2 decimals) with postprocessing and the task's metric."""
    fn = _SAMPLE_METRICS[metric_for_task(task)]
    return _mean_x100(fn, [postprocess_pred(p) for p in predictions], references)


@dataclass(frozen=True)
class SampleScore:
    """One scored prediction, keyed for aggregation."""

    task: str
    target_length: int
    index: int
    score: float  # 0..1
    depth: float | None = None
    null: bool = False  # the cleaned prediction was empty


def _field(sample: Any, name: str, default: Any = None) -> Any:
    if isinstance(sample, Mapping):
        return sample.get(name, default)
    return getattr(sample, name, default)


def score_samples(samples: Iterable[Any], predictions: Iterable[str]) -> list[SampleScore]:
    """Score predictions against samples (`Sample`s or their dicts), one per sample."""
    out = []
    samples, predictions = list(samples), list(predictions)
    if len(samples) != len(predictions):
        raise ValueError(f"{len(samples)} samples but {len(predictions)} predictions")
    for s, pred in zip(samples, predictions):
        task = _field(s, "task")
        metric = _field(s, "metric") or metric_for_task(task)
        out.append(
            SampleScore(
                task=task,
                target_length=int(_field(s, "target_length")),
                index=int(_field(s, "index", -1)),
                score=score_sample(pred, _field(s, "outputs"), metric),
                depth=_field(s, "depth"),
                null=not postprocess_pred(pred),
            )
        )
    return out


def _group(scores: Iterable[SampleScore], key: Callable[[SampleScore], Any]) -> dict:
    groups: dict[Any, list[float]] = defaultdict(list)
    for s in scores:
        groups[key(s)].append(s.score)
    return {k: round(ruler_mean(v) * 100, 2) for k, v in groups.items()}


def task_length_table(scores: Iterable[SampleScore]) -> dict[str, dict[int, float]]:
    """task -> target length -> score (x100, 2 decimals), as RULER reports per task/length."""
    table: dict[str, dict[int, float]] = defaultdict(dict)
    for (task, length), v in _group(scores, lambda s: (s.task, s.target_length)).items():
        table[task][length] = v
    return {t: dict(sorted(table[t].items())) for t in sorted(table)}


def average_by_length(table: Mapping[str, Mapping[int, float]]) -> dict[int, float]:
    """Mean over tasks of each length's scores (RULER's per-length average)."""
    by_len: dict[int, list[float]] = defaultdict(list)
    for per_len in table.values():
        for length, v in per_len.items():
            by_len[length].append(v)
    return {k: round(ruler_mean(v), 2) for k, v in sorted(by_len.items())}


def average_by_task(table: Mapping[str, Mapping[int, float]]) -> dict[str, float]:
    """Mean over lengths of each task's scores."""
    return {t: round(ruler_mean(list(v.values())), 2) for t, v in table.items() if v}


def overall_average(table: Mapping[str, Mapping[int, float]]) -> float:
    """Mean of the per-length averages (RULER's headline number)."""
    per_len = average_by_length(table)
    if not per_len:
        raise ValueError("no scores to average")
    return round(ruler_mean(list(per_len.values())), 2)


def depth_length_table(scores: Iterable[SampleScore]) -> dict[int, dict[float, float]]:
    """target length -> needle depth -> score (x100): the needle-grid heatmap."""
    table: dict[int, dict[float, float]] = defaultdict(dict)
    for (length, depth), v in _group(
        (s for s in scores if s.depth is not None), lambda s: (s.target_length, s.depth)
    ).items():
        table[length][depth] = v
    return {k: dict(sorted(table[k].items())) for k in sorted(table)}


def null_counts(scores: Iterable[SampleScore]) -> dict[tuple[str, int], str]:
    """(task, length) -> "empty/total" predictions, as RULER's 'Nulls' row."""
    counts: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
    for s in scores:
        c = counts[(s.task, s.target_length)]
        c[0] += int(s.null)
        c[1] += 1
    return {k: f"{a}/{b}" for k, (a, b) in sorted(counts.items())}
