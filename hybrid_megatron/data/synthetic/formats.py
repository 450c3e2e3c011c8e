"""Eval-format and copying documents: niah, passkey prompts, copy blocks, repeats."""

from __future__ import annotations

import random
import string

from hybrid_megatron.data.synthetic.recall import Fact, SyntheticDocument
from hybrid_megatron.eval.tasks import niah as _niah
from hybrid_megatron.eval.tasks import passkey as _passkey
from hybrid_megatron.eval.tasks.haystack import NOISE, insert_items
from hybrid_megatron.eval.tasks.words import random_key_word, random_number

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
