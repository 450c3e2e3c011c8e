"""Cross-field rules of a `RunConfig`, checked before any process group starts."""

from __future__ import annotations

import math
import typing

from hybrid_megatron.errors import ConfigError

if typing.TYPE_CHECKING:
    from hybrid_megatron.config.schema import ModelConfig, ParallelConfig, RunConfig


def _positive(name: str, value: int | float | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}.")


def _finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}.")


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
    _positive("model.norm_epsilon", m.norm_epsilon)
    _positive("model.make_vocab_size_divisible_by", m.make_vocab_size_divisible_by)
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
        # Context parallelism passes Mamba states between ranks (it does not split heads, as
        # Megatron-Core's all-to-all does), so only tensor parallelism constrains the heads.
        if m.mamba_num_heads % tp:
            raise ConfigError(
                f"Mamba heads ({m.mamba_num_heads}) are not divisible by parallel.tensor={tp}; "
                "tensor parallelism splits Mamba heads (change model.mamba.head_dim / num_heads "
                "or parallel.tensor)."
            )
        if m.mamba.num_groups % tp:
            raise ConfigError(
                f"model.mamba.num_groups={m.mamba.num_groups} is not divisible by "
                f"parallel.tensor={tp}."
            )
    if p.sequence_parallel and tp == 1:
        raise ConfigError("parallel.sequence_parallel needs parallel.tensor > 1.")
    if cp > 1 and m.seq_length % (2 * cp):
        fit = 2 * cp * max(1, round(m.seq_length / (2 * cp)))
        raise ConfigError(
            f"model.seq_length={m.seq_length} must be divisible by 2 * parallel.context = {2 * cp} "
            "(context parallelism splits each sequence into 2*cp load-balanced chunks); use "
            f"e.g. model.seq_length={fit} or another parallel.context."
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
    for name in ("eval_interval", "retrieval_monitor_interval"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name} must be >= 0 (0 disables), got {getattr(t, name)}.")
    if t.retrieval_monitor_interval:
        _positive("train.retrieval_monitor_prompts", t.retrieval_monitor_prompts)
        if "*" not in cfg.model.pattern:
            raise ConfigError(
                "train.retrieval_monitor_interval scores full-attention heads but model.pattern "
                f"{cfg.model.pattern!r} has none ('*'); set it to 0."
            )
        if cfg.parallel.context > 1:
            raise ConfigError(
                "train.retrieval_monitor_interval does not support context parallelism "
                "(parallel.context > 1); set it to 0."
            )
    if c.interval < 0:
        raise ConfigError(f"checkpoint.interval must be >= 0 (0: end only), got {c.interval}.")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={t.micro_batch_size}."
        )
    for name in ("lr", "min_lr", "weight_decay", "beta1", "beta2", "eps", "clip_grad"):
        _finite(f"optimizer.{name}", getattr(o, name))
    if not (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1):
        raise ConfigError(
            f"optimizer.beta1={o.beta1} and optimizer.beta2={o.beta2} must lie in [0, 1) "
            "(Adam's moving-average factors, e.g. 0.9 and 0.95)."
        )
    if o.weight_decay < 0:
        raise ConfigError(f"optimizer.weight_decay must be >= 0, got {o.weight_decay}.")
    _positive("optimizer.eps", o.eps)
    if not 0 <= t.seed < 2**32:
        raise ConfigError(f"train.seed must be in [0, 2**32), got {t.seed}.")
    if not 0 <= cfg.data.synthetic.seed < 2**32:
        raise ConfigError(
            f"data.synthetic.seed must be in [0, 2**32), got {cfg.data.synthetic.seed}."
        )
    validate_after_training(cfg)
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


def validate_after_training(cfg: RunConfig) -> None:
    """after_training's evaluation settings, checked with the config, not after training."""
    a = cfg.after_training
    _positive("after_training.eval_samples", a.eval_samples)
    _positive("after_training.eval_max_new_tokens", a.eval_max_new_tokens, allow_none=True)
    if not a.eval_tasks:
        return
    from hybrid_megatron.eval.plan import PPL_TASK
    from hybrid_megatron.eval.tasks.errors import MissingTaskDataError
    from hybrid_megatron.eval.tasks.registry import TASKS, get_task

    known = [*TASKS, PPL_TASK]
    for task in a.eval_tasks:
        if task not in known:
            raise ConfigError(
                f"after_training.eval_tasks: unknown task {task!r}; choose from {', '.join(known)}."
            )
    if a.eval_tasks and not a.eval_lengths:
        raise ConfigError(
            "after_training.eval_tasks is set but after_training.eval_lengths is empty; list "
            "the prompt lengths in tokens to evaluate at, e.g. [1024, 4096]."
        )
    for n in a.eval_lengths:
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ConfigError(
                f"after_training.eval_lengths must be positive token counts, got {n!r}."
            )
    for task in a.eval_tasks:
        if task == PPL_TASK:
            continue
        try:
            get_task(task).check_sample_count(a.eval_samples)
        except MissingTaskDataError:
            pass  # skipped with a message when evaluation runs (data may appear by then)
        except ValueError as err:
            raise ConfigError(f"after_training.eval_tasks: task {task!r}: {err}") from err


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
