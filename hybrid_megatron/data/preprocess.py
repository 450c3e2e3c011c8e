"""Tokenize raw text into Megatron-Core's indexed dataset format (PREFIX.bin / PREFIX.idx).

Inputs (files, or directories searched recursively for them, in sorted order):

* ``.jsonl``: one JSON object per line; the document is the string under `json_key`
  (default "text"). Blank lines are skipped.
* ``.txt``: with ``txt_mode="file"`` (default) the whole file is one document; with
  ``txt_mode="paragraph"`` every blank-line-separated paragraph is a document (paragraphs are
  stripped of surrounding whitespace;
  runs of blank lines are one separator).

Documents whose text is empty or whitespace-only are skipped (and counted). Every other document
is tokenized without special tokens and followed by the tokenizer's `eod`, then written as one
sequence/document with `IndexedDatasetBuilder`; the token dtype is chosen from the vocabulary size
as Megatron does (`DType.optimal_dtype`: uint16 below 65500, else int32). A sidecar PREFIX.json
records the tokenizer spec, vocab size, eod id and the document/token counts; `build_datasets`
checks it against the model. Outputs are written to temporary names and moved into place only
on success, so a failed run never leaves a half-written dataset behind.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hybrid_megatron.data.errors import DataError
from hybrid_megatron.data.tokenizer import Tokenizer, build_tokenizer

SIDECAR_VERSION = 1
TXT_MODES = ("file", "paragraph")
_SUFFIXES = (".jsonl", ".txt")
_PARAGRAPH_SPLIT = re.compile(r"\n\s*\n")


@dataclass(frozen=True)
class PreprocessResult:
    """What `preprocess` wrote."""

    prefix: Path
    num_documents: int
    num_tokens: int  # including one eod per document
    skipped_empty: int
    seconds: float


def sidecar_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.json")


def read_sidecar(prefix: str | os.PathLike) -> dict | None:
    """The PREFIX.json metadata written by `preprocess`, or None if there is none."""
    path = sidecar_path(prefix)
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(
            f"cannot read the preprocessing sidecar {path}: {err}. Delete it or re-run "
            "tools/preprocess_data.py for this prefix."
        ) from err
    if not isinstance(meta, dict) or "vocab_size" not in meta:
        raise DataError(
            f"{path} is not a preprocessing sidecar (no 'vocab_size'). Delete it or re-run "
            "tools/preprocess_data.py for this prefix."
        )
    return meta


def strip_prefix_suffix(prefix: str | os.PathLike) -> str:
    """Accept 'data/x', 'data/x.bin' or 'data/x.idx' for the prefix 'data/x'."""
    s = os.fspath(prefix)
    for suffix in (".bin", ".idx"):
        if s.endswith(suffix):
            return s[: -len(suffix)]
    return s


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Input files in processing order; directories contribute their .jsonl/.txt files."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise DataError("no input files given; pass one or more .jsonl/.txt files or directories.")
    files: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if not p.exists():
            raise DataError(f"input '{item}' does not exist; check the path.")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _SUFFIXES)
            if not found:
                raise DataError(
                    f"input directory '{item}' contains no {' or '.join(_SUFFIXES)} files."
                )
            files.extend(found)
        elif p.suffix in _SUFFIXES:
            files.append(p)
        else:
            raise DataError(
                f"input '{item}' has an unsupported extension '{p.suffix}'; supported: "
                f"{', '.join(_SUFFIXES)} (JSON lines, or plain text)."
            )
    return files


def _decode_line(path: Path, lineno: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}:{lineno}: not valid UTF-8 at byte {err.start + 1} of the line "
            f"({err.reason}); re-encode the file as UTF-8."
        ) from None


def _iter_jsonl(path: Path, json_key: str) -> Iterator[str]:
    # Bytes line by line, decoded one at a time: a decoding error names its own line (a text
    # stream decodes ahead in blocks, so its errors surface lines later).
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode_line(path, lineno, raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}:{lineno}: invalid JSON ({err.msg}, column {err.colno}). Each "
                    f'line must be one JSON object such as {{"{json_key}": "..."}}.'
                ) from None
            if not isinstance(record, dict):
                raise DataError(
                    f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}."
                    f' Each line must look like {{"{json_key}": "..."}}.'
                )
            if json_key not in record:
                keys = ", ".join(repr(k) for k in list(record)[:10]) or "none"
                raise DataError(
                    f"{path}:{lineno}: no key '{json_key}' (keys present: {keys}). Pass the "
                    "key holding the text with --json-key (json_key=...)."
                )
            text = record[json_key]
            if not isinstance(text, str):
                raise DataError(
                    f"{path}:{lineno}: '{json_key}' holds a {type(text).__name__}, "
                    "expected a string."
                )
            yield text


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 at byte {column} of the line ({err.reason}); "
            "re-encode the file as UTF-8."
        ) from None


def iter_file_documents(
    path: Path, json_key: str = "text", txt_mode: str = "file"
) -> Iterator[str]:
    """Documents of one .jsonl (text under `json_key`) or .txt file (whole or per paragraph)."""
    if path.suffix == ".jsonl":
        yield from _iter_jsonl(path, json_key)
    elif txt_mode == "file":
        yield _read_text(path)
    else:
        paragraphs = (p.strip() for p in _PARAGRAPH_SPLIT.split(_read_text(path)))
        yield from (p for p in paragraphs if p)  # blank runs are separators, not documents


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def preprocess(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    output_prefix: str | os.PathLike,
    tokenizer: str | Tokenizer = "byte",
    *,
    json_key: str = "text",
    txt_mode: str = "file",
    batch_size: int = 1024,
    progress_interval: float = 10.0,
    log: Callable[[str], None] | None = _stderr,
) -> PreprocessResult:
    """Tokenize `inputs` into OUTPUT_PREFIX.bin/.idx (+ .json sidecar); see the module doc.

    `tokenizer` is a spec for `build_tokenizer` ('byte' or a local HF directory) or a tokenizer
    object with a `spec`. Progress (docs/s) goes to `log` every `progress_interval` seconds.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    log = log or (lambda msg: None)
    # Validate everything cheap before reading any data.
    if txt_mode not in TXT_MODES:
        raise DataError(f"txt_mode={txt_mode!r}; use one of {', '.join(TXT_MODES)}.")
    if not json_key:
        raise DataError("json_key is empty; pass the JSON key that holds the text (e.g. 'text').")
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size}; use batch_size >= 1.")
    files = expand_inputs(inputs)
    if all(f.stat().st_size == 0 for f in files):
        raise DataError(
            f"no documents: every input file is empty ({', '.join(map(str, files[:5]))}"
            f"{', ...' if len(files) > 5 else ''})."
        )
    tok = build_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    prefix = Path(strip_prefix_suffix(output_prefix)).expanduser()
    if prefix.is_dir():
        raise DataError(
            f"output prefix '{output_prefix}' is a directory; pass a file prefix such as "
            f"'{prefix / 'train'}' (PREFIX.bin and PREFIX.idx are written)."
        )
    prefix.parent.mkdir(parents=True, exist_ok=True)

    vocab_size, eod = int(tok.vocab_size), int(tok.eod)
    dtype = DType.optimal_dtype(vocab_size)
    final = {ext: Path(f"{prefix}.{ext}") for ext in ("bin", "idx", "json")}
    tmp = {ext: Path(f"{p}.tmp-{os.getpid()}") for ext, p in final.items()}

    t0 = last = time.perf_counter()
    n_docs = n_tokens = n_skipped = 0

    def flush(batch: list[str], builder: IndexedDatasetBuilder) -> None:
        nonlocal n_docs, n_tokens
        for ids in tok.encode_batch(batch):
            arr = np.empty(len(ids) + 1, dtype=np.int64)
            arr[:-1] = ids
            arr[-1] = eod
            top, bottom = int(arr.max()), int(arr.min())
            if top >= vocab_size or bottom < 0:
                raise DataError(
                    f"tokenizer {tok.spec!r} produced id {top if bottom >= 0 else bottom} "
                    f"outside its vocabulary of "
                    f"{vocab_size}; the tokenizer files are inconsistent."
                )
            builder.add_document(arr, [arr.size])
            n_docs += 1
            n_tokens += arr.size

    try:
        builder = IndexedDatasetBuilder(str(tmp["bin"]), dtype=dtype)
        try:
            for path in files:
                docs_before = n_docs
                batch: list[str] = []
                for text in iter_file_documents(path, json_key, txt_mode):
                    if not text.strip():
                        n_skipped += 1
                        continue
                    batch.append(text)
                    if len(batch) >= batch_size:
                        flush(batch, builder)
                        batch = []
                        now = time.perf_counter()
                        if now - last >= progress_interval:
                            last = now
                            log(
                                f"preprocess: {n_docs:,} docs, {n_tokens:,} tokens, "
                                f"{n_docs / (now - t0):,.0f} docs/s ({path.name})"
                            )
                flush(batch, builder)
                if n_docs == docs_before:
                    log(f"preprocess: warning: no documents in {path}")
        finally:
            builder.data_file.close()
        if n_docs == 0:
            raise DataError(
                f"no documents found in {len(files)} input file(s) "
                f"({', '.join(map(str, files[:5]))}{', ...' if len(files) > 5 else ''}): "
                f"they are empty or hold only empty texts ({n_skipped} skipped)."
            )
        builder.finalize(str(tmp["idx"]))
        seconds = time.perf_counter() - t0
        meta = {
            "format_version": SIDECAR_VERSION,
            "tokenizer": tok.spec,
            "vocab_size": vocab_size,
            "eod": eod,
            "dtype": np.dtype(dtype).name,
            "num_documents": n_docs,
            "num_tokens": n_tokens,
            "skipped_empty": n_skipped,
            "json_key": json_key,
            "txt_mode": txt_mode,
            "num_inputs": len(files),
            "inputs": [str(f.resolve()) for f in files[:100]],  # the first 100
        }
        tmp["json"].write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        for ext in ("bin", "idx", "json"):
            os.replace(tmp[ext], final[ext])
    finally:
        for p in tmp.values():
            p.unlink(missing_ok=True)
    log(
        f"preprocess: wrote {prefix}.bin/.idx: {n_docs:,} docs, {n_tokens:,} tokens "
        f"({np.dtype(dtype).name}) in {seconds:.1f}s ({n_docs / max(seconds, 1e-9):,.0f} docs/s)"
    )
    return PreprocessResult(prefix, n_docs, n_tokens, n_skipped, seconds)
