"""The toy study's report: when retrieval ability and retrieval heads emerge in each run.

Read from what the stages wrote (nothing is recomputed): eval results.json (task scores per
checkpoint), trace.json (scores of the final checkpoint's heads per checkpoint),
retrieval_heads.json and metrics.jsonl. An ability *emerges* at the first checkpoint whose
score reaches `eval.emergence_score`; retrieval heads emerge at the first checkpoint where
a traced head's copy-paste score exceeds `analysis.threshold` (Wu et al.'s 0.1). The text
compares paired variants only where the study has them, and says what one seed can't show.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hybrid_megatron.analysis.study.config import StudyConfig

CLAIMS = {
    "window": "Large-window laziness: a larger SWA window delays retrieval heads in the "
    "full-attention layers",
    "nope": "NoPE on the full-attention layers of a small-window SWA hybrid helps long context",
}


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it lies inside it (reports are shared)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _first_at_least(curve: list[tuple[int, float | None]], level: float) -> int | None:
    return next((s for s, v in curve if v is not None and v >= level), None)


def _stays(curve: list[tuple[int, float | None]], step: int | None, level: float) -> bool:
    return step is not None and all(v is not None and v >= level for s, v in curve if s >= step)


def _run_info(study: StudyConfig, variant, seed: int) -> dict[str, Any]:
    from hybrid_megatron.config import load_config
    from hybrid_megatron.model.params import count_params

    cfg = load_config(study.base, study.overrides(variant, seed))
    m = cfg.model
    kinds = set(m.pattern.replace(" ", "").replace("|", ""))
    family = (
        "full" if kinds & {"*"} and not kinds & {"S", "M"} else ("mamba" if "M" in kinds else "swa")
    )
    return {
        "name": study.run_name(variant, seed),
        "variant": variant.name,
        "description": variant.description,
        "seed": seed,
        "pattern": m.pattern,
        "family": family,
        "window": m.swa.window if "S" in kinds else None,
        "full_rope": m.full_attention.rope,
        "params": count_params(m)["total"],
        "steps": cfg.train.steps,
        "tokens_per_step": cfg.train.global_batch_size * m.seq_length,
    }


def _eval_curves(out: Path, name: str) -> dict[str, list[tuple[int, float | None]]]:
    res = _read(out / "eval" / name / "results.json") or {}
    curves: dict[str, list[tuple[int, float | None]]] = {}
    for m in (res.get("models") or {}).values():
        step = m.get("iteration")
        for task, per_len in (m.get("tasks") or {}).items():
            vals = [c["score"] for c in per_len.values() if c.get("score") is not None]
            curves.setdefault(task, []).append((step, sum(vals) / len(vals) if vals else None))
    return {t: sorted(c) for t, c in curves.items()}


def _trace_curves(out: Path, name: str, threshold: float) -> dict[str, Any] | None:
    tr = _read(out / "trace" / name / "trace.json")
    if not tr:
        return None
    rows = []
    for ck in tr.get("checkpoints", []):
        copies = [h["copy_paste"] for h in ck["heads"] if h.get("copy_paste") is not None]
        masses = [h["attention_mass"] for h in ck["heads"] if h.get("attention_mass") is not None]
        ents = [h["entropy_norm"] for h in ck["heads"] if h.get("entropy_norm") is not None]
        rows.append(
            {
                "step": ck["step"],
                "retrieval_heads": sum(c > threshold for c in copies),
                "max_copy_paste": max(copies) if copies else 0.0,
                "max_attention_mass": max(masses) if masses else None,
                "min_entropy_norm": min(ents) if ents else None,
                "max_qk_rel": max((h.get("qk_rel") or 0.0) for h in ck["heads"])
                if ck["heads"]
                else None,  # noqa: E501
            }
        )
    rows.sort(key=lambda r: r["step"])
    emerged = next((r["step"] for r in rows if r["retrieval_heads"] > 0), None)
    final = tr.get("final", {})
    return {
        "by_step": rows,
        "heads_emerge_step": emerged,
        "final_retrieval_heads": final.get("retrieval_heads", []),
        "traced_heads": tr.get("heads", []),
    }


def collect(study: StudyConfig, out: Path) -> dict[str, Any]:
    from hybrid_megatron.training.metrics import read_metrics

    level, thr = study.eval.emergence_score, study.analysis.threshold
    runs = []
    for variant, seed in study.runs():
        info = _run_info(study, variant, seed)
        name = info["name"]
        run_dir = out / "runs" / name
        rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
        valid = [r for r in rows if r.get("split") == "valid" and r.get("loss") is not None]
        train = [r for r in rows if r.get("split") == "train" and r.get("loss") is not None]
        curves = _eval_curves(out, name)
        emerge = {t: _first_at_least(c, level) for t, c in curves.items()}
        info.update(
            final_train_loss=train[-1]["loss"] if train else None,
            final_valid_loss=valid[-1]["loss"] if valid else None,
            scores=curves,
            final_scores={t: c[-1][1] for t, c in curves.items() if c},
            emerge_step=emerge,
            stays=dict((t, _stays(curves[t], s, level)) for t, s in emerge.items()),
            heads=_trace_curves(out, name, thr),
        )
        runs.append(info)
    return {
        "study": study.name,
        "config": _shown(study.path),
        "base": _shown(study.base),
        "seeds": study.seeds,
        "emergence_score": level,
        "head_threshold": thr,
        "eval": vars(study.eval),
        "analysis": vars(study.analysis),
        "runs": runs,
    }


def _step(v: int | None, steps: int) -> str:
    return f"> {steps} (not reached)" if v is None else str(v)


def _emerge(r: dict, what: str) -> int | None:
    return r["heads"]["heads_emerge_step"] if what == "heads" else r["emerge_step"].get(what)


def _order(a: dict, b: dict, what: str) -> str:
    """When `what` emerged in run a relative to run b: earlier, later, same or neither."""
    sa, sb = _emerge(a, what), _emerge(b, what)
    if sa is None and sb is None:
        return "neither"
    x, y = (sa if sa is not None else math.inf), (sb if sb is not None else math.inf)
    return "same" if x == y else ("earlier" if x < y else "later")


def _relation(a: dict, b: dict, what: str, a_label: str, b_label: str) -> str:
    """One sentence comparing when `what` (a task or 'heads') emerged in run a and run b."""
    label = "retrieval heads" if what == "heads" else what
    sa, sb = _emerge(a, what), _emerge(b, what)
    order = _order(a, b, what)
    if order == "neither":
        return f"{label} emerged neither with {a_label} nor with {b_label} within the run"
    if order == "same":
        return f"{label} emerged at the same checkpoint (step {sa}) with {a_label} and {b_label}"
    return (
        f"{label} emerged {order} with {a_label} (step {_step(sa, a['steps'])}) than with "
        f"{b_label} (step {_step(sb, b['steps'])})"
    )


def _ranking(rs: list[dict], what: str) -> str:
    label = "retrieval heads" if what == "heads" else what
    done = sorted((s, r["variant"]) for r in rs if (s := _emerge(r, what)) is not None)
    never = [r["variant"] for r in rs if _emerge(r, what) is None]
    parts = [f"{v} at {s}" for s, v in done] + ([f"not in {', '.join(never)}"] if never else [])
    return f"{label} emerged: " + "; ".join(parts)


def _pairs(rs: list[dict], tasks: list[str]) -> list[tuple[str, dict, dict, str, str, list]]:
    """The paired runs of one seed the claims compare: (context, a, b, a label, b label,
    what to compare). Large vs small window at each full-attention RoPE setting (retrieval
    heads first, where traced), and NoPE vs RoPE at each window."""
    swa = [r for r in rs if r["family"] == "swa"]
    windows = sorted({r["window"] for r in swa})
    pairs = []
    for rope in (True, False):
        grp = {r["window"]: r for r in swa if r["full_rope"] == rope}
        if len(windows) < 2 or windows[0] not in grp or windows[-1] not in grp:
            continue
        small, large = grp[windows[0]], grp[windows[-1]]
        whats = (["heads"] if small["heads"] and large["heads"] else []) + tasks
        pairs.append((f"{'RoPE' if rope else 'NoPE'} full attention", large, small,
                      f"window {large['window']}", f"window {small['window']}", whats))  # fmt: skip
    for w in windows:
        pair = {r["full_rope"]: r for r in swa if r["window"] == w}
        if True in pair and False in pair:
            pairs.append((f"window {w}", pair[False], pair[True], "NoPE", "RoPE", tasks))
    return pairs


def _by_seed(runs: list[dict]) -> dict[int, list[dict]]:
    by_seed: dict[int, list[dict]] = {}
    for r in runs:
        by_seed.setdefault(r["seed"], []).append(r)
    return dict(sorted(by_seed.items()))


def findings(data: dict[str, Any]) -> list[str]:
    """Plain statements about the paired variants the study has, per seed."""
    runs, lines = data["runs"], []
    tasks = sorted({t for r in runs for t in r["scores"]})
    for seed, rs in _by_seed(runs).items():
        for t in tasks:
            lines.append(f"seed {seed}: {_ranking(rs, t)}.")
        if all(r["heads"] for r in rs):
            lines.append(f"seed {seed}: {_ranking(rs, 'heads')}.")
        for context, a, b, a_label, b_label, whats in _pairs(rs, tasks):
            for what in whats:
                rel = _relation(a, b, what, a_label, b_label)
                if a_label == "NoPE":
                    fa, fb = a["final_scores"].get(what), b["final_scores"].get(what)
                    lines.append(
                        f"seed {seed}, {context}: {rel} on the full-attention layers; final "
                        f"scores {_num(fa)} (NoPE) vs {_num(fb)} (RoPE) (the paper reports NoPE "
                        "helps at small windows)."
                    )
                else:
                    laziness = " (large-window laziness predicts later)" if what == "heads" else ""
                    lines.append(f"seed {seed}, {context}: {rel}{laziness}.")
    if len(data["seeds"]) < 2:
        lines.append(
            "One seed only: a difference of one checkpoint interval, or a few points of score, "
            "can come from the seed alone; rerun with more seeds (--seeds) before reading a "
            "trend into it."
        )
    return lines


def agreement(data: dict[str, Any]) -> list[str]:
    """For each paired comparison made in more than one seed: its direction in every seed and
    whether the seeds agree (a direction seen in one seed only is not a finding)."""
    tasks = sorted({t for r in data["runs"] for t in r["scores"]})
    seen: dict[tuple[str, str, str, str], dict[int, str]] = {}
    for seed, rs in _by_seed(data["runs"]).items():
        for context, a, b, a_label, b_label, whats in _pairs(rs, tasks):
            for what in whats:
                seen.setdefault((context, a_label, b_label, what), {})[seed] = _order(a, b, what)
    lines = []
    for (context, a_label, b_label, what), orders in seen.items():
        if len(orders) < 2:
            continue
        label = "retrieval heads" if what == "heads" else what
        each = ", ".join(f"{o} (seed {s})" for s, o in orders.items())
        verdict = "the same in every seed" if len(set(orders.values())) == 1 else "seeds disagree"
        lines.append(f"{context}, {label} with {a_label} vs {b_label}: {each}; {verdict}.")
    return lines


def _emerges(what: str) -> str:
    return "retrieval heads emerge" if what == "heads" else f"{what} emerges"


def seed_table(data: dict[str, Any], heads: bool) -> list[str]:
    """Markdown rows: per variant, each task's (and the heads') emergence step, final scores
    and final validation loss in every seed, side by side."""
    runs, seeds = data["runs"], data["seeds"]
    tasks = sorted({t for r in runs for t in r["scores"]})
    whats = tasks + (["heads"] if heads and any(r["heads"] for r in runs) else [])
    seed_label = " / ".join(f"s{s}" for s in seeds)
    head = (
        ["variant"]
        + [f"{_emerges(w)} at ({seed_label})" for w in whats]
        + [f"{t} final ({seed_label})" for t in tasks]
        + [f"final valid loss ({seed_label})"]
    )
    rows = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * len(head)) + " |"]
    variants: dict[str, dict[int, dict]] = {}
    for r in runs:
        variants.setdefault(r["variant"], {})[r["seed"]] = r
    for variant, per_seed in variants.items():
        cells = [variant]
        for w in whats:
            cells.append(" / ".join(
                "-" if (r := per_seed.get(s)) is None or (w == "heads" and not r["heads"])
                else _step(_emerge(r, w), r["steps"]).replace(" (not reached)", "")
                for s in seeds
            ))  # fmt: skip
        for t in tasks:
            cells.append(" / ".join(
                _num(per_seed[s]["final_scores"].get(t)) if s in per_seed else "-" for s in seeds
            ))  # fmt: skip
        cells.append(" / ".join(
            _num3(per_seed[s]["final_valid_loss"]) if s in per_seed else "-" for s in seeds
        ))  # fmt: skip
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


# ----------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_SEED_LINES = ("-", "--", ":", "-.")


def _style(data: dict[str, Any], run: dict) -> dict[str, Any]:
    """One colour per variant, one line style per seed, so seeds of a variant pair up."""
    variants = list(dict.fromkeys(r["variant"] for r in data["runs"]))
    seed_index = data["seeds"].index(run["seed"]) if run["seed"] in data["seeds"] else 0
    return {
        "marker": "o",
        "markersize": 3,
        "color": f"C{variants.index(run['variant']) % 10}",
        "ls": _SEED_LINES[seed_index % len(_SEED_LINES)],
        "label": run["name"],
    }


def plot_scores(data: dict[str, Any], task: str, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in data["runs"]:
        curve = r["scores"].get(task) or []
        if curve:
            ax.plot(
                [s for s, _ in curve],
                [v if v is not None else float("nan") for _, v in curve],
                **_style(data, r),
            )
    ax.axhline(data["emergence_score"], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{task} score (0-100)")
    ax.set_ylim(-3, 103)
    ax.set_title(f"{task} over training (dotted: emergence level)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_heads(data: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in data["runs"]:
        if not r["heads"]:
            continue
        rows = r["heads"]["by_step"]
        steps = [x["step"] for x in rows]
        style = _style(data, r)
        axes[0].plot(steps, [x["max_copy_paste"] for x in rows], **style)
        axes[1].plot(steps, [x["max_attention_mass"] or 0.0 for x in rows], **style)
    axes[0].axhline(data["head_threshold"], color="grey", lw=0.8, ls=":")
    axes[0].set_ylabel("best copy-paste score of the traced heads")
    axes[1].set_ylabel("best attention mass on the answer")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("retrieval heads of the final checkpoint, traced over training", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- markdown


def markdown(data: dict[str, Any], plots: list[Path], heads: bool) -> str:
    runs = data["runs"]
    tasks = sorted({t for r in runs for t in r["scores"]})
    e, a = data["eval"], data["analysis"]
    lines = [
        f"# Toy study: {data['study']}",
        "",
        f"Config `{data['config']}` (runs start from `{data['base']}`), seeds {data['seeds']}. "
        f"Every checkpoint is evaluated on {', '.join(e['tasks'])} at lengths {e['lengths']} "
        f"({e['num_samples']} samples each). An ability **emerges** at the first checkpoint "
        f"scoring >= {data['emergence_score']:g}; retrieval heads emerge at the first "
        f"checkpoint where a head of the final checkpoint (top {a['top_k']} by attention mass "
        f"plus copy-paste heads, on {a['num_samples']} {a['task']} prompts of {a['length']} "
        f"tokens) has a copy-paste score above {data['head_threshold']:g}.",
        "",
        "| run | pattern | window | full-attn RoPE | params | final valid loss | "
        + " | ".join(f"{t} final | {t} emerges at" for t in tasks)
        + (" | retrieval heads emerge at | retrieval heads (final) |" if heads else " |"),
        "| " + " | ".join(["---"] * (6 + 2 * len(tasks) + (2 if heads else 0))) + " |",
    ]
    for r in runs:
        cells = [
            r["name"],
            f"`{r['pattern']}`",
            str(r["window"] or "-"),
            "yes" if r["full_rope"] else "no (NoPE)",
            f"{r['params'] / 1e6:.2f}M",
            _num3(r["final_valid_loss"]),
        ]
        for t in tasks:
            s = r["emerge_step"].get(t)
            stay = "" if s is None or r["stays"].get(t) else " (not kept)"
            cells += [_num(r["final_scores"].get(t)), _step(s, r["steps"]) + stay]
        if heads:
            h = r["heads"]
            if h is None:
                cells += ["(no trace)", "-"]
            else:
                fr = (
                    ", ".join(
                        f"L{x['layer']}H{x['head']} {x['copy_paste']:.2f}"
                        for x in h["final_retrieval_heads"][:6]
                    )
                    or "none"
                )
                cells += [_step(h["heads_emerge_step"], r["steps"]), fr]
        lines.append("| " + " | ".join(cells) + " |")
    if len(data["seeds"]) > 1:
        lines += ["", "## Across seeds", "", *seed_table(data, heads), ""]
        lines += [f"- {x}" for x in agreement(data)] or ["- (no paired variants to compare)"]
    lines += ["", "## What it shows", ""]
    lines += [f"- {x}" for x in findings(data)] or ["- (no paired variants to compare)"]
    lines += ["", "Claims under test:", ""] + [f"- {c}" for c in CLAIMS.values()]
    if not heads:
        lines += ["", "Retrieval heads were not analysed in this study (analysis disabled)."]
    lines += ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    lines += ["", "Per run: `eval/RUN/` (results and score plots per checkpoint)"]
    if heads:
        lines[-1] += (
            ", `heads/RUN/retrieval_heads.png` (per-head scores of the final checkpoint), "
            "`trace/RUN/trace_*.png` (scores, attention entropy and Q/K distance vs step)"
        )
    lines[-1] += ", `runs/RUN/` (checkpoints, metrics.jsonl), `logs/`."
    return "\n".join(lines) + "\n"


def _num3(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def write_report(study: StudyConfig, out: Path, heads: bool = True) -> dict[str, Any]:
    """OUT/study.json, OUT/report.md and OUT/plots/*.png from what the stages wrote."""
    from hybrid_megatron.reports.loss_curve import plot_loss_curves

    data = collect(study, out)
    plots_dir = out / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    plots = []
    run_dirs = [out / "runs" / r["name"] for r in data["runs"]]
    if all((d / "metrics.jsonl").is_file() for d in run_dirs):
        plots.append(plot_loss_curves(run_dirs, plots_dir / "loss.png"))
    for t in sorted({t for r in data["runs"] for t in r["scores"]}):
        plots.append(plot_scores(data, t, plots_dir / f"score_vs_step_{t}.png"))
    if heads and any(r["heads"] for r in data["runs"]):
        plots.append(plot_heads(data, plots_dir / "retrieval_heads_vs_step.png"))
    (out / "study.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "report.md").write_text(markdown(data, [Path(p) for p in plots], heads))
    return data
