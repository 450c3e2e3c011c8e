"""`analyze scaling`: read a table of runs, fit both scaling formulas, write fit.json + a plot.

The table is CSV or TSV (the delimiter is taken from the header line), one row per run. The
tokens column holds token counts, or multiples of N written with a trailing `n` (`200.5n` =
200.5·N tokens, as in the paper's tables). With `log_value` the fitted quantity is ln(value)
(the paper fits ln LongPPL); R² and RMSE are reported on the fitted quantity.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hybrid_megatron.analysis.scaling import FORMULAS, ScalingFit, fit_quality, fit_scaling
from hybrid_megatron.errors import ConfigError

_MULTIPLE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*[nN]\s*$")


@dataclass
class ScalingTable:
    """Parsed rows: N, tokens, fitted value, the raw row and whether it is held out."""

    n: np.ndarray
    d: np.ndarray
    y: np.ndarray
    holdout: np.ndarray  # bool
    rows: list[dict[str, str]]


def _number(text: str, col: str, line: int, path: Path) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{path}:{line}: column '{col}' holds '{text}', not a number; fix the row or "
            "choose another column"
        ) from None


def parse_holdout(specs: Sequence[str]) -> list[tuple[str, str]]:
    """['model_size=S4', ...] -> [(col, value)]; a row matching any of them is held out."""
    out = []
    for spec in specs:
        col, sep, value = spec.partition("=")
        if not sep or not col.strip():
            raise ConfigError(f"--holdout '{spec}' is not COL=VALUE (e.g. --holdout n=104427264)")
        out.append((col.strip(), value.strip()))
    return out


def _matches(cell: str, value: str) -> bool:
    if cell.strip() == value:
        return True
    try:
        return math.isclose(float(cell), float(value), rel_tol=1e-9)
    except ValueError:
        return False


def load_table(
    path: str | Path,
    n_col: str,
    tokens_col: str,
    value_col: str,
    log_value: bool = False,
    holdout: Sequence[tuple[str, str]] = (),
) -> ScalingTable:
    """Read and validate the table; ConfigError naming the row / column on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"scaling table {path} does not exist; pass a CSV/TSV with one row per run"
        )
    text = path.read_text(encoding="utf-8")
    header = text.splitlines()[0] if text.strip() else ""
    delimiter = "\t" if "\t" in header else ","
    rows = list(csv.DictReader(text.splitlines(), delimiter=delimiter))
    if not rows:
        raise ConfigError(f"{path} has no data rows (expected a header line, then one row per run)")
    columns = list(rows[0].keys())
    flags = (("--n-col", n_col), ("--tokens-col", tokens_col), ("--value-col", value_col))
    missing = [f"'{col}' ({flag})" for flag, col in flags if col not in columns]
    if missing:
        raise ConfigError(f"{path} has no column {', '.join(missing)}; its columns are {columns}")
    for col, _ in holdout:
        if col not in columns:
            raise ConfigError(f"--holdout column '{col}' is not in {path}; columns: {columns}")
    n, d, y, held = [], [], [], []
    for i, row in enumerate(rows, start=2):
        nv = _number(row[n_col], n_col, i, path)
        tok = row[tokens_col] or ""
        m = _MULTIPLE.match(tok)
        dv = float(m.group(1)) * nv if m else _number(tok, tokens_col, i, path)
        v = _number(row[value_col], value_col, i, path)
        if log_value:
            if v <= 0:
                raise ConfigError(f"{path}:{i}: --log-value needs positive values, got {v:g}")
            v = math.log(v)
        for name, val in ((n_col, nv), (tokens_col, dv), (value_col, v)):
            if not val > 0 or not math.isfinite(val):
                raise ConfigError(
                    f"{path}:{i}: '{name}' must be positive for a power-law fit, got {val:g}"
                    + (
                        " (after --log-value: ln of values <= 1 is not positive)"
                        if log_value and name == value_col
                        else ""
                    )  # noqa: E501
                )
        n.append(nv)
        d.append(dv)
        y.append(v)
        held.append(any(_matches(row[c] or "", val) for c, val in holdout))
    for col, val in holdout:
        if not any(_matches(r[col] or "", val) for r in rows):
            raise ConfigError(f"--holdout {col}={val} matches no row of {path}")
    return ScalingTable(np.array(n), np.array(d), np.array(y), np.array(held, dtype=bool), rows)


def _fit_entry(fit: ScalingFit, table: ScalingTable) -> dict:
    tr, ho = ~table.holdout, table.holdout
    q_train = fit_quality(fit, table.n[tr], table.d[tr], table.y[tr])
    q_hold = fit_quality(fit, table.n[ho], table.d[ho], table.y[ho])
    entry = fit.to_dict()
    entry.update(
        r2_train=q_train["r2"],
        rmse_train=q_train["rmse"],
        r2_holdout=q_hold["r2"],
        rmse_holdout=q_hold["rmse"],
        equation=fit.equation(),
    )
    return entry


def plot_fit(table: ScalingTable, fit: ScalingFit, out: Path, ylabel: str) -> Path:
    """Value vs tokens, one colour per N: data (held-out rows as crosses) and fitted curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = sorted(set(table.n.tolist()))
    cmap = plt.get_cmap("viridis")
    for k, nv in enumerate(sizes):
        color = cmap(k / max(1, len(sizes) - 1))
        sel = table.n == nv
        for held, marker in ((False, "o"), (True, "x")):
            m = sel & (table.holdout == held)
            if m.any():
                ax.scatter(table.d[m], table.y[m], color=color, marker=marker, zorder=3)
        ds = np.geomspace(table.d[sel].min() * 0.8, table.d[sel].max() * 1.25, 100)
        ax.plot(ds, fit.predict(np.full_like(ds, nv), ds), color=color, label=f"N={nv:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens D")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{fit.equation()}\n(o: fitted rows, x: held out)", fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def run_scaling(
    table_path: str | Path,
    out_dir: str | Path,
    n_col: str = "n",
    tokens_col: str = "tokens",
    value_col: str = "loss",
    log_value: bool = False,
    holdout: Sequence[str] = (),
    formula: str = "no_constant",
    bounds: dict | None = None,
    huber_delta: float = 1e-3,
    plot: bool = True,
) -> dict:
    """Fit both formulas; fit.json's top level is `formula`'s fit (see the module doc)."""
    if formula not in FORMULAS:
        raise ConfigError(f"--formula must be one of {FORMULAS}, got '{formula}'")
    if huber_delta <= 0:
        raise ConfigError(f"--huber-delta must be positive, got {huber_delta}")
    bounds = dict(bounds or {})
    for key, (lo, hi) in bounds.items():
        if lo is not None and hi is not None and lo > hi:
            raise ConfigError(f"--{key}-bounds {lo},{hi}: the lower bound exceeds the upper")
    table = load_table(table_path, n_col, tokens_col, value_col, log_value, parse_holdout(holdout))
    tr = ~table.holdout
    if tr.sum() < 5 + (formula == "constant"):
        raise ConfigError(
            f"only {int(tr.sum())} rows remain for fitting after --holdout; the fit needs at "
            "least 5 (6 with the constant). Hold out fewer rows."
        )
    fits = {}
    for name in FORMULAS:
        b = {k: v for k, v in bounds.items() if name == "constant" or k != "a"}
        try:
            fits[name] = fit_scaling(
                table.n[tr], table.d[tr], table.y[tr], constant=name == "constant", bounds=b,
                huber_delta=huber_delta,
            )  # fmt: skip
        except ValueError as err:
            raise ConfigError(f"scaling fit ({name}): {err}") from None
    entries = {name: _fit_entry(f, table) for name, f in fits.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = fits[formula]
    ylabel = f"ln({value_col})" if log_value else value_col
    result = dict(entries[formula])
    result.update(
        table=str(table_path),
        columns={"n": n_col, "tokens": tokens_col, "value": value_col},
        log_value=log_value,
        huber_delta=huber_delta,
        bounds={k: list(v) for k, v in bounds.items()},
        holdout=list(holdout),
        n_train=int(tr.sum()),
        n_holdout=int(table.holdout.sum()),
        fits=entries,
        rows=[
            {
                "n": float(nv),
                "tokens": float(dv),
                "value": float(yv),
                "holdout": bool(h),
                "predicted": float(chosen.predict([nv], [dv])[0]),
            }
            for nv, dv, yv, h in zip(table.n, table.d, table.y, table.holdout)
        ],  # fmt: skip
    )
    if plot:
        result["plot"] = str(plot_fit(table, chosen, out_dir / "fit.png", ylabel))
    (out_dir / "fit.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
