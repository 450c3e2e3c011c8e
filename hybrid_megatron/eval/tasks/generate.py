"""Generate fitted samples for a task, and needle-in-a-haystack grids.

Length contract: every sample's `length` = tokens(input + answer_prefix) + max_new_tokens
(RULER's definition) is <= `target_length`, always. The haystack is as large as fits up to
`FIT_TOLERANCE`: target_length - length < max(tokens of one haystack unit, 0.1% of
target_length), a unit being a noise line, distractor needle, essay word, cwe word, fwe word,
passkey filler character or qa document. For the synthetic tasks that is within 3% of the
target at 4K tokens and within 0.3% at 32K (measured with byte and BPE tokenizers).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hybrid_megatron.eval.tasks.base import Rendered, Sample, SupportsEncode, Task
from hybrid_megatron.eval.tasks.errors import TargetLengthError
from hybrid_megatron.eval.tasks.fitting import DoesNotFit, fit_size
from hybrid_megatron.eval.tasks.registry import get_task

DEFAULT_DEPTHS: tuple[float, ...] = tuple(float(d) for d in range(0, 101, 10))
FIT_TOLERANCE = 0.001  # fraction of the target length that may stay unused (see above)


def token_counter(tokenizer: SupportsEncode | Callable[[str], int]) -> Callable[[str], int]:
    """`text -> number of tokens` for a tokenizer with `encode`, or a counting function."""
    if hasattr(tokenizer, "encode"):
        return lambda text: len(tokenizer.encode(text))
    if callable(tokenizer):
        return tokenizer
    raise TypeError(f"expected a tokenizer with encode(text) or a callable, got {tokenizer!r}")


def _finalize(r: Rendered, model_template: str | None, remove_newline_tab: bool) -> Rendered:
    """Apply the model template (wrapping `input`) and RULER's `remove_newline_tab`."""
    text, prefix = r.input, r.answer_prefix
    if model_template is not None:
        text = model_template.replace("{task_template}", text)
    if remove_newline_tab:
        text = " ".join(text.replace("\n", " ").replace("\t", " ").split())
        lead = " " if prefix[:1].isspace() else ""
        prefix = lead + " ".join(prefix.split())
    if text is r.input and prefix is r.answer_prefix:
        return r
    return Rendered(text, prefix, r.outputs, r.depth, r.metadata)


def generate_samples(
    task: str | Task,
    tokenizer: SupportsEncode | Callable[[str], int],
    target_length: int,
    num_samples: int,
    seed: int = 42,
    *,
    start_index: int = 0,
    model_template: str | None = None,
    remove_newline_tab: bool = False,
    **options: Any,
) -> list[Sample]:
    """`num_samples` samples of `task` (a name or a `Task`) fitted to `target_length` tokens.

    Deterministic: sample `i` depends only on (task options, tokenizer, target_length, seed,
    i), so shards made with `start_index` match one big run. For niah, vt, passkey and qa the
    needles and answers do not depend on target_length, so lengths compare like with like.
    Lengths are counted with `tokenizer.encode`, which should tokenize as the model will be
    fed (e.g. with or without BOS). `model_template` (a string with `{task_template}`, e.g. a
    chat wrapper) wraps each input; `options` go to `get_task`. Raises `MissingTaskDataError`
    for absent data files and `TargetLengthError` when the target cannot hold the task at its
    smallest haystack.
    """
    if isinstance(task, Task):
        if options:
            raise ValueError("options are only accepted with a task name, not a Task instance")
        gen = task
    else:
        gen = get_task(task, **options)
    gen.check_sample_count(start_index + num_samples)
    count = token_counter(tokenizer)
    gen.setup(count, target_length, seed)

    def fit(state: Any, guess: int | None, slope: float | None) -> tuple[Rendered, Any]:
        def length_of(size: int) -> int:
            r = _finalize(gen.render(state, size), model_template, remove_newline_tab)
            return count(r.input + r.answer_prefix) + gen.max_new_tokens

        try:
            result = fit_size(
                length_of,
                target_length,
                min_size=gen.min_size(state),
                guess=guess,
                slope=slope,
                tolerance=FIT_TOLERANCE * target_length,
            )
        except DoesNotFit as err:
            raise TargetLengthError(
                f"target_length {target_length} is too short for task '{gen.name}': its "
                f"smallest prompt plus {gen.max_new_tokens} generated tokens takes {err.length} "
                "tokens. Use a longer target length."
            ) from None
        rendered = _finalize(gen.render(state, result.size), model_template, remove_newline_tab)
        return rendered, result

    # One probe sample fixes the starting point of every sample's search (shard-invariant).
    _, probe = fit(
        gen.draw(random.Random(f"{seed}/{gen.name}/probe"), -1, target_length), None, None
    )
    samples = []
    for index in range(start_index, start_index + num_samples):
        state = gen.draw(random.Random(f"{seed}/{gen.name}/{index}"), index, target_length)
        r, result = fit(state, probe.size, probe.slope)
        samples.append(
            Sample(
                index=index,
                task=gen.name,
                input=r.input,
                answer_prefix=r.answer_prefix,
                outputs=list(r.outputs),
                length=result.length,
                target_length=target_length,
                max_new_tokens=gen.max_new_tokens,
                depth=r.depth,
                metric=gen.metric,
                metadata={**r.metadata, "fit_evals": result.evals},
            )
        )
    return samples


@dataclass
class GridCell:
    """The samples of one (context length, needle depth) cell of a needle grid."""

    target_length: int
    depth: float
    samples: list[Sample] = field(default_factory=list)


def generate_grid(
    tokenizer: SupportsEncode | Callable[[str], int],
    lengths: Sequence[int],
    depths: Sequence[float] = DEFAULT_DEPTHS,
    num_samples: int = 1,
    seed: int = 42,
    *,
    task: str = "niah_single_1",
    **options: Any,
) -> list[GridCell]:
    """A needle-in-a-haystack grid: `num_samples` samples per (length, depth) cell.

    `task` is any niah task or "passkey"; its queried needle goes to each depth. The same
    seed is used in every cell, so cells differ only in haystack length and needle depth.
    """
    cells = []
    for length in lengths:
        for depth in depths:
            gen = get_task(task, depth=depth, **options)
            cells.append(
                GridCell(
                    length,
                    float(depth),
                    generate_samples(gen, tokenizer, length, num_samples, seed),
                )
            )
    return cells
