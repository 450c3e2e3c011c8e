"""RULER's English word lists and the random needle keys/values built from them.

The lists are the `wonderwords` package's (nouns, adjectives, verbs), read from its files as
RULER reads them (each line right-stripped, kept as written: "ATM", "ad hoc", "x-ray").
RULER was released with wonderwords 2.2 (3.x changed the noun list), hence the pin in
pyproject.toml. Keys are adjective-noun pairs ("brave-lantern"), drawn uniformly from the
distinct pairs as RULER does; numbers have 7 digits; uuids are version 4.
"""

from __future__ import annotations

import functools
import random
import string
import uuid
from importlib import resources

WORD_LISTS = ("nouns", "adjectives", "verbs")
VALUE_TYPES = ("numbers", "words", "uuids")
_WONDERWORDS_FILES = {"nouns": "nounlist.txt", "adjectives": "adjectivelist.txt",
                      "verbs": "verblist.txt"}  # fmt: skip


@functools.cache
def load_words(kind: str) -> tuple[str, ...]:
    """The wonderwords list `kind` (one of `WORD_LISTS`), sorted and de-duplicated."""
    if kind not in WORD_LISTS:
        raise ValueError(f"unknown word list '{kind}'; choose one of {', '.join(WORD_LISTS)}")
    file = resources.files("wonderwords.assets").joinpath(_WONDERWORDS_FILES[kind])
    return tuple(sorted({w.rstrip() for w in file.read_text(encoding="utf-8").splitlines()} - {""}))


@functools.cache
def common_word_pool() -> tuple[str, ...]:
    """All words (nouns, adjectives, verbs), sorted and de-duplicated, as RULER's cwe pool."""
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
    """`count` distinct words in random order: the word pool first, then adjective-noun pairs.

    The pool has ~8,700 words; RULER continues longer cwe haystacks with a word list from its
    repository (a download), so ours continue with distinct adjective-noun compounds.
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
