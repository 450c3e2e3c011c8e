"""The run configuration's typed sections: one dataclass per YAML section, and `RunConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from hybrid_megatron.config.validation import validate_model, validate_parallel, validate_training
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
    # Every N steps (and at the end): the attention-mass retrieval score of every
    # full-attention head on a fixed probe set of held-out recall documents, logged to
    # metrics.jsonl / TensorBoard as "retrieval" rows (0: off). See analysis/monitor.py.
    retrieval_monitor_interval: int = 0
    retrieval_monitor_prompts: int = 16


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
