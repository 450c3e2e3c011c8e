"""`analyze longppl`: key tokens from the evaluator once, then every model's LongPPL and plain
loss by position -> DIR/longppl.json, longppl.md, longppl.png.

Key tokens are cached in DIR/key_tokens.json with the settings, evaluator and data that chose
them; a rerun (e.g. with more checkpoints) reuses them instead of loading the evaluator again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hybrid_megatron.analysis.longppl import (
    KeyedSequence,
    LongPPLSettings,
    aggregate,
    build_sequences,
    score_sequence,
)
from hybrid_megatron.errors import ConfigError


def check_settings(s: LongPPLSettings) -> None:
    """Errors before any model loads."""
    for name in ("length", "num_samples", "short_context", "block"):
        if getattr(s, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}")
    if s.length <= s.short_context + 1:
        raise ConfigError(
            f"--length {s.length} leaves no token after the short context "
            f"({s.short_context}): key tokens are only looked for beyond it. Raise --length or "
            "lower --short-context (Fang et al.: 4096 short context, 1024 blocks, 32K sequences)"
        )


def _load_cache(path: Path, ident: dict) -> list[KeyedSequence] | None:
    import torch

    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("ident") != ident:
        return None
    out = []
    for row in data["sequences"]:
        key = torch.zeros(len(row["ids"]) - 1, dtype=torch.bool)
        key[[p - 1 for p in row["key_positions"]]] = True
        out.append(KeyedSequence(row["ids"], key))
    return out


def _save_cache(path: Path, ident: dict, seqs: Sequence[KeyedSequence]) -> None:
    rows = [
        {"ids": s.ids, "key_positions": [int(i) + 1 for i in s.key.nonzero().flatten().tolist()]}
        for s in seqs
    ]
    path.write_text(json.dumps({"ident": ident, "sequences": rows}))


def run_longppl(
    models: Sequence[str],
    evaluator: str,
    out: Path,
    settings: LongPPLSettings,
    data: str | None = None,
    device: str = "auto",
    dtype: str | None = None,
    tokenizer: str | None = None,
    evaluator_tokenizer: str | None = None,
    verify_conversion: bool = True,
) -> dict[str, Any]:
    """Key tokens (cached), then each model's scores; returns what longppl.json holds."""
    import torch

    from hybrid_megatron.eval.models import load_eval_model, resolve_models

    check_settings(settings)
    sources = resolve_models(list(models))
    out.mkdir(parents=True, exist_ok=True)
    ident = {
        "evaluator": str(Path(evaluator).absolute()),
        "evaluator_tokenizer": evaluator_tokenizer,
        "data": None if data is None else str(Path(data).absolute()),
        "settings": {k: v for k, v in settings.to_dict().items() if k != "bin_width"},
    }
    cache = out / "key_tokens.json"
    # The model's tokenizer decides the sequences; load the first model to learn it.
    loaded = load_eval_model(
        sources[0], device, dtype, tokenizer=tokenizer, verify_conversion=verify_conversion
    )
    model_tok = loaded[1]
    seqs = _load_cache(cache, ident | {"model_tokenizer": str(model_tok.spec)})
    if seqs is None:
        t0 = time.perf_counter()
        ev, ev_tok, ev_info = load_eval_model(
            evaluator, device, dtype, tokenizer=evaluator_tokenizer,
            verify_conversion=verify_conversion,
        )  # fmt: skip
        seqs = build_sequences(settings, model_tok, ev, ev_tok, data)
        del ev
        _save_cache(cache, ident | {"model_tokenizer": str(model_tok.spec)}, seqs)
        n_key = sum(int(s.key.sum()) for s in seqs)
        print(
            f"key tokens: {n_key} of {sum(len(s.ids) - 1 for s in seqs)} in {len(seqs)} "
            f"sequences (evaluator {ev_info.name}, {time.perf_counter() - t0:.0f}s)",
            flush=True,
        )
    results = []
    for i, source in enumerate(sources):
        if i:
            loaded = load_eval_model(
                source, device, dtype, tokenizer=tokenizer, verify_conversion=verify_conversion
            )
        model, _, info = loaded
        loaded = None
        with torch.no_grad():
            rows = [score_sequence(model, s, settings.bin_width) for s in seqs]
        agg = aggregate(rows)
        results.append({"model": info.to_dict(), **agg})
        lp = "n/a (no key tokens)" if agg["longppl"] is None else f"{agg['longppl']:.4g}"
        print(f"{info.name}: ppl {agg['ppl']:.4g}  LongPPL {lp}", flush=True)
        del model
    report = {
        "evaluator": evaluator,
        "data": data or "synthetic",
        "settings": settings.to_dict(),
        "key_tokens": sum(int(s.key.sum()) for s in seqs),
        "models": results,
    }
    (out / "longppl.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "longppl.md").write_text(markdown(report))
    plot_longppl(report, out / "longppl.png")
    return report


def _fmt(x: float | None, spec: str = ".4g") -> str:
    return "n/a" if x is None else format(x, spec)


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        "# LongPPL",
        "",
        f"Evaluator `{report['evaluator']}` on {report['data']}: {s['num_samples']} sequences "
        f"of {s['length']} tokens; short context {s['short_context']}, blocks of {s['block']}; "
        f"key token: gain > {s['gain_threshold']} and long-context loss < "
        f"{s['loss_threshold']}. {report['key_tokens']} key tokens.",
        "",
        "| model | step | loss | PPL | key loss | LongPPL | key tokens |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in report["models"]:
        step = m["model"].get("iteration")
        lines.append(
            f"| {m['model']['name']} | {'' if step is None else step} | {m['loss']:.4f} | "
            f"{m['ppl']:.4g} | {_fmt(m['key_loss'], '.4f')} | {_fmt(m['longppl'])} | "
            f"{m['key_tokens']} ({100 * m['key_fraction']:.1f}%) |"
        )
    return "\n".join(lines) + "\n"


def plot_longppl(report: dict[str, Any], path: Path) -> Path:
    """Loss by position (all tokens, solid; key tokens, dashed) of every model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, m in enumerate(report["models"]):
        color = f"C{i % 10}"
        mids = [(b["lo"] + b["hi"]) / 2 for b in m["bins"]]
        ax.plot(mids, [b["loss"] for b in m["bins"]], color=color, marker="o",
                label=f"{m['model']['name']} all")  # fmt: skip
        kx = [x for x, b in zip(mids, m["bins"]) if b["key_loss"] is not None]
        ky = [b["key_loss"] for b in m["bins"] if b["key_loss"] is not None]
        if kx:
            ax.plot(kx, ky, color=color, ls="--", marker="x", label=f"{m['model']['name']} key")
    ax.set_xscale("log")
    ax.set_xlabel("token position")
    ax.set_ylabel("loss (nats)")
    ax.set_title("loss by position: all tokens vs LongPPL key tokens", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
