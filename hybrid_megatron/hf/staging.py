"""Write a conversion's output next to its target, then move it into place.

Nothing at the target path is touched until the new output is complete: it is built in a
hidden sibling directory and renamed over the target at the end (an existing target is only
replaced with `overwrite=True`, and only after the new output is complete).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from hybrid_megatron.errors import ConfigError
from hybrid_megatron.paths import overlap, real_path


class OutputExistsError(ConfigError):
    """The output path holds files and overwriting was not requested."""


class OutputOverlapsSourceError(ConfigError):
    """The output path is, contains or lies inside what the command reads."""


def check_not_source(
    output: str | os.PathLike,
    source: str | os.PathLike,
    what: str,
    hint: str,
    *,
    new_inside_ok: bool = False,
) -> None:
    """Refuse an `output` that is, contains or lies inside `source`, even with overwrite.

    `new_inside_ok`: an output inside `source` is allowed when it does not exist yet or is
    an earlier Hugging Face output (holds config.json), e.g. RUN_DIR/hf for a run dir source.
    """
    how = overlap(output, source)
    if how is None:
        return
    if how == "lies inside" and new_inside_ok:
        out = Path(output)
        if not out.exists() or (out / "config.json").is_file():
            return
    resolved = f" (resolved: {real_path(output)})" if real_path(output) != Path(output) else ""
    raise OutputOverlapsSourceError(
        f"Output {output}{resolved} {how} the source {what} {source}: writing there could "
        f"destroy what is read; nothing was changed (--overwrite does not lift this). {hint}"
    )


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an existing, non-empty output unless `overwrite`."""
    if output.is_file() or output.is_symlink():
        raise OutputExistsError(
            f"Output path {output} is an existing file; choose a directory path that does not "
            "exist yet."
        )
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"Output directory {output} already exists and is not empty; nothing was changed. "
            "Choose a new path, or pass overwrite=True (--overwrite) to replace it."
        )


@contextlib.contextmanager
def staged_output(output: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temp dir beside `output`; on success it becomes `output`, on error it goes."""
    output = Path(output).absolute()
    check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _publish(tmp, output, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, output: Path, overwrite: bool) -> None:
    check_output(output, overwrite)  # it may have appeared meanwhile
    old = None
    if output.is_dir():
        old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(output, old)
    os.replace(tmp, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
