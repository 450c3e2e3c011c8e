"""The pipeline after training: recall probe, conversion to Hugging Face, evaluation.

Runs in single-process jobs (the CPU default); a multi-process job prints the commands that
do the same as separate jobs. Results go under RUN_DIR (eval/recall.json, hf/, eval/).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import torch
import torch.distributed as dist

from hybrid_megatron.checkpoint.model_state import unwrap
from hybrid_megatron.config import RunConfig


def _print(msg: str) -> None:
    print(msg, flush=True)


def recall_probe(cfg: RunConfig, model: torch.nn.Module, out: Path) -> dict:
    """Recall probe of the in-memory model on held-out synthetic documents."""
    from hybrid_megatron.data.tokenizer import build_tokenizer
    from hybrid_megatron.eval.recall import recall_accuracy, recall_items
    from hybrid_megatron.training.data import synthetic_mix

    s = cfg.data.synthetic
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    items = recall_items(
        tokenizer,
        200,
        cfg.model.seq_length,
        s.seed,
        s.min_distance,
        s.max_distance,
        s.max_facts,
        **synthetic_mix(cfg),
    )
    model = unwrap(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device

    def logits(tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(device)
        positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
        return model(tokens, positions, None).float()

    result = recall_accuracy(logits, items)
    model.train(was_training)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    bins = ", ".join(
        f"{k}: {v['accuracy']:.0%} (n={v['n']})" for k, v in result["by_distance"].items()
    )
    kinds = ", ".join(
        f"{k}: {v['accuracy']:.0%} (n={v['n']})" for k, v in result["by_kind"].items()
    )
    _print(
        f"recall probe (held-out synthetic facts, exact match; chance "
        f"{result['chance_exact_match']:.5%}): {result['exact_match']:.1%} overall; "
        f"by distance {bins}; by kind {kinds} -> {out}"
    )
    return result


def _eval_command(cfg: RunConfig, model_path: Path, out: Path) -> list[str]:
    a = cfg.after_training
    cmd = [
        "hybrid-megatron", "eval", "--model", str(model_path), "--tasks", ",".join(a.eval_tasks),
        "--lengths", ",".join(str(n) for n in a.eval_lengths), "--num-samples",
        str(a.eval_samples), "--output", str(out),
    ]  # fmt: skip
    if a.eval_max_new_tokens:
        cmd += ["--max-new-tokens", str(a.eval_max_new_tokens)]
    return cmd


def run_after_training(cfg: RunConfig, run_dir: Path, chunks: list[torch.nn.Module]) -> None:
    """Recall probe, HF conversion and evaluation as configured in `after_training`."""
    a = cfg.after_training
    single = dist.get_world_size() == 1
    ckpt_root = run_dir / "checkpoints"
    hf_dir = run_dir / "hf"
    if not single:
        if dist.get_rank() == 0 and (a.convert_to_hf or a.eval_tasks):
            steps = [["hybrid-megatron", "convert", "to-hf", str(ckpt_root), str(hf_dir)]]
            if a.eval_tasks:
                steps.append(_eval_command(cfg, ckpt_root, run_dir / "eval"))
            _print("next steps (run as separate single-process jobs):")
            for cmd in steps:
                _print("  " + shlex.join(cmd))
        return
    if a.recall_probe and not cfg.data.prefixes:
        recall_probe(cfg, chunks[0], run_dir / "eval" / "recall.json")
    if a.convert_to_hf:
        from hybrid_megatron.hf.convert import megatron_to_hf

        report = megatron_to_hf(ckpt_root, hf_dir, dtype=a.hf_dtype, overwrite=True)
        verify = report.get("verify", {})
        _print(
            f"converted to Hugging Face format: {hf_dir} (logits max abs diff "
            f"{verify.get('max_abs_diff', float('nan')):.2e}, top-1 agreement "
            f"{verify.get('top1_agreement', float('nan')):.2%})"
        )
    if a.eval_tasks:
        from hybrid_megatron.cli import main as cli_main

        model_path = hf_dir if a.convert_to_hf else ckpt_root
        cmd = _eval_command(cfg, model_path, run_dir / "eval")
        _print("evaluating: " + shlex.join(cmd))
        code = cli_main(cmd[1:])
        if code:
            raise RuntimeError(f"evaluation failed with exit code {code}")
