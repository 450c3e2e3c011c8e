"""Scaling-law fits: L(N, D) = b·N^-alpha + c·D^-beta (+ a) over a table of runs.

The fit works in log space, as Hoffmann et al. and the hybrid-attention paper do: with
B = ln b, C = ln c, A = ln a the prediction is ln L = logsumexp(B - alpha·ln N,
C - beta·ln D[, A]) and the objective is the Huber loss (threshold `huber_delta`) of the
residuals ln L_pred - ln L. It is minimised by L-BFGS-B (analytic gradient) from many
starting points: a data-scaled grid is scored in one vectorised pass and the best and a
spread of other grid points are refined, then the best result is polished with tight
tolerances. Bounds apply to alpha, beta and, in linear space, to a, b, c.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

FORMULAS = ("no_constant", "constant")
PARAMS = ("a", "b", "c", "alpha", "beta")


@dataclass
class ScalingFit:
    """Fitted parameters (linear space) of one formula; `a` is 0 without the constant."""

    formula: str
    a: float
    b: float
    c: float
    alpha: float
    beta: float
    objective: float  # Huber loss on log residuals at the optimum (training rows)
    starts: int = 0  # L-BFGS-B runs made
    converged: bool = True
    message: str = ""
    extra: dict = field(default_factory=dict)

    def predict(self, n: Sequence[float], d: Sequence[float]) -> np.ndarray:
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.a + self.b * n ** (-self.alpha) + self.c * d ** (-self.beta)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("extra")
        return out

    def equation(self, n_name: str = "N", d_name: str = "D") -> str:
        const = f"{self.a:.6g} + " if self.formula == "constant" else ""
        n_term = f"{self.b:.6g}·{n_name}^-{self.alpha:.4f}"
        return f"{const}{n_term} + {self.c:.6g}·{d_name}^-{self.beta:.4f}"


def huber(r: np.ndarray, delta: float) -> np.ndarray:
    """Elementwise Huber loss: r²/2 inside |r| <= delta, delta·(|r| - delta/2) outside."""
    a = np.abs(r)
    q = np.minimum(a, delta)
    return 0.5 * q**2 + delta * (a - q)


def r2_score(y: np.ndarray, pred: np.ndarray) -> float | None:
    """Coefficient of determination (None for fewer than 2 rows or constant y)."""
    y, pred = np.asarray(y, float), np.asarray(pred, float)
    if y.size < 2:
        return None
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot == 0:
        return None
    return 1.0 - float(np.sum((y - pred) ** 2)) / ss_tot


def rmse(y: np.ndarray, pred: np.ndarray) -> float | None:
    y, pred = np.asarray(y, float), np.asarray(pred, float)
    return float(np.sqrt(np.mean((y - pred) ** 2))) if y.size else None


class _Objective:
    """Huber loss on log residuals and its gradient, for theta = [A?, B, C, alpha, beta]."""

    def __init__(self, n: np.ndarray, d: np.ndarray, y: np.ndarray, constant: bool, delta: float):
        self.log_n, self.log_d = np.log(n), np.log(d)
        self.log_y = np.log(y)
        self.constant = constant
        self.delta = delta

    def terms(self, theta: np.ndarray) -> np.ndarray:
        """[..., rows, k] log terms for theta of shape [..., P]."""
        if self.constant:
            a_, b_, c_, al, be = (theta[..., i, None] for i in range(5))
        else:
            b_, c_, al, be = (theta[..., i, None] for i in range(4))
        parts = [b_ - al * self.log_n, c_ - be * self.log_d]
        if self.constant:
            parts.append(np.broadcast_to(a_, parts[0].shape))
        return np.stack(parts, axis=-1)

    def batch(self, thetas: np.ndarray) -> np.ndarray:
        """Objective of many parameter vectors [K, P] at once."""
        t = self.terms(thetas)
        m = t.max(axis=-1, keepdims=True)
        pred = (m + np.log(np.exp(t - m).sum(axis=-1, keepdims=True)))[..., 0]
        return huber(pred - self.log_y, self.delta).sum(axis=-1)

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        t = self.terms(theta)
        m = t.max(axis=-1, keepdims=True)
        e = np.exp(t - m)
        s = e.sum(axis=-1, keepdims=True)
        pred = (m + np.log(s))[..., 0]
        w = e / s  # d pred / d term
        r = pred - self.log_y
        psi = np.clip(r, -self.delta, self.delta)  # d huber / d r
        g_b = psi * w[:, 0]
        g_c = psi * w[:, 1]
        grad = [g_b.sum(), g_c.sum(), -(g_b * self.log_n).sum(), -(g_c * self.log_d).sum()]
        if self.constant:
            grad.insert(0, (psi * w[:, 2]).sum())
        return float(huber(r, self.delta).sum()), np.asarray(grad)


def _log_bounds(bound: tuple[float | None, float | None] | None) -> tuple:
    if bound is None:
        return (None, None)
    lo, hi = bound
    return (None if lo is None or lo <= 0 else math.log(lo), None if hi is None else math.log(hi))


def _grid(lo: float | None, hi: float | None, default: tuple[float, float], k: int) -> np.ndarray:
    a = default[0] if lo is None else lo
    b = (max(default[1], a + 1.0) if lo is None else lo + 2.0) if hi is None else hi
    return np.linspace(a, b, k) if b > a else np.array([a])


def fit_scaling(
    n: Sequence[float],
    d: Sequence[float],
    y: Sequence[float],
    constant: bool = False,
    bounds: Mapping[str, tuple[float | None, float | None]] | None = None,
    huber_delta: float = 1e-3,
    refine: int = 48,
    seed: int = 0,
) -> ScalingFit:
    """Fit `y ~ [a +] b·n^-alpha + c·d^-beta` (all of n, d, y > 0); see the module doc."""
    from scipy.optimize import minimize

    n, d, y = (np.asarray(v, dtype=float) for v in (n, d, y))
    if not (n.shape == d.shape == y.shape) or n.ndim != 1:
        raise ValueError("n, d and y must be 1-D arrays of equal length")
    for name, v in (("N", n), ("tokens", d), ("value", y)):
        if not np.all(np.isfinite(v)) or np.any(v <= 0):
            raise ValueError(f"every {name} must be a positive finite number (got {v.min():g})")
    n_params = 5 if constant else 4
    if n.size < n_params:
        raise ValueError(
            f"{n.size} training rows cannot determine {n_params} parameters; "
            "add rows or hold fewer out"
        )
    bounds = dict(bounds or {})
    for key in bounds:
        if key not in PARAMS or (key == "a" and not constant):
            form = "constant" if constant else "no_constant"
            raise ValueError(f"no parameter '{key}' to bound in the {form} formula")
    al_lo, al_hi = bounds.get("alpha", (0.0, None))
    be_lo, be_hi = bounds.get("beta", (0.0, None))
    al_lo = 0.0 if al_lo is None else al_lo
    be_lo = 0.0 if be_lo is None else be_lo
    box = [_log_bounds(bounds.get("b")), _log_bounds(bounds.get("c")), (al_lo, al_hi),
           (be_lo, be_hi)]  # fmt: skip
    if constant:
        box.insert(0, _log_bounds(bounds.get("a")))
    obj = _Objective(n, d, y, constant, huber_delta)

    # Starting grid, scaled to the data: for each exponent, the prefactor that makes one
    # term alone explain the median value at the median N (or D), shifted by offsets.
    alphas = _grid(al_lo, al_hi, (0.0, 1.5), 10)
    betas = _grid(be_lo, be_hi, (0.0, 1.5), 10)
    ly = math.log(float(np.median(y)))
    offsets = np.array([-4.0, -2.0, -1.0, 0.0, 1.0])
    cols = []
    for al in alphas:
        for be in betas:
            for ob in offsets:
                for oc in offsets:
                    row = [ly + al * np.median(obj.log_n) + ob, ly + be * np.median(obj.log_d) + oc]
                    cols.append(row + [al, be])
    starts = np.asarray(cols)
    if constant:
        a_offsets = np.log(np.min(y)) + np.array([-3.0, -1.5, -0.7, -0.2])
        starts = np.concatenate(
            [np.concatenate([np.full((len(starts), 1), ao), starts], 1) for ao in a_offsets]
        )
    lo = np.array([-np.inf if b[0] is None else b[0] for b in box])
    hi = np.array([np.inf if b[1] is None else b[1] for b in box])
    starts = np.clip(starts, lo, hi)
    scores = obj.batch(starts)
    order = np.argsort(scores)
    rng = np.random.default_rng(seed)
    pick = list(order[: refine // 2])
    rest = order[refine // 2 :]
    pick += list(rng.choice(rest, size=min(len(rest), refine - len(pick)), replace=False))

    best = None
    for i in pick:
        res = minimize(obj, starts[i], jac=True, method="L-BFGS-B", bounds=box,
                       options={"maxiter": 2000, "ftol": 1e-12, "gtol": 1e-10})  # fmt: skip
        if np.isfinite(res.fun) and (best is None or res.fun < best.fun):
            best = res
    final = minimize(obj, best.x, jac=True, method="L-BFGS-B", bounds=box,
                     options={"maxiter": 20000, "ftol": 1e-15, "gtol": 1e-12})  # fmt: skip
    if final.fun <= best.fun:
        best = final
    theta = best.x
    a = float(np.exp(theta[0])) if constant else 0.0
    b_, c_, al, be = theta[-4:]
    return ScalingFit(
        formula="constant" if constant else "no_constant",
        a=a,
        b=float(np.exp(b_)),
        c=float(np.exp(c_)),
        alpha=float(al),
        beta=float(be),
        objective=float(best.fun),
        starts=len(pick) + 1,
        converged=bool(final.success),
        message=str(final.message),
    )


def fit_quality(fit: ScalingFit, n, d, y) -> dict[str, float | None]:
    """R² and RMSE of a fit on rows (in the fitted value's own space)."""
    pred = fit.predict(n, d) if len(n) else np.array([])
    return {"r2": r2_score(y, pred), "rmse": rmse(y, pred)}
