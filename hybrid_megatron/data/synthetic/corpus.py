"""The document mix: which kind document i is, and the whole corpus as JSONL."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hybrid_megatron.data.synthetic.formats import (
    _NOISE_LINE,
    _PASSKEY_KEYS,
    _REPEAT_HEAD,
    _REPEAT_SEP,
    KINDS,
    _copy_block_chars,
    _copy_counts,
    _niah_text,
    _pad,
    _passkey_text,
    generate_copy_document,
    generate_niah_document,
    generate_passkey_document,
    generate_repeat_document,
)
from hybrid_megatron.data.synthetic.recall import SyntheticDocument, _check_args, generate_document
from hybrid_megatron.errors import ConfigError
from hybrid_megatron.eval.tasks.words import load_words

MIX_FIELDS = dict(
    zip(("niah_fraction", "passkey_fraction", "copy_fraction", "repeat_fraction"), KINDS[1:])
)


def check_mix(fractions: tuple[float, ...], doc_length: int | None, prefix: str = "") -> None:
    """Raise ConfigError unless the document-mix fractions and `doc_length` are usable."""
    if min(fractions) < 0 or sum(fractions) > 1:
        given = ", ".join(f"{prefix}{k}={v}" for k, v in zip(MIX_FIELDS, fractions))
        raise ConfigError(
            f"{given}: fractions must be >= 0 with a sum <= 1 (the rest are recall documents)."
        )
    if doc_length is not None and doc_length < 1:
        raise ConfigError(f"doc_length={doc_length}; use doc_length >= 1 or leave it unset.")


def check_haystack(
    max_haystack: int | None, min_distance: int, max_distance: int, prefix: str = ""
) -> int:
    """`max_haystack`, defaulting to `max_distance`; ConfigError if below `min_distance`."""
    if max_haystack is None:
        return max_distance
    if max_haystack < min_distance:
        raise ConfigError(
            f"{prefix}max_haystack={max_haystack} is below min_distance={min_distance}; use "
            "max_haystack >= min_distance, or leave it unset (= max_distance)."
        )
    return max_haystack


def smallest_document(kind: str, min_distance: int) -> int:
    """Characters of the shortest possible niah / passkey_prompt / copy / repeat document.

    With `doc_length` shorter than this, such documents overflow their training sequence
    (so `fill_sequences` no longer gives one whole document per sequence).
    """
    if kind == "niah":
        longest = max(load_words("adjectives"), key=len) + "-" + max(load_words("nouns"), key=len)
        return len(_niah_text(longest, "9" * 7, 0, 0).text)
    if kind == "passkey_prompt":
        return len(_passkey_text(_PASSKEY_KEYS[1], 0.0, 0).text)
    if kind == "copy":
        return _copy_block_chars(_copy_counts(min_distance, min_distance)[0])
    if kind == "repeat":
        return len(_REPEAT_HEAD) + 2 * min_distance - len(_REPEAT_SEP)
    raise ValueError(f"no smallest size for document kind {kind!r}")


def document_kind(seed: int, index: int, fractions: tuple[float, ...]) -> str:
    """The kind of document `index` (one of `KINDS`), from its own random stream.

    `fractions` are those of niah, passkey_prompt, copy and repeat documents; the rest are
    recall. A kind added later takes its share from the end, so earlier kinds keep theirs.
    """
    if not any(fractions):
        return "recall"
    u = random.Random(f"hybrid-megatron-synthetic-kind:{seed}:{index}").random()
    for kind, fraction in zip(KINDS[1:], fractions):
        if u < fraction:
            return kind
        u -= fraction
    return "recall"


def iter_documents(
    num_docs: int,
    seed: int = 0,
    min_distance: int = 16,
    max_distance: int = 256,
    max_facts: int = 3,
    *,
    niah_fraction: float = 0.0,
    passkey_fraction: float = 0.0,
    copy_fraction: float = 0.0,
    repeat_fraction: float = 0.0,
    doc_length: int | None = None,
    max_haystack: int | None = None,
) -> Iterator[SyntheticDocument]:
    """Documents 0..num_docs-1; document i depends only on (seed, i) and the options.

    The options are checked here (ConfigError), before the first document is made.
    """
    _check_args(min_distance, max_distance, max_facts)
    fractions = (niah_fraction, passkey_fraction, copy_fraction, repeat_fraction)
    check_mix(fractions, doc_length)
    haystack = check_haystack(max_haystack, min_distance, max_distance)
    return _documents(
        num_docs, seed, min_distance, max_distance, max_facts, fractions, doc_length, haystack
    )


def _documents(
    num_docs: int,
    seed: int,
    min_distance: int,
    max_distance: int,
    max_facts: int,
    fractions: tuple[float, ...],
    doc_length: int | None,
    haystack: int,
) -> Iterator[SyntheticDocument]:
    for i in range(num_docs):
        rng = random.Random(f"hybrid-megatron-synthetic:{seed}:{i}")
        kind = document_kind(seed, i, fractions)
        if kind == "niah":
            yield generate_niah_document(rng, haystack // _NOISE_LINE, doc_length)
        elif kind == "passkey_prompt":
            yield generate_passkey_document(rng, min_distance, haystack, doc_length)
        elif kind == "copy":
            yield generate_copy_document(rng, min_distance, max_distance, doc_length)
        elif kind == "repeat":
            yield generate_repeat_document(rng, min_distance, max_distance, doc_length)
        else:
            doc = generate_document(rng, min_distance, max_distance, max_facts)
            yield SyntheticDocument(_pad(doc.text, doc_length), doc.facts)


def generate_corpus(
    path: str | Path, num_docs: int, seed: int = 0, *, include_facts: bool = False, **options: Any
) -> Path:
    """Write `num_docs` documents as JSONL lines ``{"text": ...}`` to `path` and return it.

    `options` are `iter_documents`' (min_distance, max_distance, max_facts and the document
    mix), checked before the file is created. With `include_facts`, each line also carries
    ``"facts"`` (a list of `Fact` dicts) for retrieval evaluation; preprocessing reads only
    the text key.
    """
    if num_docs < 1:
        raise ConfigError(f"num_docs={num_docs}; use num_docs >= 1.")
    docs = iter_documents(num_docs, seed, **options)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for doc in docs:
            record: dict = {"text": doc.text}
            if include_facts:
                record["facts"] = [asdict(fact) for fact in doc.facts]
            f.write(json.dumps(record) + "\n")
    return path
