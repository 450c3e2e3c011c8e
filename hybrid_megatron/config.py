"""Typed run configuration, loaded from YAML and validated before any process group starts.

One `RunConfig` flows through every stage. Each section is a dataclass; `from_dict` rejects
unknown keys and wrong types with a message naming the key, and `RunConfig.validate()` checks
the cross-field rules (divisibility by parallel sizes, pattern vs pipeline layout, ...).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from hybrid_megatron.errors import ConfigError
from hybrid_megatron.pattern import CompiledPattern, compile_pattern

AttentionBackend = Literal["auto", "sdpa", "flex", "flash_attn", "te"]
MambaBackend = Literal["auto", "torch", "mamba_ssm"]


@dataclass
class AttentionTypeConfig:
    """Options of one attention type (full or sliding-window)."""

    rope: bool = True
    """Apply rotary position embeddings; false means NoPE for every layer of this type."""
    rope_theta: float = 10000.0
    window: int | None = None
    """Sliding-window size W: a token sees itself and the W-1 tokens before it (SWA only)."""


@dataclass
class MambaConfig:
    """Mamba-2 mixer options (same meaning as Megatron-Core's mamba_* settings)."""

    state_dim: int = 64
    head_dim: int = 64
    num_groups: int = 1
    expand: int = 2
    conv_kernel: int = 4
    chunk_size: int = 128
    num_heads: int | None = None
    """Defaults to expand * hidden_size / head_dim."""


@dataclass
class ModelConfig:
    """Architecture of a hybrid model. See `hybrid_megatron.pattern` for the pattern language."""

    pattern: str = "M-S-*-"
    hidden_size: int = 256
    num_attention_heads: int = 4
    num_query_groups: int | None = None
    """GQA key/value head groups; None means multi-head attention (one group per head)."""
    kv_channels: int | None = None
    """Attention head dim; defaults to hidden_size / num_attention_heads."""
    ffn_hidden_size: int | None = None
    """MLP inner size; defaults to 4 * hidden (gelu) or 8/3 * hidden rounded to 64 (swiglu)."""
    activation: Literal["swiglu", "gelu"] = "swiglu"
    num_layers: int | None = None
    """Optional; when given it must equal the number of layer symbols in `pattern`."""
    vocab_size: int = 512
    seq_length: int = 256
    full_attention: AttentionTypeConfig = field(default_factory=AttentionTypeConfig)
    swa: AttentionTypeConfig = field(default_factory=lambda: AttentionTypeConfig(window=128))
    mamba: MambaConfig = field(default_factory=MambaConfig)
    num_moe_experts: int | None = None
    moe_router_topk: int = 2
    norm_epsilon: float = 1e-5
    init_std: float | None = None
    """Std of the normal weight init; default sqrt(2 / (5 * hidden_size)) ("small init",
    Nguyen & Salazar 2019, as in GPT-NeoX): 0.056 at hidden 128, 0.014 at 2048. A fixed 0.02
    is too small for narrow models: the tiny model then needs ~8x more steps to learn to copy."""
    tie_embeddings: bool = True
    attention_backend: AttentionBackend = "auto"
    mamba_backend: MambaBackend = "auto"
    make_vocab_size_divisible_by: int = 128

    @property
    def init_std_value(self) -> float:
        return self.init_std if self.init_std is not None else (0.4 / self.hidden_size) ** 0.5

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        if self.activation == "swiglu":
            return 64 * -(-int(8 * self.hidden_size / 3) // 64)
        return 4 * self.hidden_size

    @property
    def mamba_num_heads(self) -> int:
        return self.mamba.num_heads or self.mamba.expand * self.hidden_size // self.mamba.head_dim

    def padded_vocab_size(self, tensor_parallel: int) -> int:
        """Vocab padded so every tensor-parallel rank holds an equal, aligned slice."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel
        return multiple * -(-self.vocab_size // multiple)


@dataclass
class ParallelConfig:
    """Parallel layout; data parallel size is what remains of the world size."""

    tensor: int = 1
    pipeline: int = 1
    context: int = 1
    virtual_pipeline: int | None = None
    sequence_parallel: bool = False


@dataclass
class SyntheticDataConfig:
    """The built-in key-value / pass-key recall corpus (used when `data.prefixes` is empty)."""

    num_docs: int = 20000
    seed: int = 0
    min_distance: int = 16
    max_distance: int = 192
    max_facts: int = 3
    # Fractions of documents that are eval prompts + answers (RULER niah_single_1, passkey).
    niah_fraction: float = 0.0
    passkey_fraction: float = 0.0
    # Fraction of "Copy: {numbers}. Again: {numbers}." documents (in-context copying practice
    # at min..max_distance; helps attention learn to retrieve).
    copy_fraction: float = 0.0
    # Fraction of "Repeat: {words} | {words} | ..." documents (dense look-back-and-copy signal
    # from which an induction circuit forms; copies min..max_distance characters apart).
    repeat_fraction: float = 0.0
    # Longest niah / passkey haystack in characters (default: max_distance). Set it near the
    # evaluated prompt length while max_distance stays short for the repeat/copy documents.
    max_haystack: int | None = None
    # Make every document exactly model.seq_length - 1 characters (+ EOD = one sequence with
    # the byte tokenizer), so each training sequence is one whole document from position 0.
    fill_sequences: bool = False


@dataclass
class DataConfig:
    """Training data: preprocessed Megatron indexed datasets, or the generated corpus."""

    # "PREFIX" or "WEIGHT PREFIX" entries (PREFIX.bin/.idx from tools/preprocess_data.py).
    # Empty: generate the synthetic corpus under RUN_DIR/data and train on it.
    prefixes: list[str] = field(default_factory=list)
    split: str = "98,2,0"  # train,valid,test weights over each prefix's documents
    # "byte" (built in), "bpe" (a byte-level BPE of `bpe_vocab_size` tokens trained on this
    # run's generated corpus, kept in RUN_DIR/data/tokenizer) or a local Hugging Face tokenizer
    # directory; null: the config expects the user to name one (train refuses to start).
    tokenizer: str | None = "byte"
    bpe_vocab_size: int = 512
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    cache_dir: str | None = None  # Megatron index caches (default: beside the first prefix)


@dataclass
class OptimizerConfig:
    """AdamW on Megatron-Core's (distributed) optimizer, with the LR schedule."""

    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0  # max global gradient norm; 0 disables clipping
    schedule: Literal["cosine", "wsd", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    # warmup-stable-decay: length of the final decay phase (default: 20% of train.steps)
    wsd_decay_steps: int | None = None
    wsd_decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = "linear"
    distributed: bool = True  # shard optimizer state over data-parallel ranks (ZeRO-1)


@dataclass
class TrainConfig:
    """Steps, batch sizes, precision, evaluation and logging cadence."""

    steps: int = 100
    global_batch_size: int = 8  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 4  # sequences per forward pass per rank
    seed: int = 1234
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    eval_interval: int = 50  # validation every N steps (0: never; always at the end)
    eval_batches: int = 2  # global batches per validation
    log_interval: int = 1
    # Start from this checkpoint's weights only (long-context extension): a run dir, its
    # checkpoints/ dir or an iter_* dir. Optimizer, schedule and data position start fresh.
    init_from: str | None = None
    # Stop (with a checkpoint) after this many steps of the run, e.g. to split a job.
    exit_after_steps: int | None = None
    # CPU training started as one plain process (no torchrun/srun): train with this many
    # data-parallel worker processes of one thread each (null: one per CPU core, as many as
    # the batch layout allows). 1 trains in the process itself.
    cpu_processes: int | None = None


@dataclass
class CheckpointConfig:
    """Megatron-Core dist checkpoints (torch_dist) under RUN_DIR/checkpoints."""

    interval: int = 100  # save every N steps (0: only at the end and on signals)
    keep_last: int | None = 3  # complete checkpoints to keep (None: all)
    save_on_signal: bool = True  # SIGTERM / SIGUSR1: save at the end of the step, then exit
    resume: bool = True  # continue from the newest complete checkpoint of RUN_DIR
    # fully_reshardable: optimizer state loads under any TP/PP/DP layout (gathers per DP
    # group on save); dp_reshardable: faster, optimizer reshards over DP only.
    optimizer_format: Literal["fully_reshardable", "dp_reshardable"] = "fully_reshardable"
    checksums: bool = True  # record and verify CRC32 of every checkpoint file


@dataclass
class AfterTrainingConfig:
    """What a single-process run does once training completes (the pipeline's later stages).

    Multi-process runs print the equivalent commands instead (conversion and evaluation run as
    their own jobs there).
    """

    plots: bool = True  # RUN_DIR/loss.png (train/valid loss and learning rate)
    recall_probe: bool = True  # exact-match recall on held-out synthetic documents
    convert_to_hf: bool = False  # write RUN_DIR/hf (Hugging Face format, verified)
    hf_dtype: Literal["bf16", "fp32"] = "fp32"
    eval_tasks: list[str] = field(default_factory=list)  # e.g. [passkey, niah_single_1]
    eval_lengths: list[int] = field(default_factory=list)  # prompt lengths in tokens
    eval_samples: int = 20
    eval_max_new_tokens: int | None = None  # None: each task's RULER default
    eval_batch_size: int = 8  # prompts generated together (left-padded, length-sorted)


@dataclass
class RunConfig:
    """Everything one run needs."""

    name: str = "run"
    run_dir: str | None = None  # default: runs/<name>
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    after_training: AfterTrainingConfig = field(default_factory=AfterTrainingConfig)

    @property
    def compiled(self) -> CompiledPattern:
        """`model.pattern` compiled under `parallel`, once: kept until either section changes."""
        key = repr((self.model, self.parallel))
        cached = self.__dict__.get("_compiled")
        if cached is None or cached[0] != key:
            cached = (key, compile_pattern(self.model, self.parallel))
            self.__dict__["_compiled"] = cached
        return cached[1]

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name

    def validate(self, world_size: int | None = None) -> None:
        """Raise ConfigError for the first invalid setting (before any process group starts)."""
        validate_model(self.model)
        validate_parallel(self.model, self.parallel, world_size)
        _ = self.compiled  # compiles (and so checks) the pattern
        validate_training(self)


def _positive(name: str, value: int | float | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}.")


def validate_model(m: ModelConfig) -> None:
    """Check the model section on its own (no parallel sizes involved)."""
    for name in ("hidden_size", "num_attention_heads", "vocab_size", "seq_length"):
        _positive(f"model.{name}", getattr(m, name))
    _positive("model.num_query_groups", m.num_query_groups, allow_none=True)
    _positive("model.kv_channels", m.kv_channels, allow_none=True)
    _positive("model.ffn_hidden_size", m.ffn_hidden_size, allow_none=True)
    _positive("model.full_attention.rope_theta", m.full_attention.rope_theta)
    _positive("model.swa.rope_theta", m.swa.rope_theta)
    _positive("model.init_std", m.init_std, allow_none=True)
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} is not divisible by "
            f"model.num_attention_heads={m.num_attention_heads}; change one or set kv_channels."
        )
    if m.num_attention_heads % m.query_groups:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
            f"model.num_query_groups={m.query_groups} (each GQA group must hold whole heads)."
        )
    if m.swa.window is not None and (not isinstance(m.swa.window, int) or m.swa.window <= 0):
        raise ConfigError(
            f"model.swa.window must be a positive integer (tokens seen, current one included), "
            f"got {m.swa.window!r}."
        )
    if m.full_attention.window is not None:
        raise ConfigError(
            "model.full_attention.window is set; full attention has no window. Use the 'S' "
            "symbol and model.swa.window for sliding-window layers."
        )
    mb = m.mamba
    for name in ("state_dim", "head_dim", "num_groups", "expand", "conv_kernel", "chunk_size"):
        _positive(f"model.mamba.{name}", getattr(mb, name))
    if mb.num_heads is None and (mb.expand * m.hidden_size) % mb.head_dim:
        raise ConfigError(
            f"Mamba inner size expand*hidden_size={mb.expand * m.hidden_size} is not divisible by "
            f"model.mamba.head_dim={mb.head_dim}; change head_dim or set model.mamba.num_heads."
        )
    if m.mamba_num_heads % mb.num_groups:
        raise ConfigError(
            f"Mamba heads ({m.mamba_num_heads}) are not divisible by "
            f"model.mamba.num_groups={mb.num_groups}."
        )
    if m.num_moe_experts is not None and m.moe_router_topk > m.num_moe_experts:
        raise ConfigError(
            f"model.moe_router_topk={m.moe_router_topk} exceeds "
            f"model.num_moe_experts={m.num_moe_experts}."
        )


def validate_parallel(m: ModelConfig, p: ParallelConfig, world_size: int | None) -> None:
    """Check the parallel layout against the model (and the world size when known)."""
    for name in ("tensor", "pipeline", "context"):
        _positive(f"parallel.{name}", getattr(p, name))
    _positive("parallel.virtual_pipeline", p.virtual_pipeline, allow_none=True)
    tp, cp = p.tensor, p.context
    if m.num_attention_heads % tp:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
            f"parallel.tensor={tp}; each tensor-parallel rank needs whole heads."
        )
    if m.query_groups % tp:
        raise ConfigError(
            f"model.num_query_groups={m.query_groups} is not divisible by parallel.tensor={tp}; "
            "use more KV groups or less tensor parallelism."
        )
    if "M" in m.pattern:
        if m.mamba_num_heads % (tp * cp):
            raise ConfigError(
                f"Mamba heads ({m.mamba_num_heads}) are not divisible by parallel.tensor * "
                f"parallel.context = {tp * cp}; Mamba tensor/context parallelism splits heads."
            )
        if m.mamba.num_groups % tp:
            raise ConfigError(
                f"model.mamba.num_groups={m.mamba.num_groups} is not divisible by "
                f"parallel.tensor={tp}."
            )
    if p.sequence_parallel and tp == 1:
        raise ConfigError("parallel.sequence_parallel needs parallel.tensor > 1.")
    if cp > 1 and m.seq_length % (2 * cp):
        raise ConfigError(
            f"model.seq_length={m.seq_length} must be divisible by 2 * parallel.context = {2 * cp} "
            "(context parallelism splits each sequence into 2*cp load-balanced chunks)."
        )
    if p.sequence_parallel and m.seq_length % (tp * cp):
        raise ConfigError(
            f"model.seq_length={m.seq_length} must be divisible by tensor*context={tp * cp} "
            "with sequence parallelism."
        )
    if world_size is not None:
        model_parallel = tp * p.pipeline * cp
        if world_size % model_parallel:
            raise ConfigError(
                f"world size {world_size} is not divisible by tensor*pipeline*context = "
                f"{model_parallel}; launch a multiple of {model_parallel} processes."
            )


def validate_training(cfg: RunConfig) -> None:
    """Batch sizes, schedule and data settings (data files are checked when data is built)."""
    t, o, c = cfg.train, cfg.optimizer, cfg.checkpoint
    for name in ("steps", "global_batch_size", "micro_batch_size", "log_interval"):
        _positive(f"train.{name}", getattr(t, name))
    _positive("train.eval_batches", t.eval_batches)
    _positive("train.exit_after_steps", t.exit_after_steps, allow_none=True)
    _positive("train.cpu_processes", t.cpu_processes, allow_none=True)
    _positive("after_training.eval_batch_size", cfg.after_training.eval_batch_size)
    _positive("checkpoint.keep_last", c.keep_last, allow_none=True)
    for name in ("eval_interval",):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name} must be >= 0 (0 disables), got {getattr(t, name)}.")
    if c.interval < 0:
        raise ConfigError(f"checkpoint.interval must be >= 0 (0: end only), got {c.interval}.")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={t.micro_batch_size}."
        )
    if o.lr <= 0 or o.min_lr < 0 or o.min_lr > o.lr:
        raise ConfigError(
            f"optimizer.lr={o.lr} and optimizer.min_lr={o.min_lr} need 0 <= min_lr <= lr, lr > 0."
        )
    if o.warmup_steps < 0 or (o.warmup_steps and o.warmup_steps >= t.steps):
        raise ConfigError(
            f"optimizer.warmup_steps={o.warmup_steps} must be 0 or less than train.steps={t.steps}."
        )
    if o.schedule == "wsd":
        decay = o.wsd_decay_steps if o.wsd_decay_steps is not None else max(1, t.steps // 5)
        if decay <= 0 or decay + o.warmup_steps > t.steps:
            raise ConfigError(
                f"optimizer.wsd_decay_steps={decay} plus warmup_steps={o.warmup_steps} must be "
                f"positive and at most train.steps={t.steps}."
            )
    if o.clip_grad < 0:
        raise ConfigError(f"optimizer.clip_grad must be >= 0 (0 disables), got {o.clip_grad}.")
    s = cfg.data.synthetic
    if cfg.data.prefixes and cfg.data.tokenizer == "bpe":
        raise ConfigError(
            "data.tokenizer: bpe trains a tokenizer on the built-in generated corpus, but "
            "data.prefixes names preprocessed data (already tokenized): set data.tokenizer to "
            "the tokenizer those prefixes were made with."
        )
    if not cfg.data.prefixes:
        _positive("data.synthetic.num_docs", s.num_docs)
        if not 0 < s.min_distance <= s.max_distance:
            raise ConfigError(
                "data.synthetic needs 0 < min_distance <= max_distance, got "
                f"{s.min_distance}, {s.max_distance}."
            )
        from hybrid_megatron.data.synthetic import MIX_FIELDS, check_haystack, check_mix

        check_mix(tuple(getattr(s, f) for f in MIX_FIELDS), None, "data.synthetic.")
        check_haystack(s.max_haystack, s.min_distance, s.max_distance, "data.synthetic.")
        if cfg.data.tokenizer == "bpe" and not (
            258 <= cfg.data.bpe_vocab_size <= cfg.model.vocab_size
        ):
            raise ConfigError(
                f"data.bpe_vocab_size={cfg.data.bpe_vocab_size} must be at least 258 (256 bytes "
                f"+ <eod> + <pad>) and at most model.vocab_size={cfg.model.vocab_size}."
            )
        if s.fill_sequences and cfg.data.tokenizer != "byte":
            raise ConfigError(
                "data.synthetic.fill_sequences sizes documents in characters, which equal tokens "
                f"only with the byte tokenizer (data.tokenizer={cfg.data.tokenizer!r}); use "
                "data.tokenizer: byte or fill_sequences: false."
            )
        if s.fill_sequences:
            _check_documents_fit(cfg)


def _check_documents_fit(cfg: RunConfig) -> None:
    """With fill_sequences, every mixed-in document kind must fit one training sequence."""
    from hybrid_megatron.data.synthetic import MIX_FIELDS, smallest_document

    s, room = cfg.data.synthetic, cfg.model.seq_length - 1
    for key, kind in MIX_FIELDS.items():
        need = smallest_document(kind, s.min_distance)
        if getattr(s, key) > 0 and need > room:
            raise ConfigError(
                f"data.synthetic.{key}={getattr(s, key)} with fill_sequences: a {kind} document "
                f"needs at least {need} characters, but a training sequence holds "
                f"model.seq_length - 1 = {room}. Raise model.seq_length to >= {need + 1}"
                + (" or lower data.synthetic.min_distance" if kind in ("copy", "repeat") else "")
                + f", or set {key}: 0."
            )


def validate_data_source(cfg: RunConfig) -> None:
    """What training reads must be named: configs may leave the tokenizer to the user."""
    d = cfg.data
    if d.tokenizer is None:
        raise ConfigError(
            f"data.tokenizer is not set: this config expects your own tokenizer and corpus (a "
            f"model with vocab_size {cfg.model.vocab_size} is not meant for the built-in byte "
            "tokenizer). Pass --set data.tokenizer=DIR (a local Hugging Face tokenizer) and "
            "--set 'data.prefixes=[PREFIX]' (your corpus preprocessed with it: "
            "hybrid-megatron preprocess --input FILES --tokenizer DIR --output-prefix PREFIX), "
            "or --set data.tokenizer=byte to train on the built-in generated corpus."
        )


def validate_batch_layout(cfg: RunConfig, world_size: int) -> int:
    """Check that batch sizes fit the data-parallel size; return the micro-batches per step."""
    t = cfg.train
    p = cfg.parallel
    dp = world_size // (p.tensor * p.pipeline * p.context)
    if dp and t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"micro_batch_size*data_parallel = {t.micro_batch_size}*{dp}; each data-parallel "
            "rank needs a whole number of micro-batches per step."
        )
    if p.virtual_pipeline and (t.global_batch_size // (t.micro_batch_size * max(dp, 1))) % (
        p.pipeline
    ):
        raise ConfigError(
            "The interleaved pipeline schedule needs the number of micro-batches per step "
            f"({t.global_batch_size // (t.micro_batch_size * max(dp, 1))}) to be a multiple "
            f"of parallel.pipeline={p.pipeline}; raise train.global_batch_size."
        )
    return t.global_batch_size // (t.micro_batch_size * dp)


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, building nested dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where} must be one of {list(choices)}, got {value!r}.")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of options, got {value!r}.")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}.")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return origin(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads "1e-5" as a string
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}.")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{where} must be an integer, got {value!r}.")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where} must be of type {_type_name(tp)}, got {value!r}.")
    return value


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass `cls` from a plain dict, rejecting unknown keys with a suggestion."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"Unknown config key '{path}'.{hint} Valid keys here: {sorted(names)}."
            )
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Plain-dict form of a config (for saving next to checkpoints and results)."""
    return dataclasses.asdict(cfg)


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """Read a YAML config; a top-level `base: other.yaml` (relative to this file) is loaded
    first and this file's keys are merged over it, section by section."""
    if not path.is_file():
        raise ConfigError(
            f"Config file not found: {path}. Pass a YAML file such as configs/tiny.yaml."
        )
    if path.resolve() in chain:
        raise ConfigError(
            f"Config {path} includes itself through `base:` ({' -> '.join(map(str, chain))})."
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"Config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping at top level.")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: `base` must be a path to another YAML config, got {base!r}.")
    merged = _read_yaml(path.parent / base, (*chain, path.resolve()))
    _deep_merge(merged, data)
    return merged


def _deep_merge(into: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load and validate a YAML run config; `overrides` are `a.b.c=value` strings."""
    data = _read_yaml(Path(path))
    for item in overrides or []:
        apply_override(data, item)
    cfg = from_dict(RunConfig, data)
    cfg.validate()
    return cfg


def apply_override(data: dict, item: str) -> None:
    """Apply one `dotted.key=value` override to a raw config dict.

    The value is parsed as YAML (numbers, booleans, lists); text YAML cannot parse, such as a
    layer pattern starting with `*` (a YAML alias), is taken as a plain string.
    """
    if "=" not in item:
        raise ConfigError(f"Override '{item}' must look like section.key=value.")
    key, raw = item.split("=", 1)
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"Override '{item}': '{part}' is not a section.")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw.strip()
    node[parts[-1]] = value
