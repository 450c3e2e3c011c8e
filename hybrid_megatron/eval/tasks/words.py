"""Shipped English word lists and the random needle keys/values built from them.

`hybrid_megatron/eval/data/{nouns,adjectives,verbs}.txt` (one lowercase word a line) replace
the `wonderwords` lists RULER uses: keys are adjective-noun pairs ("brave-lantern"), numbers
have 7 digits, uuids are version 4.
"""

from __future__ import annotations

import functools
import random
import string
import uuid
from importlib import resources

WORD_LISTS = ("nouns", "adjectives", "verbs")
VALUE_TYPES = ("numbers", "words", "uuids")


@functools.cache
def load_words(kind: str) -> tuple[str, ...]:
    """The shipped word list `kind` (one of `WORD_LISTS`), sorted and de-duplicated."""
    if kind not in WORD_LISTS:
        raise ValueError(f"unknown word list '{kind}'; choose one of {', '.join(WORD_LISTS)}")
    text = resources.files("hybrid_megatron.eval").joinpath("data", f"{kind}.txt").read_text()
    return tuple(sorted({w.strip() for w in text.split() if w.strip()}))


@functools.cache
def common_word_pool() -> tuple[str, ...]:
    """All shipped words (nouns, adjectives, verbs), sorted and de-duplicated."""
    return tuple(sorted({w for kind in WORD_LISTS for w in load_words(kind)}))


def random_key_word(rng: random.Random) -> str:
    """An adjective-noun pair, as RULER's word keys."""
    return f"{rng.choice(load_words('adjectives'))}-{rng.choice(load_words('nouns'))}"


def random_number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def random_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def random_value(rng: random.Random, kind: str) -> str:
    """A random needle key or value of type `kind` (one of `VALUE_TYPES`)."""
    if kind == "numbers":
        return random_number(rng)
    if kind == "words":
        return random_key_word(rng)
    if kind == "uuids":
        return random_uuid(rng)
    raise ValueError(f"unknown needle type '{kind}'; choose one of {', '.join(VALUE_TYPES)}")


def random_letters(rng: random.Random, k: int, alphabet: str = string.ascii_uppercase) -> str:
    return "".join(rng.choices(alphabet, k=k))


def unique_words(rng: random.Random, count: int, exclude: set[str] | None = None) -> list[str]:
    """`count` distinct words in random order: shipped words first, then adjective-noun pairs.

    The shipped pool has a few thousand words; longer cwe haystacks (tens of thousands of
    tokens with a subword tokenizer) continue with distinct adjective-noun compounds.
    """
    exclude = exclude or set()
    pool = [w for w in common_word_pool() if w not in exclude]
    out = rng.sample(pool, min(count, len(pool)))
    seen = set(out) | exclude
    while len(out) < count:
        word = random_key_word(rng)
        if word not in seen:
            seen.add(word)
            out.append(word)
    return out
