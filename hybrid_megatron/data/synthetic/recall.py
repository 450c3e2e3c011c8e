"""Recall documents: facts stated early and asked about later (see the package doc)."""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass

from hybrid_megatron.data.synthetic.words import (
    _BY_LENGTH,
    _MAX_ATTEMPTS,
    _MAX_WORD,
    _MIN_WORD,
    _TEMPLATES,
    MIN_DISTANCE_FLOOR,
)
from hybrid_megatron.errors import ConfigError


@dataclass(frozen=True)
class Fact:
    """One stated-then-asked fact; offsets are character offsets into the document text."""

    kind: str  # "kv", "passkey" (recall documents), "niah", "passkey_prompt", "copy", "repeat"
    key: str | None  # the 4-digit key for "kv", the word key for "niah", else None
    value: str  # the answer: 5 digits (recall), 7 (niah), 1-5 (passkey_prompt), copied text
    statement_start: int  # the statement, needle or pass key line
    statement_end: int  # one past the statement's final period
    query_start: int  # start of the question
    answer_start: int  # offset of `value` inside the query
    distance: int  # query_start - statement_end; copy/repeat: answer_start - statement_start


@dataclass(frozen=True)
class SyntheticDocument:
    text: str
    facts: tuple[Fact, ...]


def _exact_sentence(rng: random.Random, length: int) -> str:
    """A capitalized sentence of exactly `length` (>= 3) characters ending in a period."""
    rem = length - 1  # characters of words joined by spaces
    words: list[str] = []
    while rem > _MAX_WORD:
        k = rng.randint(_MIN_WORD, min(_MAX_WORD, rem - 1 - _MIN_WORD))
        words.append(rng.choice(_BY_LENGTH[k]))
        rem -= k + 1
    words.append(rng.choice(_BY_LENGTH[rem]))
    words[0] = words[0].capitalize()
    return " ".join(words) + "."


def _filler(rng: random.Random, length: int) -> str:
    """Plain sentences joined by spaces, exactly `length` (>= 3) characters long."""
    out: list[str] = []
    rem = length
    while True:
        s = rng.choice(_TEMPLATES)(rng)
        if len(s) == rem:
            out.append(s)
            break
        if len(s) + 1 + 3 <= rem:
            out.append(s)
            rem -= len(s) + 1
        else:
            out.append(_exact_sentence(rng, rem))
            break
    return " ".join(out)


def _gap(rng: random.Random, g: int) -> str:
    """Separator text between two events, `g` characters long (g == 1 or g >= 5)."""
    return " " if g == 1 else " " + _filler(rng, g - 2) + " "


def _layout(
    rng: random.Random, n_kv: int, passkey: bool, min_distance: int, max_distance: int
) -> SyntheticDocument | None:
    """Place statements and queries; None if a pushed-back query would exceed max_distance."""
    keys = rng.sample(range(1000, 10000), n_kv)
    specs = [("kv", str(k), str(rng.randint(10000, 99999))) for k in keys]
    if passkey:
        specs.append(("passkey", None, str(rng.randint(10000, 99999))))
    rng.shuffle(specs)

    def statement(i: int) -> str:
        kind, key, value = specs[i]
        return f"key {key} = {value}." if kind == "kv" else f"The pass key is {value}. Remember it."

    def query(i: int) -> tuple[str, int]:
        kind, key, value = specs[i]
        if kind == "kv":
            prefix = f"The value of key {key} is "
        else:
            prefix = "What is the pass key? The pass key is "
        return f"{prefix}{value}.", len(prefix)

    lead = 0 if rng.random() < 0.3 else rng.randint(4, 80)
    heap: list[tuple[int, int, str, int]] = []  # (desired start, tie-break, event, fact)
    pos = lead
    for i in range(len(specs)):
        heapq.heappush(heap, (pos, len(heap), "stmt", i))
        gap = 1 if rng.random() < 0.3 else rng.randint(MIN_DISTANCE_FLOOR, 60)
        pos += len(statement(i)) + gap

    parts: list[str] = []
    cursor = 0
    stmt_span: dict[int, tuple[int, int]] = {}
    facts: list[Fact] = []
    tie = len(heap)
    while heap:
        desired, _, event, i = heapq.heappop(heap)
        if cursor == 0:
            if desired > 0:
                parts.append(_filler(rng, desired - 1) + " ")
                cursor = desired
        else:
            g = max(desired - cursor, 1)
            if 1 < g < MIN_DISTANCE_FLOOR:
                g = MIN_DISTANCE_FLOOR
            parts.append(_gap(rng, g))
            cursor += g
        if event == "stmt":
            text = statement(i)
            stmt_span[i] = (cursor, cursor + len(text))
            distance = rng.randint(min_distance, max_distance)
            heapq.heappush(heap, (cursor + len(text) + distance, tie, "query", i))
            tie += 1
        else:
            text, answer_offset = query(i)
            start, end = stmt_span[i]
            if cursor - end > max_distance:
                return None
            kind, key, value = specs[i]
            facts.append(
                Fact(kind, key, value, start, end, cursor, cursor + answer_offset, cursor - end)
            )
        parts.append(text)
        cursor += len(text)
    if rng.random() < 0.5:
        parts.append(" " + _filler(rng, rng.randint(3, 60)))
    facts.sort(key=lambda f: f.statement_start)
    return SyntheticDocument("".join(parts), tuple(facts))


def _check_args(min_distance: int, max_distance: int, max_facts: int) -> None:
    if min_distance < MIN_DISTANCE_FLOOR:
        raise ConfigError(
            f"min_distance={min_distance} is too small: filler comes in whole sentences, so "
            f"use min_distance >= {MIN_DISTANCE_FLOOR}."
        )
    if max_distance < min_distance:
        raise ConfigError(
            f"max_distance={max_distance} is below min_distance={min_distance}; "
            "use max_distance >= min_distance."
        )
    if max_facts < 1:
        raise ConfigError(f"max_facts={max_facts}; use max_facts >= 1.")


def generate_document(
    rng: random.Random, min_distance: int = 16, max_distance: int = 256, max_facts: int = 3
) -> SyntheticDocument:
    """One document drawn from `rng` (see the module docstring for the format)."""
    _check_args(min_distance, max_distance, max_facts)
    for attempt in range(_MAX_ATTEMPTS + 1):
        total = 1 if attempt == _MAX_ATTEMPTS else rng.randint(1, max_facts)
        passkey = rng.random() < 0.4
        doc = _layout(rng, total - passkey, passkey, min_distance, max_distance)
        if doc is not None:
            return doc
    raise AssertionError("a single-fact document always fits")  # pragma: no cover
