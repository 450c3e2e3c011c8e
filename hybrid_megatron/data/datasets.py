"""Train/valid GPT datasets from preprocessed prefixes via Megatron-Core's dataset builder.

`build_datasets` validates every prefix first (files present, index readable, .bin size matching
the index, vocab fits the model), then builds `GPTDataset`s (blended with `BlendedDataset` when
there are several prefixes) through `BlendedMegatronDatasetBuilder`. Samples are dicts of
`tokens`, `labels`, `loss_mask`, `position_ids` (1-D tensors of length `seq_length`; blends also
carry `dataset_id`) and work with a plain `torch.utils.data.DataLoader`.

Works without torch.distributed and inside a process group (Megatron builds the index caches on
rank 0, then the other ranks load them after a barrier); call it on every rank.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from hybrid_megatron.data.errors import DataError
from hybrid_megatron.data.preprocess import read_sidecar, strip_prefix_suffix
from hybrid_megatron.data.tokenizer import Tokenizer, build_tokenizer
from hybrid_megatron.errors import BackendUnavailableError

_PREPROCESS_HINT = (
    "run `python tools/preprocess_data.py --input FILES --output-prefix {prefix}` to (re)build it"
)
_TOKEN_SAMPLE_CHUNKS = 64
_TOKEN_SAMPLE_CHUNK = 1 << 16


class MegatronTokenizerAdapter:
    """The tokenizer interface Megatron's GPTDataset reads: `eod`, `pad`, `vocab_size`, ids.

    `pad` is -1 (never a real id, so nothing in the data is masked as padding) when the tokenizer
    has no pad token or its pad equals `eod`. `unique_identifiers` enters Megatron's cache hash.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.unique_identifiers = OrderedDict(
            [
                ("class", type(tokenizer).__name__),
                ("spec", tokenizer.spec),
                ("vocab_size", int(tokenizer.vocab_size)),
                ("eod", int(tokenizer.eod)),
                ("pad", self.pad),
            ]
        )

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)

    @property
    def eod(self) -> int:
        return int(self.tokenizer.eod)

    @property
    def eos(self) -> int:
        return int(self.tokenizer.eod)

    @property
    def pad(self) -> int:
        pad = self.tokenizer.pad
        return -1 if pad is None or int(pad) == self.eod else int(pad)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)


class Datasets(NamedTuple):
    train: torch.utils.data.Dataset
    valid: torch.utils.data.Dataset | None  # None when valid_samples == 0


@dataclass(frozen=True)
class PrefixInfo:
    """What validation learned about one prefix."""

    prefix: str
    num_documents: int
    num_tokens: int
    dtype: np.dtype
    max_token_id: int  # in the sampled tokens


def check_helpers() -> None:
    """Fail clearly if Megatron-Core's compiled dataset helpers cannot be imported."""
    try:
        importlib.import_module("megatron.core.datasets.helpers_cpp")
    except ImportError as err:
        import megatron.core.datasets as mds

        raise BackendUnavailableError(
            "Megatron-Core's compiled dataset helpers (megatron.core.datasets.helpers_cpp) "
            f"failed to import: {err}. They ship prebuilt in the megatron-core wheel for its "
            "Python version and platform: reinstall megatron-core for this interpreter, or build "
            f"them with `make -C {os.path.dirname(mds.__file__)}` (needs a C++ compiler and "
            "pybind11)."
        ) from err


def parse_blend(
    prefixes_with_weights: str | Sequence[str] | Sequence[tuple[float, str]],
) -> tuple[list[str], list[float] | None]:
    """'PATH', 'PATH1 PATH2' or 'W1 PATH1 W2 PATH2' (also as a token list or (w, path) pairs)
    -> (absolute prefixes, weights or None)."""
    if isinstance(prefixes_with_weights, (str, os.PathLike)):
        tokens: list[Any] = os.fspath(prefixes_with_weights).split()
    else:
        tokens = []
        for item in prefixes_with_weights:
            tokens.extend(item if isinstance(item, tuple) else [item])
    text = " ".join(map(str, tokens))
    if not tokens:
        raise DataError("the data blend is empty; pass 'PREFIX' or 'W1 PREFIX1 W2 PREFIX2 ...'.")

    def as_weight(t: Any) -> float | None:
        try:
            w = float(t)
        except (TypeError, ValueError):
            return None
        return w

    is_num = [as_weight(t) is not None for t in tokens]
    if len(tokens) % 2 == 0 and all(is_num[0::2]) and not any(is_num[1::2]):
        weights: list[float] | None = [float(w) for w in tokens[0::2]]
        paths = tokens[1::2]
        bad = [w for w in weights if not (math.isfinite(w) and w > 0)]
        if bad:
            raise DataError(f"data blend '{text}': weights must be positive numbers, got {bad}.")
    elif not any(is_num):
        weights, paths = None, tokens
    else:
        raise DataError(
            f"cannot parse the data blend '{text}': expected 'PREFIX' or "
            "'W1 PREFIX1 W2 PREFIX2 ...' (a positive weight before every prefix)."
        )
    prefixes = [os.path.abspath(os.path.expanduser(strip_prefix_suffix(str(p)))) for p in paths]
    if len(prefixes) == 1:
        weights = None
    return prefixes, weights


def parse_split(split: str) -> list[float]:
    """'98,2,0' -> normalized [train, valid, test] fractions."""
    parts = [p.strip() for p in str(split).split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or any(not math.isfinite(v) or v < 0 for v in values):
        raise DataError(
            f"split '{split}' is invalid; use up to three non-negative comma-separated weights "
            "for train,valid,test, e.g. '98,2,0'."
        )
    values += [0.0] * (3 - len(values))
    total = sum(values)
    if total <= 0:
        raise DataError(f"split '{split}' sums to 0; give the train split a positive weight.")
    return [v / total for v in values]


def _split_ranges(fractions: list[float], n: int) -> list[tuple[int, int]]:
    """Document ranges per split, rounded exactly as Megatron's builder rounds them."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
    )

    out = []
    for bookends in convert_split_vector_to_split_matrix(fractions):
        if bookends is None:
            out.append((0, 0))
        else:
            out.append((int(round(bookends[0] * n)), int(round(bookends[1] * n))))
    return out


def _sampled_max_token(bin_path: str, dtype: np.dtype, num_tokens: int) -> tuple[int, int]:
    """(max, min) token id over up to 64 evenly spaced 64K-token chunks of the .bin."""
    data = np.memmap(bin_path, dtype=dtype, mode="r", shape=(num_tokens,))
    try:
        if num_tokens <= _TOKEN_SAMPLE_CHUNKS * _TOKEN_SAMPLE_CHUNK:
            return int(data.max()), int(data.min())
        starts = np.linspace(0, num_tokens - _TOKEN_SAMPLE_CHUNK, _TOKEN_SAMPLE_CHUNKS)
        chunks = [data[int(s) : int(s) + _TOKEN_SAMPLE_CHUNK] for s in starts]
        return max(int(c.max()) for c in chunks), min(int(c.min()) for c in chunks)
    finally:
        del data


def _index_stats(idx_path: str) -> tuple[int, int, np.dtype, str | None]:
    """(documents, tokens, dtype, what is inconsistent in its tables or None), read with
    Megatron's index reader.

    Uses the reader directly rather than `IndexedDataset`, whose `__del__` prints a spurious
    traceback when its constructor fails on a bad index.
    """
    from megatron.core.datasets.indexed_dataset import _IndexReader

    from hybrid_megatron.data.index_tables import table_problem

    reader = _IndexReader(idx_path, multimodal=False)
    try:
        lengths, pointers, docs = (
            reader.sequence_lengths,
            reader.sequence_pointers,
            reader.document_indices,
        )
        dtype = np.dtype(reader.dtype)
        n = len(lengths)
        num_tokens = int(lengths.sum(dtype=np.int64))
        problem = table_problem(lengths, pointers, docs, dtype.itemsize)
        del lengths, pointers, docs  # release views into the mmap before the reader closes it
    finally:
        del reader
    return n, num_tokens, dtype, problem


def validate_prefix(
    prefix: str, model_vocab_size: int, tokenizer: Tokenizer | None = None
) -> PrefixInfo:
    """Check one preprocessed prefix before Megatron touches it; raise `DataError` on problems."""
    prefix = strip_prefix_suffix(prefix)
    bin_path, idx_path = f"{prefix}.bin", f"{prefix}.idx"
    hint = _PREPROCESS_HINT.format(prefix=prefix)
    missing = [p for p in (bin_path, idx_path) if not os.path.isfile(p)]
    if missing:
        raise DataError(f"dataset file {' and '.join(missing)} not found; {hint}.")

    try:
        stats = _index_stats(idx_path)
    except Exception as err:  # Megatron signals bad indices with asserts/ValueError/struct.error
        raise DataError(
            f"index file {idx_path} is corrupt or truncated ({type(err).__name__}: {err}); {hint}."
        ) from err
    n, num_tokens, dtype, problem = stats
    if problem is not None:
        raise DataError(
            f"index file {idx_path} is corrupt (inconsistent tables: {problem}); {hint}."
        )
    if n == 0:
        raise DataError(f"{idx_path} describes an empty dataset (0 documents); {hint}.")
    expected = num_tokens * dtype.itemsize
    actual = os.path.getsize(bin_path)
    if actual < expected:
        raise DataError(
            f"data file {bin_path} is truncated: its index describes {num_tokens:,} tokens "
            f"({expected:,} bytes as {dtype.name}) but the file has {actual:,} bytes; {hint}."
        )
    if actual > expected:
        raise DataError(
            f"data file {bin_path} has {actual:,} bytes but its index describes only "
            f"{expected:,} ({num_tokens:,} {dtype.name} tokens): the .bin and .idx come from "
            f"different runs; {hint}."
        )

    meta = read_sidecar(prefix)
    if meta is not None:
        side_vocab = int(meta["vocab_size"])
        if side_vocab > model_vocab_size:
            raise DataError(
                f"vocab mismatch: {prefix} was tokenized with vocab size {side_vocab} (tokenizer "
                f"'{meta.get('tokenizer')}') but the model's vocab size is {model_vocab_size}. "
                f"Set the model vocab_size >= {side_vocab}, or re-preprocess the data with the "
                "model's tokenizer."
            )
        if tokenizer is not None and (
            side_vocab != tokenizer.vocab_size or int(meta.get("eod", -1)) != tokenizer.eod
        ):
            raise DataError(
                f"tokenizer mismatch: {prefix} was preprocessed with tokenizer "
                f"'{meta.get('tokenizer')}' (vocab {side_vocab}, eod {meta.get('eod')}) but this "
                f"run uses '{tokenizer.spec}' (vocab {tokenizer.vocab_size}, eod "
                f"{tokenizer.eod}). Use the same tokenizer, or re-preprocess the data."
            )
        if int(meta.get("num_documents", n)) != n or int(meta.get("num_tokens", num_tokens)) != (
            num_tokens
        ):
            raise DataError(
                f"{prefix}.json describes {meta.get('num_documents')} documents / "
                f"{meta.get('num_tokens')} tokens but {idx_path} holds {n} / {num_tokens}: "
                f"they come from different preprocessing runs; {hint}."
            )

    top, bottom = _sampled_max_token(bin_path, dtype, num_tokens)
    if top >= model_vocab_size or bottom < 0:
        bad = top if top >= model_vocab_size else bottom
        raise DataError(
            f"vocab mismatch: {bin_path} holds token id {bad} but the model's vocab size is "
            f"{model_vocab_size} (ids must be in [0, {model_vocab_size})). Set the model "
            "vocab_size above the data's largest id, or re-preprocess with the model's tokenizer."
        )
    return PrefixInfo(prefix, n, num_tokens, dtype, top)


def _fingerprint(prefixes: list[str]) -> str:
    """Identify the data content so a regenerated prefix never reuses stale index caches.

    Megatron's cache hash covers the prefix path and config but not the file contents. The
    fingerprint hashes the .idx (which holds every document length) and the .bin size; identical
    copies on different nodes get the same fingerprint.
    """
    h = hashlib.sha1()
    for prefix in prefixes:
        idx = f"{prefix}.idx"
        size = os.path.getsize(idx)
        h.update(f"{prefix}|{size}|{os.path.getsize(prefix + '.bin')}|".encode())
        with open(idx, "rb") as f:
            if size <= 64 << 20:
                h.update(f.read())
            else:
                h.update(f.read(8 << 20))
                f.seek(size - (8 << 20))
                h.update(f.read())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _quiet(logger_name: str, level: int) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


def _builder_class():
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )

    class _Builder(BlendedMegatronDatasetBuilder):
        """Megatron's builder, runnable without torch.distributed for blends.

        Megatron-Core 0.16's BlendedDataset calls torch.distributed.get_rank() unguarded when
        path_to_cache is set and its cache misses, which raises without a process group. Without
        one, build the (cheap, C++-built) blend indices in memory instead of caching them.
        """

        @staticmethod
        def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
            if cls is BlendedDataset and not torch.distributed.is_initialized():
                datasets, weights, size, config = args
                config = copy.copy(config)
                config.path_to_cache = None
                with _quiet("megatron.core.datasets.blended_dataset", logging.ERROR):
                    return cls(datasets, weights, size, config)
            return BlendedMegatronDatasetBuilder.build_generic_dataset(
                cls, is_built_on_rank, synchronize_ranks, *args
            )

    return _Builder


def build_datasets(
    prefixes_with_weights: str | Sequence[str] | Sequence[tuple[float, str]],
    split: str,
    seq_length: int,
    seed: int,
    train_samples: int,
    valid_samples: int,
    tokenizer: Tokenizer | str,
    model_vocab_size: int,
    cache_dir: str | os.PathLike | None = None,
    *,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    is_built_on_rank: Callable[[], bool] | None = None,
) -> Datasets:
    """Build train and valid datasets; returns `Datasets(train, valid)`.

    - `prefixes_with_weights`: 'PREFIX', 'PREFIX1 PREFIX2' (weighted by token count) or
      'W1 PREFIX1 W2 PREFIX2' (weights normalized); also a token list or (weight, prefix) pairs.
    - `split`: 'train,valid,test' weights over each prefix's documents, e.g. '98,2,0'.
    - `tokenizer`: the tokenizer the data was preprocessed with (object, or a spec for
      `build_tokenizer`).
    - Train has >= `train_samples` samples (a single prefix yields whole epochs); valid has
      >= `valid_samples`, or is None when `valid_samples` == 0.
    - Index caches go to `cache_dir`/<data fingerprint> (default: `index-cache/` beside the
      first prefix).

    Defaults follow Megatron pretraining: documents are packed across sequence boundaries, EOD
    is predicted (not loss-masked), and positions/attention are not reset at document ends.
    """
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = build_tokenizer(tokenizer)
    # Cheap argument checks first.
    for name, value, low in (
        ("seq_length", seq_length, 1),
        ("train_samples", train_samples, 1),
        ("valid_samples", valid_samples, 0),
        ("model_vocab_size", model_vocab_size, 1),
    ):
        if not isinstance(value, (int, np.integer)) or value < low:
            raise DataError(f"{name}={value!r}; use an integer >= {low}.")
    if tokenizer.vocab_size > model_vocab_size:
        raise DataError(
            f"vocab mismatch: the tokenizer '{tokenizer.spec}' has {tokenizer.vocab_size} ids but "
            f"the model's vocab size is {model_vocab_size}; set the model vocab_size >= "
            f"{tokenizer.vocab_size}."
        )
    fractions = parse_split(split)
    if valid_samples > 0 and fractions[1] == 0:
        raise DataError(
            f"valid_samples={valid_samples} but split '{split}' gives validation no data; give "
            "the valid split a weight (e.g. '98,2,0') or set valid_samples=0."
        )
    prefixes, weights = parse_blend(prefixes_with_weights)
    check_helpers()

    infos = [validate_prefix(p, model_vocab_size, tokenizer) for p in prefixes]
    wanted = {"train": (0, train_samples), "valid": (1, valid_samples)}
    for info in infos:
        ranges = _split_ranges(fractions, info.num_documents)
        for name, (i, samples) in wanted.items():
            beg, end = ranges[i]
            if samples > 0 and end <= beg:
                raise DataError(
                    f"{info.prefix} has {info.num_documents} documents; split '{split}' leaves "
                    f"its {name} split with 0 documents (Megatron would loop forever). Use more "
                    f"documents or give the {name} split a larger share."
                )
    if weights is None and len(prefixes) > 1:
        weights = [float(info.num_tokens) for info in infos]

    if cache_dir is None:
        cache_dir = Path(prefixes[0]).parent / "index-cache"
    cache_root = Path(cache_dir)
    path_to_cache = cache_root.expanduser().resolve() / _fingerprint(prefixes)
    try:
        path_to_cache.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(
            f"cannot create the dataset index cache directory {path_to_cache} ({err}); pass a "
            "writable cache_dir."
        ) from err
    if not os.access(path_to_cache, os.W_OK):
        raise DataError(
            f"dataset index cache directory {path_to_cache} is not writable; pass a writable "
            "cache_dir."
        )

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=",".join(f"{f:.12g}" for f in fractions),
        path_to_cache=str(path_to_cache),
        mmap_bin_files=True,
        tokenizer=MegatronTokenizerAdapter(tokenizer),
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=False,
    )
    sizes = [train_samples, valid_samples, 0]
    builder = _builder_class()(GPTDataset, sizes, is_built_on_rank or (lambda: True), config)
    train, valid, _test = builder.build()
    return Datasets(train, valid if valid_samples > 0 else None)
