"""Consistency of a Megatron indexed dataset's .idx tables (checked before training reads them).

The .idx holds, per sequence, its length in tokens (int32) and its byte offset in the .bin
(int64 "pointer"), and the document index: the sequence number at which each document starts
(int64, from 0 to the sequence count). Megatron trusts these tables: a shifted pointer makes
training read the wrong tokens without any error, a wild one fails at the first batch.
"""

from __future__ import annotations

import numpy as np

_CHUNK = 1 << 22  # entries per vectorised step (bounded memory on large datasets)


def _first_bad(mask: np.ndarray) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else None


def table_problem(
    lengths: np.ndarray, pointers: np.ndarray, documents: np.ndarray, itemsize: int
) -> str | None:
    """What is wrong with the tables, naming the first bad entry; None when consistent.

    Sequence i must start where sequence i-1 ends (pointer[0] = 0, pointer[i] =
    pointer[i-1] + length[i-1] * itemsize: monotone, no gaps, no overlaps, so every sequence
    lies inside the .bin once its size matches the total); lengths are >= 0; the document
    index runs from 0 to the sequence count without going back.
    """
    n = len(lengths)
    if len(pointers) != n:
        return f"{n} sequence lengths but {len(pointers)} pointers"
    if n:
        if int(pointers[0]) != 0:
            return f"sequence pointer 0 is {int(pointers[0])}, expected 0"
        for start in range(0, n, _CHUNK):
            stop = min(n, start + _CHUNK)
            lens = np.asarray(lengths[start:stop], dtype=np.int64)
            bad = _first_bad(lens < 0)
            if bad is not None:
                return f"sequence {start + bad} has negative length {int(lens[bad])}"
            # pointer[i] for i in (start, stop]: the previous pointer plus its length in bytes
            if start + 1 < n:
                ptr = np.asarray(pointers[start : min(n, stop + 1)], dtype=np.int64)
                expected = ptr[:-1] + lens[: len(ptr) - 1] * itemsize
                bad = _first_bad(ptr[1:] != expected)
                if bad is not None:
                    i = start + bad + 1
                    return (
                        f"sequence pointer {i} is {int(ptr[bad + 1])} but sequence {i - 1} "
                        f"ends at byte {int(expected[bad])} (pointers must follow the lengths: "
                        "shifted or overwritten pointer table)"
                    )
    if len(documents) < 1 or int(documents[0]) != 0 or int(documents[-1]) != n:
        first = int(documents[0]) if len(documents) else None
        last = int(documents[-1]) if len(documents) else None
        return f"document index runs from {first} to {last}, expected 0 to {n} (sequences)"
    for start in range(0, len(documents) - 1, _CHUNK):
        docs = np.asarray(documents[start : start + _CHUNK + 1], dtype=np.int64)
        bad = _first_bad(np.diff(docs) < 0)
        if bad is not None:
            return (
                f"document index entry {start + bad + 1} ({int(docs[bad + 1])}) is below the one "
                f"before it ({int(docs[bad])})"
            )
    return None
