"""Megatron dist checkpoints <-> Hugging Face directories, and logit verification.

- `megatron_to_hf`: a training checkpoint (any TP/PP layout) -> HF directory with config,
  sharded safetensors + index, generation config, tokenizer (the run's local HF tokenizer, or
  the byte tokenizer as an equivalent HF tokenizer) and the model's source files (loads with
  `trust_remote_code=True`).
- `hf_to_megatron`: HF directory -> OUTPUT/checkpoints/iter_N (dist checkpoint with the
  weights under "model", run_config.yaml, hm_complete.json), loadable under any layout whose
  padded vocabulary matches, e.g. for `train.init_from`.
- `verify`: logits of a Megatron checkpoint vs an HF directory on the same tokens.

Both converters refuse, before writing anything, partial/corrupt checkpoints, existing
outputs (unless overwrite), outputs that are, contain or lie inside their source (even with
overwrite) and MoE layers; they build the output beside the target and move it into place
only after it verified (unless verification is disabled). A full disk is reported as such.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from hybrid_megatron.config import RunConfig, load_config
from hybrid_megatron.errors import ConfigError
from hybrid_megatron.hf.config_mapping import (
    check_convertible,
    hf_config_from_run_config,
    run_config_from_hf_config,
)
from hybrid_megatron.hf.configuration_hybrid_megatron import HybridMegatronConfig
from hybrid_megatron.hf.staging import check_not_source, check_output, staged_output
from hybrid_megatron.paths import real_path

log = logging.getLogger(__name__)

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
DEFAULT_ATOL = 1e-3
"""Max |logit difference| accepted by verification (both sides compute in float32 from the
same stored weight values, so differences are only summation order: ~1e-6 here)."""


class ConversionError(ConfigError):
    """A conversion could not be completed or did not reproduce its source's logits."""


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif dtype in DTYPES:
        return DTYPES[dtype]
    raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")


def _checkpoint_and_config(checkpoint: str | os.PathLike) -> tuple[Any, RunConfig]:
    """A verified complete checkpoint and the run config saved with it."""
    from hybrid_megatron.checkpoint.layout import (
        RUN_CONFIG_FILE,
        CheckpointError,
        resolve_checkpoint,
    )

    info = resolve_checkpoint(checkpoint)
    config_path = info.path / RUN_CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(
            f"Checkpoint {info.path} has no {RUN_CONFIG_FILE}, so its architecture is unknown. "
            "Checkpoints written by `hybrid-megatron train` have one; copy the run's YAML config "
            f"there as {RUN_CONFIG_FILE}."
        )
    return info, load_config(config_path)


# ----------------------------------------------------------------------------- tokenizer


def _tokenizer_dir(
    cfg: RunConfig, tokenizer: str | os.PathLike | bool | None, run_dir: Path
) -> Path | None:
    """Local HF tokenizer directory to ship: the argument, else the run's data tokenizer
    ('bpe': the one the run trained, RUN_DIR/data/tokenizer)."""
    from hybrid_megatron.data.tokenizer import resolve_tokenizer_spec

    if tokenizer is False:
        return None
    spec = (
        tokenizer
        if tokenizer not in (None, True)
        else getattr(getattr(cfg, "data", None), "tokenizer", None)
    )
    if not spec or spec == "byte":
        return None
    path = Path(resolve_tokenizer_spec(spec, run_dir))
    if not path.is_dir():
        if tokenizer not in (None, True):
            raise ConfigError(f"Tokenizer directory {path} does not exist.")
        log.warning(
            "Run tokenizer %s is not a local directory here; no tokenizer is written.", spec
        )
        return None
    return path


def _write_tokenizer(
    cfg: RunConfig, tokenizer_dir: Path | None, out_dir: Path, vocab_rows: int
) -> dict[str, int]:
    """Save the HF tokenizer (if any) into `out_dir`; return the special token ids
    (bos/eos/pad; the byte tokenizer's eod/pad) that exist in the embedding."""
    ids: dict[str, int | None] = {}
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        tok.save_pretrained(out_dir)
        ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
        ids["pad_token_id"] = tok.pad_token_id
    elif getattr(getattr(cfg, "data", None), "tokenizer", "byte") == "byte":
        from hybrid_megatron.data.tokenizer import ByteTokenizer, byte_hf_tokenizer

        byte_hf_tokenizer().save_pretrained(out_dir)  # same ids: loadable by AutoTokenizer
        ids = {"eos_token_id": ByteTokenizer.EOD, "pad_token_id": ByteTokenizer.PAD}
    return {k: v for k, v in ids.items() if v is not None and 0 <= v < vocab_rows}


# ----------------------------------------------------------------------------- verification


def _verification_tokens(
    cfg: RunConfig, num_tokens: int | None, batch_size: int, seed: int
) -> torch.Tensor:
    """Random real-vocabulary tokens, longer than the sliding window where possible."""
    m = cfg.model
    length = num_tokens or min(m.seq_length, max(256, 2 * (m.swa.window or 0)), 1024)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, m.vocab_size, (batch_size, length), generator=g)


@torch.no_grad()
def compare_logits(
    megatron_model: torch.nn.Module,
    hf_model: torch.nn.Module,
    tokens: torch.Tensor,
    vocab_size: int,
    atol: float = DEFAULT_ATOL,
) -> dict[str, Any]:
    """Logit agreement on `tokens` over the real vocabulary (both models in float32)."""
    from hybrid_megatron.hf.megatron_io import megatron_logits

    ref = megatron_logits(megatron_model, tokens)[..., :vocab_size]
    got = hf_model(tokens, use_cache=False).logits.float()[..., :vocab_size]
    diff = (ref - got).abs()
    result = {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
        "tokens": int(tokens.numel()),
        "atol": atol,
    }
    result["ok"] = result["max_abs_diff"] <= atol
    return result


@torch.no_grad()
def _round_to(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Give the float32 Megatron model the values the HF weights hold in `dtype`."""
    if dtype != torch.float32:
        for p in model.parameters():
            p.copy_(p.to(dtype).float())


def _load_hf(hf_dir: Path) -> tuple[torch.nn.Module, torch.dtype]:
    """The HF model in float32 and the dtype its weights are stored in."""
    from hybrid_megatron.hf.modeling_hybrid_megatron import HybridMegatronForCausalLM

    model = HybridMegatronForCausalLM.from_pretrained(hf_dir, dtype="auto")
    stored = next(model.parameters()).dtype
    return model.float().eval(), stored


def _check_verification(result: dict[str, Any], what: str) -> None:
    if not result["ok"]:
        raise ConversionError(
            f"{what}: logits differ by up to {result['max_abs_diff']:.3g} (allowed "
            f"{result['atol']:g}; top-1 agreement {result['top1_agreement']:.3f}). The output "
            "was not written. This is a converter bug for this architecture: please report it "
            "with the run config."
        )


# ----------------------------------------------------------------------------- Megatron -> HF


def megatron_to_hf(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "bf16",
    overwrite: bool = False,
    verify: bool = True,
    max_shard_size: str | int = "5GB",
    tokenizer: str | os.PathLike | bool | None = None,
    verify_tokens: int | None = None,
    atol: float = DEFAULT_ATOL,
) -> dict[str, Any]:
    """Convert a Megatron checkpoint to a Hugging Face directory; returns a report dict.

    `checkpoint` is a run dir, its checkpoints/ dir (newest complete iteration) or one iter
    dir. `tokenizer`: a local HF tokenizer dir to ship, False for none, None for the run's.
    """
    from hybrid_megatron.hf import megatron_io
    from hybrid_megatron.hf.weight_mapping import megatron_to_hf_state

    info, cfg = _checkpoint_and_config(checkpoint)
    check_convertible(cfg.model)
    torch_dtype = _dtype(dtype)
    output = Path(output)
    _check_separate_from_checkpoints(output, Path(checkpoint), info.path.parent)
    check_output(output, overwrite)
    tok_dir = _tokenizer_dir(cfg, tokenizer, info.path.parent.parent)
    with megatron_io.single_process_megatron():
        model = megatron_io.build_single_model(cfg)
        megatron_io.load_weights(model, info.path)
        padded = model.embedding.word_embeddings.weight.shape[0]
        provenance = {"iteration": info.iteration, "source_checkpoint": str(info.path.absolute())}
        hf_config = hf_config_from_run_config(cfg, padded, provenance)
        state = megatron_to_hf_state(model.state_dict(), hf_config)
        report: dict[str, Any] = {
            "checkpoint": str(info.path),
            "iteration": info.iteration,
            "output": str(output),
            "dtype": str(torch_dtype).removeprefix("torch."),
        }
        needed = sum(t.numel() for t in state.values()) * torch_dtype.itemsize
        with staged_output(output, overwrite, needed) as tmp:
            special = _write_tokenizer(cfg, tok_dir, tmp, padded)
            _save_hf(hf_config, state, tmp, torch_dtype, max_shard_size, special)
            del state
            if verify:
                hf_model, stored = _load_hf(tmp)
                _round_to(model, stored)
                tokens = _verification_tokens(cfg, verify_tokens, 2, 0)
                report["verify"] = compare_logits(
                    model, hf_model, tokens, cfg.model.vocab_size, atol
                )
                _check_verification(report["verify"], f"Converting {info.path}")
    return report


def _check_separate_from_checkpoints(output: Path, given: Path, root: Path) -> None:
    """Refuse an output that is, contains or lies inside the checkpoints it converts (or
    the run dir given as source; a new or earlier HF dir inside a run dir, RUN_DIR/hf, is
    fine)."""
    run_dir = root.parent if root.name == "checkpoints" else root
    hint = f"Write the Hugging Face model to a new directory outside {root}, e.g. {run_dir}/hf."
    check_not_source(output, root, "checkpoints directory", hint)
    if real_path(given) == real_path(root).parent:  # a run dir (else: root or an iter dir in it)
        check_not_source(output, given, "run directory", hint, new_inside_ok=True)


def _save_hf(
    config: HybridMegatronConfig,
    state: dict[str, torch.Tensor],
    out_dir: Path,
    dtype: torch.dtype,
    max_shard_size: str | int,
    special_tokens: dict[str, int],
) -> None:
    from hybrid_megatron.hf.modeling_hybrid_megatron import HybridMegatronForCausalLM

    for key, value in special_tokens.items():
        setattr(config, key, value)
    model = HybridMegatronForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ConversionError(f"HF model mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    for key, value in special_tokens.items():
        setattr(model.generation_config, key, value)
    model.to(dtype).save_pretrained(out_dir, max_shard_size=max_shard_size)


# ----------------------------------------------------------------------------- HF -> Megatron


def hf_to_megatron(
    hf_dir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    verify: bool = True,
    iteration: int | None = None,
    verify_tokens: int | None = None,
    atol: float = DEFAULT_ATOL,
) -> dict[str, Any]:
    """Convert an HF directory to OUTPUT/checkpoints/iter_N (N: `iteration`, else the one
    recorded at conversion, else 0); returns a report dict with the checkpoint path."""
    from hybrid_megatron.hf import megatron_io
    from hybrid_megatron.hf.weight_mapping import hf_to_megatron_state, resize_vocab

    hf_dir = Path(hf_dir)
    config = _read_hf_config(hf_dir)
    cfg = run_config_from_hf_config(config)
    output = Path(output)
    check_not_source(
        output, hf_dir, "Hugging Face directory", "Write the checkpoint to a new directory."
    )
    check_output(output, overwrite)
    if iteration is None:
        iteration = int((config.megatron or {}).get("iteration", 0))
    hf_model, stored = _load_hf(hf_dir)
    with megatron_io.single_process_megatron():
        model = megatron_io.build_single_model(cfg)
        state = hf_to_megatron_state(hf_model.state_dict(), config)
        rows = model.embedding.word_embeddings.weight.shape[0]
        for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
            if key in state:
                state[key] = resize_vocab(state[key], rows, cfg.model.vocab_size)
        megatron_io.assign_weights(model, state)
        del state
        report: dict[str, Any] = {
            "hf_dir": str(hf_dir),
            "output": str(output),
            "iteration": iteration,
        }
        needed = sum(p.numel() * p.element_size() for p in model.parameters())
        with staged_output(output, overwrite, needed) as tmp:
            ckpt = megatron_io.save_weights_checkpoint(
                [model], cfg, tmp, iteration, {"converted_from": str(hf_dir.absolute())}
            )
            report["checkpoint"] = str(output / ckpt.relative_to(tmp))
            if verify:
                saved = megatron_io.build_single_model(cfg)
                megatron_io.load_weights(saved, ckpt)
                tokens = _verification_tokens(cfg, verify_tokens, 2, 0)
                report["verify"] = compare_logits(
                    saved, hf_model, tokens, cfg.model.vocab_size, atol
                )
                _check_verification(report["verify"], f"Converting {hf_dir}")
    report["weights_dtype"] = str(stored).removeprefix("torch.")
    return report


def _read_hf_config(hf_dir: Path) -> HybridMegatronConfig:
    if not (hf_dir / "config.json").is_file():
        raise ConfigError(
            f"{hf_dir} is not a Hugging Face model directory (no config.json). Pass the "
            "directory written by `convert to-hf` or `save_pretrained`."
        )
    try:
        config = HybridMegatronConfig.from_pretrained(hf_dir)
    except ValueError as e:
        raise ConfigError(f"Cannot convert {hf_dir}: {e}") from e
    if getattr(config, "model_type", None) != HybridMegatronConfig.model_type:
        raise ConfigError(f"{hf_dir} holds a '{config.model_type}' model, not hybrid_megatron.")
    return config


# ----------------------------------------------------------------------------- verify


def verify(
    hf_dir: str | os.PathLike,
    checkpoint: str | os.PathLike,
    *,
    num_tokens: int | None = None,
    batch_size: int = 2,
    seed: int = 0,
    atol: float = DEFAULT_ATOL,
) -> dict[str, Any]:
    """Compare the logits of a Megatron checkpoint and an HF directory on random tokens.

    Both run in float32; the Megatron weights are first rounded to the dtype the HF weights
    are stored in, so only the computation is compared. Returns max/mean |diff|, top-1
    agreement, the token count, `atol` and `ok` (max diff <= atol).
    """
    from hybrid_megatron.hf import megatron_io

    info, cfg = _checkpoint_and_config(checkpoint)
    check_convertible(cfg.model)
    hf_model, stored = _load_hf(Path(hf_dir))
    with megatron_io.single_process_megatron():
        model = megatron_io.build_single_model(cfg)
        megatron_io.load_weights(model, info.path)
        _round_to(model, stored)
        tokens = _verification_tokens(cfg, num_tokens, batch_size, seed)
        vocab = min(cfg.model.vocab_size, hf_model.config.vocab_size)
        result = compare_logits(model, hf_model, tokens, vocab, atol)
    return {"checkpoint": str(info.path), "hf_dir": str(hf_dir), **result}
