"""The pipeline after training, in one plain process: loss plot, conversion to Hugging Face,
recall probe, long-context evaluation, and a summary naming what to look at.

`hybrid-megatron train` runs it once training has finished in (or under) that command; jobs
whose processes a launcher owns (torchrun, srun) print the commands instead. It works from
the run directory alone (the newest intact checkpoint), never from a model in memory. Every
stage skips what is already done for that checkpoint, and RUN_DIR/pipeline.json records the
finished pipeline, so rerunning a finished run only says so.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Any

from hybrid_megatron.config import RunConfig

PIPELINE_FILE = "pipeline.json"
LOSS_PLOT = "loss.png"


def _print(msg: str) -> None:
    print(msg, flush=True)


def _hf_dir(run_dir: Path) -> Path:
    return run_dir / "hf"


def _eval_dir(run_dir: Path) -> Path:
    return run_dir / "eval"


def wants_hf(cfg: RunConfig) -> bool:
    """Conversion is needed: asked for, or the recall probe / evaluation run on the HF model."""
    a = cfg.after_training
    return bool(a.convert_to_hf or a.eval_tasks or (a.recall_probe and not cfg.data.prefixes))


# ----------------------------------------------------------------------------- commands


def eval_command(cfg: RunConfig, model_path: Path, out: Path) -> list[str]:
    """The `hybrid-megatron eval` command line the pipeline's evaluation stage amounts to."""
    a = cfg.after_training
    cmd = [
        "hybrid-megatron", "eval", "--model", str(model_path), "--tasks", ",".join(a.eval_tasks),
        "--lengths", ",".join(str(n) for n in a.eval_lengths), "--num-samples",
        str(a.eval_samples), "--batch-size", str(a.eval_batch_size), "--output", str(out),
    ]  # fmt: skip
    if a.eval_max_new_tokens:
        cmd += ["--max-new-tokens", str(a.eval_max_new_tokens)]
    return cmd


def next_step_commands(cfg: RunConfig, run_dir: Path) -> list[list[str]]:
    """What a launcher-owned (torchrun / srun) job leaves to separate single-process jobs."""
    steps: list[list[str]] = []
    if cfg.after_training.plots:
        steps.append(["hybrid-megatron", "plot", str(run_dir), "--out", str(run_dir / LOSS_PLOT)])
    if wants_hf(cfg):
        steps.append(
            [
                "hybrid-megatron",
                "convert",
                "to-hf",
                str(run_dir),
                str(_hf_dir(run_dir)),
                "--dtype",
                cfg.after_training.hf_dtype,
            ]  # fmt: skip
        )
    if cfg.after_training.eval_tasks:
        steps.append(eval_command(cfg, _hf_dir(run_dir), _eval_dir(run_dir)))
    return steps


def print_next_steps(cfg: RunConfig, run_dir: Path) -> None:
    steps = next_step_commands(cfg, run_dir)
    if steps:
        _print("training finished. Next steps (single-process jobs):")
        for cmd in steps:
            _print("  " + shlex.join(cmd))


# ----------------------------------------------------------------------------- stages


def _plot_loss(run_dir: Path) -> Path:
    from hybrid_megatron.reports.loss_curve import plot_loss_curves

    return plot_loss_curves([run_dir], run_dir / LOSS_PLOT)


def _converted_iteration(hf_dir: Path) -> int | None:
    try:
        config = json.loads((hf_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return (config.get("megatron") or {}).get("iteration")


def _convert(cfg: RunConfig, run_dir: Path, iteration: int) -> Path:
    """RUN_DIR/hf from the newest intact checkpoint (kept if it already holds that step)."""
    from hybrid_megatron.hf.convert import megatron_to_hf

    hf_dir = _hf_dir(run_dir)
    if _converted_iteration(hf_dir) == iteration:
        _print(f"Hugging Face model of step {iteration} already in {hf_dir}")
        return hf_dir
    report = megatron_to_hf(
        run_dir / "checkpoints", hf_dir, dtype=cfg.after_training.hf_dtype, overwrite=True
    )
    verify = report.get("verify", {})
    _print(
        f"converted step {iteration} to Hugging Face format: {hf_dir} (logits max abs diff "
        f"{verify.get('max_abs_diff', float('nan')):.2e}, top-1 agreement "
        f"{verify.get('top1_agreement', float('nan')):.2%})"
    )
    return hf_dir


def _recall_probe(cfg: RunConfig, run_dir: Path, hf_dir: Path) -> dict:
    """Exact-match recall of the converted model on held-out documents of the built-in corpus."""
    import torch

    from hybrid_megatron.data.tokenizer import build_tokenizer
    from hybrid_megatron.eval.models import load_eval_model
    from hybrid_megatron.eval.recall import recall_accuracy, recall_items
    from hybrid_megatron.training.data import synthetic_mix

    s = cfg.data.synthetic
    tokenizer = build_tokenizer(cfg.data.tokenizer, run_dir)
    items = recall_items(
        tokenizer, 200, cfg.model.seq_length, s.seed, s.min_distance, s.max_distance,
        s.max_facts, **synthetic_mix(cfg),
    )  # fmt: skip
    model, _, _ = load_eval_model(hf_dir, "cpu", "fp32")

    @torch.no_grad()
    def logits(tokens: torch.Tensor) -> torch.Tensor:
        return model(tokens, use_cache=False).logits.float()

    result = recall_accuracy(logits, items)
    out = _eval_dir(run_dir) / "recall.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    kinds = ", ".join(f"{k} {v['accuracy']:.0%}" for k, v in result["by_kind"].items())
    _print(
        f"recall probe (held-out generated documents, exact match; chance "
        f"{result['chance_exact_match']:.1e}): {result['exact_match']:.1%} overall ({kinds}) "
        f"-> {out}"
    )
    return result


def _evaluate(cfg: RunConfig, run_dir: Path, hf_dir: Path) -> dict[str, Any]:
    from hybrid_megatron.eval.runner import EvalSettings, run_eval

    a = cfg.after_training
    settings = EvalSettings(
        output=_eval_dir(run_dir),
        models=[str(hf_dir)],
        tasks=list(a.eval_tasks),
        lengths=list(a.eval_lengths),
        num_samples=a.eval_samples,
        batch_size=a.eval_batch_size,
        max_new_tokens=a.eval_max_new_tokens,
        verify_conversion=False,  # converted and verified just above
    )
    _print("evaluating: " + shlex.join(eval_command(cfg, hf_dir, _eval_dir(run_dir))))
    return run_eval(settings) or {}


# ----------------------------------------------------------------------------- summary


def _chance(task: str) -> float | None:
    from hybrid_megatron.eval.tasks import get_task

    try:
        return get_task(task).chance_score
    except ValueError:  # data-file tasks cannot be built without their files
        return None


def summary_lines(record: dict[str, Any]) -> list[str]:
    """The scores (with chance levels) and the files a person wants to open."""
    lines = []
    scores = record.get("scores") or {}
    if scores:
        lines.append("long-context evaluation (RULER score x100, greedy decoding):")
        for task, per_length in scores.items():
            chance = _chance(task)
            cells = ", ".join(f"{length} tokens: {v:g}" for length, v in per_length.items())
            lines.append(
                f"  {task:<16} {cells}"
                + (f"   (chance {chance:.1e})" if chance is not None else "")
            )
    files = record.get("files") or {}
    if files:
        lines.append("files:")
        lines += [f"  {name:<12} {path}" for name, path in files.items()]
    return lines


def _scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    models = results.get("models") or {}
    if not models:
        return {}
    (model,) = models.values()
    return {
        task: {length: cell["score"] for length, cell in per_length.items()}
        for task, per_length in (model.get("tasks") or {}).items()
    }


# ----------------------------------------------------------------------------- entry


def finished_record(run_dir: Path, iteration: int) -> dict[str, Any] | None:
    """The pipeline record of a run whose pipeline completed for checkpoint `iteration`."""
    try:
        record = json.loads((run_dir / PIPELINE_FILE).read_text())
    except (OSError, ValueError):
        return None
    files = record.get("files") or {}
    if record.get("iteration") != iteration or not all(Path(p).exists() for p in files.values()):
        return None
    return record


def run_pipeline(cfg: RunConfig, run_dir: Path, iteration: int) -> dict[str, Any]:
    """Every configured stage for the checkpoint of `iteration`; returns the pipeline record."""
    a = cfg.after_training
    start = time.perf_counter()
    record: dict[str, Any] = {"iteration": iteration, "files": {}, "scores": {}}
    files = record["files"]
    if a.plots:
        files["loss plot"] = str(_plot_loss(run_dir))
    if wants_hf(cfg):
        hf_dir = _convert(cfg, run_dir, iteration)
        files["hf model"] = str(hf_dir)
        if a.recall_probe and not cfg.data.prefixes:
            record["recall"] = _recall_probe(cfg, run_dir, hf_dir)["exact_match"]
            files["recall"] = str(_eval_dir(run_dir) / "recall.json")
        if a.eval_tasks:
            record["scores"] = _scores(_evaluate(cfg, run_dir, hf_dir))
            eval_dir = _eval_dir(run_dir)
            files["eval results"] = str(eval_dir / "results.md")
            if (eval_dir / "plots").is_dir():
                files["eval plots"] = str(eval_dir / "plots")
    record["seconds"] = round(time.perf_counter() - start, 1)
    (run_dir / PIPELINE_FILE).write_text(json.dumps(record, indent=1))
    for line in summary_lines(record):
        _print(line)
    return record
