"""RULER's QA tasks: qa_1 (SQuAD) and qa_2 (HotpotQA) with distractor documents.

The data files are user-provided, never downloaded:
- SQuAD (v1.1 or v2.0 JSON): `{"data": [{"paragraphs": [{"context": str, "qas": [{"question":
  str, "answers": [{"text": str}], "is_impossible": bool?}]}]}]}`; unanswerable questions are
  dropped. Pass `qa_path=FILE`, or put it at DATA_DIR/squad.json.
- HotpotQA (distractor dev JSON): `[{"question": str, "answer": str, "context": [[title,
  [sentence, ...]], ...]}]`. Pass `qa_path=FILE`, or put it at DATA_DIR/hotpotqa.json.
Sample i asks question i, as RULER does (never cycling: asking for more samples than usable
questions is an error); its gold documents are always kept, then documents of the same
article (SQuAD), then random others. The haystack size is the number of
documents.
"""

from __future__ import annotations

import functools
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from hybrid_megatron.eval.tasks.base import Rendered, Task
from hybrid_megatron.eval.tasks.errors import EvalDataError, MissingTaskDataError
from hybrid_megatron.eval.tasks.haystack import data_dir

TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not "
    "output any other words.\n\nThe following are given documents.\n\n{context}\n\n"
    "Answer the question based on the given documents. Only give me the answer and do not "
    "output any other words.\n\nQuestion: {query}"
)
ANSWER_PREFIX = " Answer:"
DOCUMENT = "Document {i}:\n{document}"
MAX_NEW_TOKENS = 32
DATASETS = {"squad": "squad.json", "hotpotqa": "hotpotqa.json"}
HINTS = {
    "squad": "Provide a SQuAD JSON file (e.g. dev-v2.0.json) with qa_path=FILE or at "
    "DATA_DIR/squad.json.",
    "hotpotqa": "Provide a HotpotQA JSON file (e.g. hotpot_dev_distractor_v1.json) with "
    "qa_path=FILE or at DATA_DIR/hotpotqa.json.",
}


@dataclass(frozen=True)
class Question:
    query: str
    outputs: tuple[str, ...]
    gold: tuple[int, ...]  # document ids
    related: tuple[int, ...] = ()  # other documents of the same article (SQuAD)


@dataclass(frozen=True)
class QaData:
    questions: tuple[Question, ...]
    documents: tuple[str, ...]


def _bad(path: Path, dataset: str, what: str) -> EvalDataError:
    return EvalDataError(f"QA file '{path}' is not a {dataset} file: {what}. {HINTS[dataset]}")


def _read_squad(path: Path, data: object) -> QaData:
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise _bad(path, "squad", 'expected an object with a "data" list')
    try:
        docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
        ids = {c: i for i, c in enumerate(docs)}
        qs = []
        for d in data["data"]:
            article = [ids[p["context"]] for p in d["paragraphs"]]
            for p in d["paragraphs"]:
                me = ids[p["context"]]
                for qa in p["qas"]:
                    if qa.get("is_impossible", False) or not qa["answers"]:
                        continue
                    qs.append(
                        Question(
                            qa["question"],
                            tuple(a["text"] for a in qa["answers"]),
                            (me,),
                            tuple(i for i in article if i != me),
                        )
                    )
    except (KeyError, TypeError) as err:
        raise _bad(path, "squad", f"missing or malformed field {err}") from err
    return QaData(tuple(qs), tuple(docs))


def _read_hotpotqa(path: Path, data: object) -> QaData:
    if not isinstance(data, list):
        raise _bad(path, "hotpotqa", "expected a list of questions")
    try:
        docs = sorted({f"{t}\n{''.join(s)}" for d in data for t, s in d["context"]})
        ids = {c: i for i, c in enumerate(docs)}
        qs = [
            Question(
                d["question"],
                (d["answer"],),
                tuple(ids[f"{t}\n{''.join(s)}"] for t, s in d["context"]),
            )
            for d in data
        ]
    except (KeyError, TypeError, ValueError) as err:
        raise _bad(path, "hotpotqa", f"missing or malformed field {err}") from err
    return QaData(tuple(qs), tuple(docs))


@functools.lru_cache(maxsize=4)
def _load(path: str, dataset: str, mtime: float) -> QaData:
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise _bad(p, dataset, f"invalid JSON ({err})") from err
    out = (_read_squad if dataset == "squad" else _read_hotpotqa)(p, data)
    if not out.questions:
        raise _bad(p, dataset, "it has no answerable questions")
    return out


def load_qa(
    task: str,
    dataset: str,
    qa_path: str | os.PathLike | None,
    data_dir_option: str | os.PathLike | None,
) -> QaData:
    """Read (and cache) the QA file for `dataset`, or raise `MissingTaskDataError`."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got '{dataset}'")
    if qa_path is not None:
        path: Path | None = Path(qa_path).expanduser()
    else:
        root = data_dir(data_dir_option)
        path = None if root is None else root / DATASETS[dataset]
    if path is None or not path.is_file():
        raise MissingTaskDataError(task, f"a {dataset} QA file", path, HINTS[dataset])
    return _load(str(path.resolve()), dataset, path.stat().st_mtime)


@dataclass
class QaState:
    seed: int
    question: Question
    order: list[int]  # gold, then related, then random others (grown lazily)
    rng: random.Random = field(repr=False, default_factory=random.Random)


class QaTask(Task):
    metric = "string_match_part"
    unit = "documents"

    def __init__(
        self,
        name: str = "qa",
        *,
        dataset: str = "squad",
        qa_path: str | os.PathLike | None = None,
        data_dir: str | os.PathLike | None = None,
        max_new_tokens: int = MAX_NEW_TOKENS,
    ) -> None:
        self.name = name
        self.dataset = dataset
        self.max_new_tokens = max_new_tokens
        self.data = load_qa(name, dataset, qa_path, data_dir)

    @property
    def max_samples(self) -> int:
        return len(self.data.questions)

    def draw(self, rng: random.Random, index: int, target_length: int) -> QaState:
        self.check_sample_count(index + 1)
        q = self.data.questions[index]
        related = list(q.related)
        rng.shuffle(related)
        seed = rng.getrandbits(64)
        return QaState(seed, q, list(q.gold) + related, random.Random(seed))

    def _docs(self, state: QaState, n: int) -> list[int]:
        total = len(self.data.documents)
        if len(state.order) < min(n, total):
            used = set(state.order)
            rest = [i for i in range(total) if i not in used]
            state.rng.shuffle(rest)
            state.order.extend(rest)
        if n <= total:
            return state.order[:n]
        return [state.order[i % total] for i in range(n)]  # RULER repeats documents

    def min_size(self, state: QaState) -> int:
        return len(state.question.gold)

    def render(self, state: QaState, size: int) -> Rendered:
        docs = self._docs(state, size)
        random.Random(f"{state.seed}/{size}").shuffle(docs)
        context = "\n\n".join(
            DOCUMENT.format(i=i + 1, document=self.data.documents[d]) for i, d in enumerate(docs)
        )
        gold = [i + 1 for i, d in enumerate(docs) if d in state.question.gold]
        return Rendered(
            input=TEMPLATE.format(context=context, query=state.question.query),
            answer_prefix=ANSWER_PREFIX,
            outputs=list(state.question.outputs),
            metadata={"gold_documents": gold, "haystack_size": size},
        )
