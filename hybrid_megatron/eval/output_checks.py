"""What an evaluation output directory may be and hold: refused before any work."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hybrid_megatron.errors import ConfigError
from hybrid_megatron.eval.models import ModelSource


def check_output_dir(out: Path, sources: Sequence[ModelSource]) -> None:
    """Refuse an output dir that is or lies inside a model being evaluated: a run's
    checkpoints dir (retention deletes checkpoint dirs, conversion replaces HF dirs, and the
    results would go with them)."""
    from hybrid_megatron.paths import overlap

    for source in sources:
        protected = source.path.parent if source.kind == "megatron" else source.path
        how = overlap(out, protected)
        if how in ("is", "lies inside"):
            what = "checkpoints directory" if source.kind == "megatron" else "model directory"
            raise ConfigError(
                f"--output {out} {how} the {what} {protected} of model {source.name}: results "
                "there are lost when checkpoints are pruned or the model is converted again. "
                "Write them to a separate directory, e.g. RUN_DIR/eval."
            )


def check_same_models(out: Path, rows: Sequence[dict], sources: Sequence[ModelSource]) -> None:
    """Refuse when `out` holds results of a different model (another identity) under the name
    of one of `sources`: the results would be shown together under one name."""
    for source in sources:
        other = next(
            (
                r
                for r in rows
                if r.get("model") == source.name and r.get("model_id") != source.identity
            ),
            None,
        )
        if other is not None:
            raise ConfigError(
                f"{out} already holds results of a different model named '{source.name}' "
                f"(from {other.get('model_path')}, id {other.get('model_id') or 'unknown'}); "
                f"this one is {source.path} (id {source.identity}): its weights differ or it "
                "moved. Write to a new --output directory, or delete the old results."
            )
