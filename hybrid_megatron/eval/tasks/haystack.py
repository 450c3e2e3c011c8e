"""Haystacks: the noise sentence, distractor needles, and user-provided essays.

Essays are read from local files only. `essay_path` may be
- a directory: every `*.txt` file in it (sorted by name) is read and concatenated;
- a `.txt` file;
- a `.json` file: `{"text": "..."}` (RULER's PaulGrahamEssays.json), a list of strings, or a
  list of `{"text": ...}` objects.
Without `essay_path`, `DATA_DIR/essays/` then `DATA_DIR/PaulGrahamEssays.json` are tried, where
`DATA_DIR` is the `data_dir` option or the `HYBRID_MEGATRON_EVAL_DATA` environment variable.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hybrid_megatron.eval.tasks.errors import DATA_DIR_ENV, EvalDataError, MissingTaskDataError

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# RULER's needle depths for essay haystacks: 40 evenly spaced integer percents.
DEPTHS: tuple[int, ...] = tuple(round(i * 100 / 39) for i in range(40))
ESSAY_HINT = (
    'Provide essays as a directory of .txt files or a JSON file {"text": ...} '
    "(like RULER's PaulGrahamEssays.json) with essay_path=PATH, or put them at "
    "DATA_DIR/essays/ or DATA_DIR/PaulGrahamEssays.json."
)
_CLOSERS = "\"')]’”"
_OPENERS = "\"'([‘“"


def depth_index(depth: float, n: int) -> int:
    """Insertion index for a needle at `depth` percent among `n` units (RULER's rule)."""
    return min(n, max(0, int(n * (depth / 100.0))))


def insert_items(units: Sequence[str], items: Sequence[tuple[int, str]]) -> list[str]:
    """`units` with each `(index, text)` inserted before `units[index]` (stable for ties)."""
    out: list[str] = []
    pos = 0
    for index, text in sorted(items, key=lambda it: it[0]):
        out.extend(units[pos:index])
        pos = max(pos, index)
        out.append(text)
    out.extend(units[pos:])
    return out


def data_dir(option: str | os.PathLike | None) -> Path | None:
    """The evaluation data directory: the option, else `$HYBRID_MEGATRON_EVAL_DATA`, else None."""
    value = option if option is not None else os.environ.get(DATA_DIR_ENV)
    return None if value in (None, "") else Path(value).expanduser()


def resolve_essay_path(
    task: str, essay_path: str | os.PathLike | None, data_dir_option: str | os.PathLike | None
) -> Path:
    """The essay file/directory to use, or `MissingTaskDataError` naming what to provide."""
    if essay_path is not None:
        path = Path(essay_path).expanduser()
        if not path.exists():
            raise MissingTaskDataError(task, "essay text for its haystack", path, ESSAY_HINT)
        return path
    root = data_dir(data_dir_option)
    if root is not None:
        for cand in (root / "essays", root / "PaulGrahamEssays.json"):
            if cand.exists():
                return cand
        raise MissingTaskDataError(
            task, "essay text for its haystack", root / "PaulGrahamEssays.json", ESSAY_HINT
        )
    raise MissingTaskDataError(task, "essay text for its haystack", None, ESSAY_HINT)


def _read_essay_text(path: Path) -> str:
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise EvalDataError(f"essay directory '{path}' has no .txt files. {ESSAY_HINT}")
        return "\n".join(f.read_text(encoding="utf-8") for f in files)
    if path.suffix.lower() != ".json":
        return path.read_text(encoding="utf-8")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise EvalDataError(f"essay file '{path}' is not valid JSON ({err}). {ESSAY_HINT}") from err
    if isinstance(data, dict) and isinstance(data.get("text"), str):
        return data["text"]
    if isinstance(data, list):
        parts = [
            d if isinstance(d, str) else d.get("text") if isinstance(d, dict) else None
            for d in data
        ]
        if parts and all(isinstance(p, str) for p in parts):
            return "\n".join(parts)
    raise EvalDataError(
        f"essay file '{path}' has an unknown layout: expected {{\"text\": str}}, a list of "
        f'strings or a list of {{"text": str}}. {ESSAY_HINT}'
    )


@dataclass(frozen=True)
class Essay:
    """Essay words plus the word offsets where sentences start (computed once per file)."""

    words: tuple[str, ...]
    sentence_starts: tuple[int, ...]  # offsets into `words`, first is 0

    def sentence_offsets(self, n: int) -> list[int]:
        """Sentence start offsets within the first `n` words of the cyclically repeated essay."""
        period = len(self.words)
        out: list[int] = []
        for rep in range((n + period - 1) // period):
            base = rep * period
            cut = bisect.bisect_left(self.sentence_starts, n - base)
            out.extend(base + s for s in self.sentence_starts[:cut])
        return out

    def take(self, n: int) -> list[str]:
        """The first `n` words, repeating the essay as needed (as RULER does)."""
        return list(itertools.islice(itertools.cycle(self.words), n))


def _is_sentence_end(word: str, nxt: str) -> bool:
    w = word.rstrip(_CLOSERS)
    if not w or w[-1] not in ".!?":
        return False
    head = nxt.lstrip(_OPENERS)
    return bool(head) and (head[0].isupper() or head[0].isdigit())


@functools.lru_cache(maxsize=4)
def _load_essay(path: str, mtime: float) -> Essay:
    words = tuple(_read_essay_text(Path(path)).split())
    if not words:
        raise EvalDataError(f"essay source '{path}' is empty. {ESSAY_HINT}")
    starts = [0] + [
        i + 1 for i in range(len(words) - 1) if _is_sentence_end(words[i], words[i + 1])
    ]
    return Essay(words, tuple(starts))


def load_essay(path: Path) -> Essay:
    """The essay at `path` (file or directory), cached while the file is unchanged."""
    return _load_essay(str(path.resolve()), path.stat().st_mtime)


def essay_context(essay: Essay, n_words: int, inserts: Sequence[tuple[float, str]]) -> str:
    """The first `n_words` essay words with each `(depth, text)` inserted at a sentence start.

    A depth maps to sentence `int(num_sentences * depth / 100)`, as in RULER.
    """
    words = essay.take(n_words)
    starts = essay.sentence_offsets(n_words)
    items = []
    for depth, text in inserts:
        sent = depth_index(depth, len(starts))
        items.append((starts[sent] if sent < len(starts) else n_words, text))
    return " ".join(insert_items(words, items))
