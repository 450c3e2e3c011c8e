"""Filler word lists and sentence pieces of the generated documents."""

from __future__ import annotations

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
