"""Training data: resolve the corpus, build Megatron datasets, iterate by consumed samples.

The position in the data is a single number, `consumed_samples` (global sequences used so
far). Step k reads global samples [k*G, (k+1)*G) of the train dataset (G = global batch);
micro-batch m of a step covers G-slice [m*B*dp, (m+1)*B*dp) and data-parallel rank r takes
its r-th B-sized part (Megatron's pretraining sampler order). Resuming from
`consumed_samples` therefore neither skips nor repeats a sample, and the global batch of a
step does not depend on the data-parallel size.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from hybrid_megatron.config import RunConfig
from hybrid_megatron.data.datasets import Datasets, build_datasets
from hybrid_megatron.data.errors import DataError
from hybrid_megatron.data.preprocess import preprocess
from hybrid_megatron.data.synthetic import MIX_FIELDS, generate_corpus
from hybrid_megatron.data.tokenizer import (
    BPE_SPEC,
    build_tokenizer,
    resolve_tokenizer_spec,
    run_tokenizer_dir,
)
from hybrid_megatron.data.train_tokenizer import train_tokenizer_from_files

_BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def synthetic_mix(cfg: RunConfig) -> dict:
    """The document-mix options of the built-in corpus (`iter_documents` keyword args)."""
    s = cfg.data.synthetic
    return {
        **{field: getattr(s, field) for field in MIX_FIELDS},
        "doc_length": cfg.model.seq_length - 1 if s.fill_sequences else None,
        "max_haystack": s.max_haystack,
    }


def synthetic_prefix(cfg: RunConfig, run_dir: Path) -> str:
    """Generate (once) the built-in recall corpus for `cfg` under RUN_DIR/data; its prefix.

    With `data.tokenizer: bpe` the run's tokenizer is trained on the generated corpus first
    (RUN_DIR/data/tokenizer). Regenerated whenever the data settings change (a run dir with
    checkpoints refuses such changes before this point).
    """
    s = cfg.data.synthetic
    data_dir = run_dir / "data"
    prefix = data_dir / "synthetic_recall"
    bpe = cfg.data.tokenizer == BPE_SPEC
    params = {
        "num_docs": s.num_docs,
        "seed": s.seed,
        "min_distance": s.min_distance,
        "max_distance": s.max_distance,
        "max_facts": s.max_facts,
        **synthetic_mix(cfg),
        "tokenizer": cfg.data.tokenizer,
        **({"bpe_vocab_size": cfg.data.bpe_vocab_size} if bpe else {}),
    }
    params_file = data_dir / "synthetic_recall.params.json"
    ready = (
        params_file.is_file()
        and json.loads(params_file.read_text()) == params
        and prefix.with_suffix(".bin").is_file()
        and prefix.with_suffix(".idx").is_file()
    )
    if not ready and _is_rank0():
        if not bpe:
            tokenizer = build_tokenizer(cfg.data.tokenizer)  # a bad path fails before generating
        data_dir.mkdir(parents=True, exist_ok=True)
        params_file.unlink(missing_ok=True)  # until everything below is written
        start = time.perf_counter()
        _say(f"generating the built-in corpus: {s.num_docs} documents -> {data_dir}")
        jsonl = generate_corpus(
            data_dir / "synthetic_recall.jsonl",
            s.num_docs,
            s.seed,
            min_distance=s.min_distance,
            max_distance=s.max_distance,
            max_facts=s.max_facts,
            **synthetic_mix(cfg),
        )
        if bpe:
            tok_dir = run_tokenizer_dir(run_dir)
            if tok_dir.exists():  # stale: trained on a corpus with other settings
                shutil.rmtree(tok_dir)
            _say(f"training a {cfg.data.bpe_vocab_size}-token BPE tokenizer on it -> {tok_dir}")
            train_tokenizer_from_files([jsonl], cfg.data.bpe_vocab_size, tok_dir)
            tokenizer = build_tokenizer(str(tok_dir))
        _say("tokenizing the corpus")
        preprocess([jsonl], prefix, tokenizer=tokenizer, log=None)
        params_file.write_text(json.dumps(params, indent=1))
        _say(f"corpus ready in {time.perf_counter() - start:.0f} s")
    if dist.is_initialized():
        dist.barrier()
    return str(prefix)


def _say(msg: str) -> None:
    print(f"[data] {msg}", flush=True)


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def build_train_valid(cfg: RunConfig, run_dir: Path) -> Datasets:
    """Train and valid datasets sized for the whole run (validated before any training)."""
    t = cfg.train
    prefixes = list(cfg.data.prefixes) or [synthetic_prefix(cfg, run_dir)]
    blend = " ".join(prefixes)
    cache_dir = cfg.data.cache_dir or str(run_dir / "data" / "index-cache")
    return build_datasets(
        blend,
        cfg.data.split,
        seq_length=cfg.model.seq_length,
        seed=t.seed,
        train_samples=t.steps * t.global_batch_size,
        valid_samples=t.eval_batches * t.global_batch_size if t.eval_interval >= 0 else 0,
        tokenizer=resolve_tokenizer_spec(cfg.data.tokenizer, run_dir),
        model_vocab_size=cfg.model.vocab_size,
        cache_dir=cache_dir,
    )


def _collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in _BATCH_KEYS}


def micro_batches(
    dataset,
    first_sample: int,
    global_batch_size: int,
    micro_batch_size: int,
    device: torch.device,
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches of the global batch starting at global sample `first_sample`."""
    dp = parallel_state.get_data_parallel_world_size()
    rank = parallel_state.get_data_parallel_rank()
    per_micro = micro_batch_size * dp
    for start in range(first_sample, first_sample + global_batch_size, per_micro):
        lo = start + rank * micro_batch_size
        if lo + micro_batch_size > len(dataset):
            raise DataError(
                f"The dataset has {len(dataset)} samples but step data needs sample "
                f"{lo + micro_batch_size - 1}; the run asked for more samples than were built."
            )
        batch = _collate([dataset[i] for i in range(lo, lo + micro_batch_size)])
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def batch_checksum(batches: list[dict[str, torch.Tensor]]) -> int:
    """A position-weighted token checksum of this rank's micro-batches (for audit logs)."""
    total = 0
    for b in batches:
        tokens = b["tokens"].long().cpu()
        weights = torch.arange(1, tokens.shape[-1] + 1)
        total += int((tokens * weights).sum())
    return total
