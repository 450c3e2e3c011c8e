"""Deterministic synthetic corpus that teaches long-range retrieval to a tiny byte-level LM.

Each document mixes plain filler sentences with facts that are stated early and asked about
later, so predicting the answer requires looking back:

* key-value:  ``key 4821 = 73019.``  ...  ``The value of key 4821 is 73019.``
* pass key:   ``The pass key is 58213. Remember it.``  ...
  ``What is the pass key? The pass key is 58213.``

Every stated fact is asked exactly once, and only stated facts are asked. A document holds
1..`max_facts` facts (at most one pass key; key-value facts have distinct keys), so several
statements can stand between a query and its answer. Filler uses a small built-in word list
with no digits, so the only numbers in a document are keys and values.

Distance is counted in characters from the end of a statement (after its period) to the start
of its query. The text is ASCII, so with the byte tokenizer characters == tokens. Each fact's
distance is drawn uniformly from [min_distance, max_distance]; when events collide the later
one is pushed back, and a document whose pushed distance would exceed max_distance is redrawn,
so every recorded distance lies in [min_distance, max_distance]. Documents are about
100 + max_distance characters long, so with max_distance well under the training sequence
length the fact and its query usually land in one sequence.

Four more document kinds; the first two are the evaluation prompts themselves, followed by
their answer, so a tiny model can learn the exact formats it is evaluated on (templates and
the passkey renderer come from `hybrid_megatron.eval.tasks`, so they cannot drift):

* niah:    RULER niah_single_1 (noise haystack, one needle "One of the special magic numbers
  for {word-key} is: {7 digits}.", question, answer prefix) + " {value}."; the haystack
  holds 0..max_haystack // 92 noise lines, the needle goes at a random depth.
* passkey_prompt:  the passkey prompt (description, min_distance..max_haystack filler
  characters with "The pass key is {key}. Remember it. {key} is the pass key." at a random
  depth, question) + " The pass key is {key}."
* copy:    blocks "Copy: {5-digit numbers}. Again: {the same numbers}." whose repeat starts
  min_distance..max_distance characters after the original (in-context copying practice).
* repeat:  "Repeat: {s} | {s} | {s} ..." where s is a string of random lowercase words whose
  copies are min_distance..max_distance characters apart, over 6 x max_distance characters.
  Almost every token after the first copy is predictable only by looking back one copy, and
  letters (unlike digits) rarely repeat by chance, so this dense, unambiguous signal is what
  lets an induction (look back and copy) circuit form in a small model; eval-format
  documents alone are too sparse. In half of the repeat documents, half of the words are
  7-digit numbers instead: copying digit runs (what niah answers need) is then practised
  between unambiguous word anchors.

`niah_fraction`, `passkey_fraction`, `copy_fraction` and `repeat_fraction` of the documents
are of these kinds; the rest are the recall documents above. `max_haystack` (default
`max_distance`) sizes the niah and passkey haystacks apart from the look-back distances, so
eval-format prompts can span the evaluated lengths while repeats stay short enough to learn.

With `doc_length` set, every document is exactly `doc_length` characters: niah/passkey
haystacks grow to fill it, copy documents hold as many blocks as fit, and the remainder is
padded with noise text (a document whose smallest form is longer stays longer). With the
byte tokenizer and doc_length = seq_length - 1, each training sequence is then exactly one
document that starts at position 0, as the evaluation prompts do, and no fact is cut off by
a sequence boundary.

Document i depends only on (seed, i) and the options: a larger corpus with the same seed
starts with the same documents, and with all fractions 0 and no `doc_length` the documents
are the recall documents of earlier versions. The kind of document i is drawn from its own
random stream, so the recall documents of a mixed corpus equal those of an unmixed one.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import string
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from hybrid_megatron.errors import ConfigError
from hybrid_megatron.eval.tasks import niah as _niah
from hybrid_megatron.eval.tasks import passkey as _passkey
from hybrid_megatron.eval.tasks.haystack import NOISE, insert_items
from hybrid_megatron.eval.tasks.words import load_words, random_key_word, random_number

_ADJECTIVES = (
    "old",
    "red",
    "small",
    "quiet",
    "happy",
    "green",
    "tall",
    "cold",
    "bright",
    "gentle",
    "busy",
    "soft",
    "brave",
    "lazy",
    "young",
    "wild",
    "calm",
    "dark",
    "warm",
    "tiny",
    "friendly",
    "beautiful",
)
_NOUNS = (
    "dog",
    "cat",
    "bird",
    "farmer",
    "teacher",
    "child",
    "horse",
    "baker",
    "sailor",
    "fox",
    "river",
    "tree",
    "boat",
    "garden",
    "window",
    "lamp",
    "road",
    "cloud",
    "apple",
    "village",
    "mountain",
    "carpenter",
)
_VERBS = (
    "sleeps",
    "walks",
    "sings",
    "waits",
    "runs",
    "rests",
    "plays",
    "stands",
    "reads",
    "sits",
    "dances",
    "works",
    "smiles",
    "listens",
    "wanders",
)
_PLACES = (
    "near the river",
    "in the garden",
    "by the road",
    "under the tree",
    "at the market",
    "on the hill",
    "in the kitchen",
    "behind the house",
    "across the field",
    "at home",
)
_TIMES = (
    "today",
    "at noon",
    "in the morning",
    "every day",
    "after dinner",
    "in the evening",
    "on sunday",
    "before lunch",
)
_NAMES = ("Anna", "Ben", "Clara", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack")
# Short words so that any exact sentence length can be built (see _exact_sentence).
_SHORT = ("we", "it", "to", "go", "on", "up", "is", "the", "sun", "sky", "and", "sea")

_TEMPLATES = (
    lambda r: (
        f"The {r.choice(_ADJECTIVES)} {r.choice(_NOUNS)} {r.choice(_VERBS)} {r.choice(_PLACES)}."
    ),
    lambda r: f"A {r.choice(_NOUNS)} is {r.choice(_ADJECTIVES)} {r.choice(_TIMES)}.",
    lambda r: f"{r.choice(_NAMES)} sees the {r.choice(_ADJECTIVES)} {r.choice(_NOUNS)}.",
    lambda r: f"{r.choice(_NAMES)} {r.choice(_VERBS)} {r.choice(_PLACES)} {r.choice(_TIMES)}.",
    lambda r: f"The {r.choice(_NOUNS)} and the {r.choice(_NOUNS)} are {r.choice(_ADJECTIVES)}.",
)

_MIN_WORD, _MAX_WORD = 2, 9
_BY_LENGTH: dict[int, tuple[str, ...]] = {}
for _w in sorted({*_ADJECTIVES, *_NOUNS, *_VERBS, *_SHORT, *(n.lower() for n in _NAMES)}):
    if _MIN_WORD <= len(_w) <= _MAX_WORD:
        _BY_LENGTH.setdefault(len(_w), ())
        _BY_LENGTH[len(_w)] += (_w,)
if any(n not in _BY_LENGTH for n in range(_MIN_WORD, _MAX_WORD + 1)):
    raise RuntimeError("the filler word list must hold a word of every length 2..9")

MIN_DISTANCE_FLOOR = 5  # smallest gap that holds a filler sentence: " " + "It." + " " minus 1
_MAX_ATTEMPTS = 8


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


# ----------------------------------------------------------------------------- eval formats

KINDS = ("recall", "niah", "passkey_prompt", "copy", "repeat")
_NIAH_TYPE = "numbers"  # niah_single_1: word keys, 7-digit number values
_NOISE_LINE = len(NOISE) + 1  # a noise line and the newline joining it
_PASSKEY_KEYS = (1, 99999)  # the evaluation draws 1..50000; train on a superset


def _pad(text: str, length: int | None) -> str:
    """`text` padded with a newline and noise text to exactly `length` characters."""
    k = 0 if length is None else length - len(text)
    return text if k <= 0 else (text + "\n" + " ".join([NOISE] * (k // len(NOISE) + 1)))[:length]


def _niah_text(key: str, value: str, lines: int, needle_line: int) -> SyntheticDocument:
    needle = _niah.NEEDLE.format(type_needle_v=_NIAH_TYPE, key=key, value=value)
    context = "\n".join(insert_items([NOISE] * lines, [(needle_line, needle)]))
    fmt = {"type_needle_v": _NIAH_TYPE[:-1], "query": key}
    head = _niah.TEMPLATE_ONE.format(context=context, **fmt)
    prompt = head + _niah.ANSWER_PREFIX_ONE.format(**fmt)
    text = f"{prompt} {value}."
    start = head.index(needle)
    query = head.index(context) + len(context) + 1  # the question follows "{context}\n"
    end = start + len(needle)
    fact = Fact("niah", key, value, start, end, query, len(prompt) + 1, query - end)
    return SyntheticDocument(text, (fact,))


def generate_niah_document(
    rng: random.Random, max_lines: int = 2, length: int | None = None
) -> SyntheticDocument:
    """A RULER niah_single_1 prompt (noise haystack) followed by " {value}.".

    The haystack has 0..`max_lines` noise lines, or with `length` as many as fit in `length`
    characters (the text is then padded to exactly `length`); the needle goes before a
    uniformly drawn line (or last).
    """
    key = random_key_word(rng)
    value = random_number(rng)
    if length is None:
        lines = rng.randint(0, max_lines)
    else:
        lines = max((length - len(_niah_text(key, value, 0, 0).text)) // _NOISE_LINE, 0)
    doc = _niah_text(key, value, lines, rng.randint(0, lines))
    return SyntheticDocument(_pad(doc.text, length), doc.facts)


def _passkey_text(key: int, depth: float, size: int) -> SyntheticDocument:
    """The evaluation's own passkey prompt (`PasskeyTask.render`) + " {key}."."""
    rendered = _passkey.PasskeyTask().render(_passkey.PasskeyState(key, depth), size)
    prompt = rendered.input + rendered.answer_prefix
    info = _passkey.INFO.format(key=key)
    start = prompt.index(info)
    end = start + len(info)
    query = len(rendered.input) - len(_passkey.QUESTION)
    value = str(key)
    fact = Fact("passkey_prompt", None, value, start, end, query, len(prompt) + 1, query - end)
    return SyntheticDocument(f"{prompt} {value}.", (fact,))


def generate_passkey_document(
    rng: random.Random,
    min_filler: int = 16,
    max_filler: int = 256,
    length: int | None = None,
) -> SyntheticDocument:
    """A passkey prompt followed by " {key}.".

    The filler has `min_filler`..`max_filler` characters, or with `length` as many as make the
    text exactly `length` characters; the pass key line goes to a uniform random depth.
    """
    key = rng.randint(*_PASSKEY_KEYS)
    depth = 100.0 * rng.random()
    if length is None:
        size = rng.randint(min_filler, max_filler)
    else:
        size = max(length - len(_passkey_text(key, depth, 0).text), 0)
    doc = _passkey_text(key, depth, size)
    return SyntheticDocument(_pad(doc.text, length), doc.facts)


def _copy_counts(min_distance: int, max_distance: int) -> tuple[int, int]:
    """Bounds on k, the numbers in a copy block, for copies min..max_distance apart.

    In "Copy: n1 ... nk. Again: n1 ... nk. " each character's copy sits len("n1 ... nk") +
    len(". Again: ") = 6k + 8 characters after it; the block takes 12k + 13 characters.
    """
    lo = max(1, -(-(min_distance - 8) // 6))
    return lo, max(lo, (max_distance - 8) // 6)


def _copy_block_chars(k: int) -> int:
    return 12 * k + 13


def _copy_block(rng: random.Random, min_distance: int, max_distance: int) -> tuple[str, str]:
    """Random 5-digit numbers whose copy starts min..max_distance characters after them."""
    nums = " ".join(
        random_number(rng, 5) for _ in range(rng.randint(*_copy_counts(min_distance, max_distance)))
    )
    return f"Copy: {nums}. Again: ", nums


def generate_copy_document(
    rng: random.Random, min_distance: int = 16, max_distance: int = 256, length: int | None = None
) -> SyntheticDocument:
    """Blocks "Copy: {numbers}. Again: {numbers}." (in-context copying practice).

    Each block repeats its random numbers after min..max_distance characters, so predicting
    the repeat needs attention that reaches that far (beyond a sliding window shorter than
    min_distance). One block, or with `length` as many blocks as fit (then padded).
    """
    if length is not None:  # at most the numbers of one block that fits `length`
        max_distance = max(min_distance, min(max_distance, 6 * ((length - 13) // 12) + 8))
    text, facts = "", []
    while True:
        head, nums = _copy_block(rng, min_distance, max_distance)
        block = f"{head}{nums}. "
        if facts and (length is None or len(text) + len(block) > length):
            break
        start = len(text) + len("Copy: ")
        query = len(text) + len(head) - len("Again: ")
        end = start + len(nums) + 1
        answer = len(text) + len(head)
        facts.append(Fact("copy", None, nums, start, end, query, answer, answer - start))
        text += block
    return SyntheticDocument(_pad(text.rstrip(), length), tuple(facts))


def _random_items(rng: random.Random, length: int, numbers: bool = False) -> str:
    """Random lowercase words (3..7 letters), with `numbers` half of them 7-digit numbers
    instead, joined by spaces; exactly `length` characters."""
    text = ""
    while len(text) < length:
        if numbers and rng.random() < 0.5:
            item = random_number(rng)
        else:
            item = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 7)))
        text += (" " if text else "") + item
    return text[:length].rstrip() or "a"


_REPEAT_HEAD, _REPEAT_SEP = "Repeat: ", " | "
_REPEAT_SPAN = 6  # a repeat document spans at least this many times max_distance characters


def generate_repeat_document(
    rng: random.Random, min_distance: int = 16, max_distance: int = 256, length: int | None = None
) -> SyntheticDocument:
    """ "Repeat: {s} | {s} | ..." with consecutive copies min..max_distance characters apart.

    s is random words, in half of the documents mixed with 7-digit numbers. Copies continue
    until the text spans `_REPEAT_SPAN` x max_distance characters (at least three copies), so
    most of a repeat document's tokens are predictable by looking back; with `length`, as many
    as fit (at least two; then padded). One fact: the second copy, `distance` characters after
    the first.
    """
    hi = max_distance if length is None else (length - len(_REPEAT_HEAD)) // 2
    distance = rng.randint(min_distance, max(min_distance, min(max_distance, hi)))
    numbers = rng.random() < 0.5
    words = _random_items(rng, max(1, distance - len(_REPEAT_SEP)), numbers)
    step = len(words) + len(_REPEAT_SEP)
    if length is None:
        copies = max(3, -(-(_REPEAT_SPAN * max_distance - len(_REPEAT_HEAD) + 3) // step))
    else:
        copies = max(2, (length - len(_REPEAT_HEAD) + 3) // step)
    text = _REPEAT_HEAD + _REPEAT_SEP.join([words] * copies)
    start = len(_REPEAT_HEAD)
    fact = Fact("repeat", None, words, start, start + len(words), start + len(words),
                start + step, step)  # fmt: skip
    return SyntheticDocument(_pad(text, length), (fact,))


# Config / keyword name of each mixed-in kind's fraction, in `KINDS` order.
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
    """Documents 0..num_docs-1; document i depends only on (seed, i) and the options."""
    _check_args(min_distance, max_distance, max_facts)
    fractions = (niah_fraction, passkey_fraction, copy_fraction, repeat_fraction)
    check_mix(fractions, doc_length)
    haystack = check_haystack(max_haystack, min_distance, max_distance)
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
    path: str | Path,
    num_docs: int,
    seed: int = 0,
    min_distance: int = 16,
    max_distance: int = 256,
    *,
    max_facts: int = 3,
    niah_fraction: float = 0.0,
    passkey_fraction: float = 0.0,
    copy_fraction: float = 0.0,
    repeat_fraction: float = 0.0,
    doc_length: int | None = None,
    max_haystack: int | None = None,
    include_facts: bool = False,
) -> Path:
    """Write `num_docs` documents as JSONL lines ``{"text": ...}`` to `path` and return it.

    With `include_facts`, each line also carries ``"facts"`` (a list of `Fact` dicts) for
    retrieval evaluation; preprocessing reads only the text key.
    """
    _check_args(min_distance, max_distance, max_facts)
    check_mix((niah_fraction, passkey_fraction, copy_fraction, repeat_fraction), doc_length)
    check_haystack(max_haystack, min_distance, max_distance)
    if num_docs < 1:
        raise ConfigError(f"num_docs={num_docs}; use num_docs >= 1.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    docs = iter_documents(
        num_docs,
        seed,
        min_distance,
        max_distance,
        max_facts,
        niah_fraction=niah_fraction,
        passkey_fraction=passkey_fraction,
        copy_fraction=copy_fraction,
        repeat_fraction=repeat_fraction,
        doc_length=doc_length,
        max_haystack=max_haystack,
    )
    with path.open("w", encoding="utf-8") as f:
        for doc in docs:
            record: dict = {"text": doc.text}
            if include_facts:
                record["facts"] = [asdict(fact) for fact in doc.facts]
            f.write(json.dumps(record) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m hybrid_megatron.data.synthetic", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--output", required=True, help="JSONL file to write")
    parser.add_argument("--num-docs", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-distance", type=int, default=16)
    parser.add_argument("--max-distance", type=int, default=256)
    parser.add_argument("--max-facts", type=int, default=3)
    parser.add_argument("--niah-fraction", type=float, default=0.0)
    parser.add_argument("--passkey-fraction", type=float, default=0.0)
    parser.add_argument("--copy-fraction", type=float, default=0.0)
    parser.add_argument("--repeat-fraction", type=float, default=0.0)
    parser.add_argument("--doc-length", type=int, default=None)
    parser.add_argument(
        "--max-haystack", type=int, default=None, help="niah/passkey haystack characters"
    )
    parser.add_argument("--include-facts", action="store_true")
    args = parser.parse_args(argv)
    try:
        out = generate_corpus(
            args.output,
            args.num_docs,
            args.seed,
            args.min_distance,
            args.max_distance,
            max_facts=args.max_facts,
            niah_fraction=args.niah_fraction,
            passkey_fraction=args.passkey_fraction,
            copy_fraction=args.copy_fraction,
            repeat_fraction=args.repeat_fraction,
            doc_length=args.doc_length,
            max_haystack=args.max_haystack,
            include_facts=args.include_facts,
        )
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")
    print(f"wrote {args.num_docs} documents to {out}")


if __name__ == "__main__":
    main()
