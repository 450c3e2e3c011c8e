"""RULER's variable tracking (vt): follow a chain of `VAR X = VAR Y` assignments.

One chain of `num_hops` hops starts at a 5-digit value; its statements are spread in order
over the haystack; the answer is every variable of the chain. As in RULER, each prompt starts
with one solved example (3-letter variables, about 500 tokens, fitted once per tokenizer) whose
names and value are re-drawn per sample.
"""

from __future__ import annotations

import heapq
import os
import random
from collections.abc import Callable
from dataclasses import dataclass

from hybrid_megatron.eval.tasks.base import Rendered, Task
from hybrid_megatron.eval.tasks.errors import TargetLengthError
from hybrid_megatron.eval.tasks.fitting import DoesNotFit, fit_size
from hybrid_megatron.eval.tasks.haystack import (
    DEPTHS,
    NOISE,
    Essay,
    depth_index,
    essay_context,
    insert_items,
    load_essay,
    resolve_essay_path,
)
from hybrid_megatron.eval.tasks.words import random_letters

TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above."
)
ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
    "variables are assigned the value {query}, they are: "
)
MAX_NEW_TOKENS = 30
ICL_TOKENS = 500  # RULER fits its in-context example to 500 tokens


@dataclass
class Chains:
    variables: list[list[str]]
    statements: list[list[str]]  # per chain: "VAR A = 12345", "VAR B = VAR A ", ...
    value: str


@dataclass
class VtState:
    seed: int
    chains: Chains
    depths: list[list[float]]  # per chain, per statement, sorted
    icl: str  # the solved example, already re-drawn for this sample


class VariableTrackingTask(Task):
    metric = "string_match_all"

    def __init__(
        self,
        name: str = "vt",
        *,
        num_chains: int = 1,
        num_hops: int = 4,
        haystack: str = "noise",
        add_fewshot: bool = True,
        essay_path: str | os.PathLike | None = None,
        data_dir: str | os.PathLike | None = None,
        max_new_tokens: int = MAX_NEW_TOKENS,
    ) -> None:
        if haystack not in ("noise", "essay"):
            raise ValueError(f"vt haystack must be 'noise' or 'essay', got '{haystack}'")
        if num_chains < 1 or num_hops < 1:
            raise ValueError("num_chains and num_hops must be >= 1")
        self.name = name
        self.num_chains, self.num_hops = num_chains, num_hops
        self.haystack = haystack
        self.add_fewshot = add_fewshot
        self.max_new_tokens = max_new_tokens
        self.unit = "noise lines" if haystack == "noise" else "words"
        self.essay: Essay | None = None
        if haystack == "essay":
            self.essay = load_essay(resolve_essay_path(name, essay_path, data_dir))
        self._icl: tuple[VtState, int] | None = None  # (example state, haystack size)

    # ------------------------------------------------------------------ chains and context
    def _chains(self, rng: random.Random, icl: bool) -> Chains:
        k, hops = (3, min(10, self.num_hops)) if icl else (5, self.num_hops)
        names: list[str] = []
        while len(names) < self.num_chains * (hops + 1):
            name = random_letters(rng, k)
            if name not in names and name != "VAR":
                names.append(name)
        value = "12345" if icl else str(rng.randint(10000, 99998))
        variables, statements = [], []
        for c in range(self.num_chains):
            vs = names[c * (hops + 1) : (c + 1) * (hops + 1)]
            variables.append(vs)
            statements.append(
                [f"VAR {vs[0]} = {value}"]
                + [f"VAR {vs[j + 1]} = VAR {vs[j]} " for j in range(hops)]
            )
        return Chains(variables, statements, value)

    def _depths(self, rng: random.Random, chains: Chains) -> list[list[float]]:
        if self.haystack == "essay":  # RULER: distinct depths from DEPTHS, chains interleaved
            total = sum(len(s) for s in chains.statements)
            flat = sorted(float(d) for d in rng.sample(DEPTHS, total))
            order = _interleave(rng, [len(s) for s in chains.statements])
            out: list[list[float]] = [[] for _ in chains.statements]
            for depth, c in zip(flat, order):
                out[c].append(depth)
            return out
        return [sorted(100.0 * rng.random() for _ in s) for s in chains.statements]

    def _context(self, chains: Chains, depths: list[list[float]], size: int) -> str:
        if self.haystack == "essay":
            assert self.essay is not None
            inserts = [
                (d, s.strip() + ".")
                for ss, ds in zip(chains.statements, depths)
                for s, d in zip(ss, ds)
            ]
            return essay_context(self.essay, size, inserts).replace(". \n", ".\n")
        items = sorted(
            ((d, s) for ss, ds in zip(chains.statements, depths) for s, d in zip(ss, ds)),
            key=lambda item: item[0],
        )
        slots = _distinct_slots([depth_index(d, size) for d, _ in items], size)
        return "\n".join(insert_items([NOISE] * size, list(zip(slots, (s for _, s in items)))))

    def _text(self, chains: Chains, depths: list[list[float]], size: int) -> tuple[str, str]:
        fmt = {"query": chains.value, "num_v": len(chains.variables[0])}
        body = TEMPLATE.format(context=self._context(chains, depths, size), **fmt)
        return body, ANSWER_PREFIX.format(**fmt)

    # ------------------------------------------------------------------ Task interface
    def setup(self, count_tokens: Callable[[str], int], target_length: int, seed: int) -> None:
        """Fit the solved example to `ICL_TOKENS` tokens of this tokenizer (once)."""
        self._icl = None
        if not self.add_fewshot:
            return
        rng = random.Random(f"{seed}/{self.name}/icl")
        chains = self._chains(rng, icl=True)
        depths = self._depths(rng, chains)
        state = VtState(0, chains, depths, "")
        try:
            fit = fit_size(
                lambda n: count_tokens("".join(self._text(chains, depths, n))),
                ICL_TOKENS,
                min_size=0,
            )
            size = fit.size
        except DoesNotFit:
            size = 0
        self._icl = (state, size)

    def _icl_text(self, rng: random.Random) -> str:
        if self._icl is None:
            return ""
        example, size = self._icl
        old = example.chains
        names: dict[str, str] = {}
        for vs in old.variables:
            for v in vs:
                while (new := random_letters(rng, len(v))) in names.values() or new == "VAR":
                    pass
                names[v] = new
        value = str(rng.randint(10000, 99998))
        chains = Chains(
            [[names[v] for v in vs] for vs in old.variables],
            [[_rename(s, names).replace(old.value, value) for s in ss] for ss in old.statements],
            value,
        )
        body, prefix = self._text(chains, example.depths, size)
        return body + prefix + " " + " ".join(chains.variables[0]) + "\n" + "\n"

    def draw(self, rng: random.Random, index: int, target_length: int) -> VtState:
        if self.add_fewshot and self._icl is None:
            raise TargetLengthError("VariableTrackingTask.setup() must run before draw()")
        chains = self._chains(rng, icl=False)
        depths = self._depths(rng, chains)
        return VtState(rng.getrandbits(64), chains, depths, self._icl_text(rng))

    def render(self, state: VtState, size: int) -> Rendered:
        body, prefix = self._text(state.chains, state.depths, size)
        return Rendered(
            input=state.icl + body,
            answer_prefix=prefix,
            outputs=list(state.chains.variables[0]),
            metadata={"chain_depths": state.depths, "haystack_size": size},
        )


def _distinct_slots(slots: list[int], size: int) -> list[int]:
    """Sorted insertion indices made distinct and < `size`, moving each as little as needed.

    A statement goes before noise line `slot`; distinct slots below `size` put at least one
    noise line after every statement, so no two statements are ever adjacent (RULER samples
    distinct lines, `random.sample(range(len(sentences)), ...)`). Haystacks with fewer lines
    than statements cannot separate them all: the slots are then only kept in order.
    """
    out = list(slots)
    for i in range(1, len(out)):
        out[i] = max(out[i], out[i - 1] + 1)
    if out and len(out) <= size:
        out[-1] = min(out[-1], size - 1)
        for i in range(len(out) - 2, -1, -1):
            out[i] = min(out[i], out[i + 1] - 1)
    return out


def _rename(statement: str, names: dict[str, str]) -> str:
    return " ".join(names.get(tok, tok) for tok in statement.split(" "))


def _interleave(rng: random.Random, lengths: list[int]) -> list[int]:
    """A random interleaving of chains that keeps each chain's order (RULER's heap shuffle)."""
    heap = [(rng.random(), c, 0) for c in range(len(lengths))]
    heapq.heapify(heap)
    order = []
    while heap:
        _, c, i = heapq.heappop(heap)
        order.append(c)
        if i + 1 < lengths[c]:
            heapq.heappush(heap, (rng.random(), c, i + 1))
    return order
