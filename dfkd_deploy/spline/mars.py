"""MARS fitting (via py-earth2's ``pyearth.Earth``) into a small, framework-free term table.

The table is what ``construct.py`` turns into a ReLU network, so it only holds what a ReLU
network can compute exactly: *continuous piecewise-linear* (CPWL) terms.

* degree 1 — ``max(0, x_j - t)``, ``max(0, t - x_j)`` and linear ``x_j`` terms: already CPWL, the
  table reproduces pyearth's prediction exactly (same coefficients).
* degree 2 — pyearth multiplies hinges, ``h1 * h2``, which is NOT piecewise linear. We replace
  every product by ``min(h1, h2)`` (CPWL, same support, same knots) and then refit all
  coefficients by least squares on the substituted basis. ``MarsModel.predict`` is the
  *substituted* model; ``MarsModel.earth_predict`` is pyearth's original product model. Linear
  factors are switched off for degree 2 (``allow_linear=False``) so every factor is a hinge >= 0,
  which is what makes ``min`` a sensible stand-in for the product.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from dfkd_deploy.core.errors import UsageError

__all__ = ["Factor", "Term", "MarsModel", "fit_mars", "term_rows", "terms_markdown", "terms_csv"]


@dataclass(frozen=True)
class Factor:
    """One univariate piece. ``direction``: +1 ``max(0, x - knot)``, -1 ``max(0, knot - x)``,
    0 the linear term ``x`` (``knot`` unused)."""

    variable: int
    knot: float
    direction: int

    def evaluate(self, X: np.ndarray) -> np.ndarray:
        x = X[:, self.variable]
        if self.direction == 0:
            return x
        if self.direction > 0:
            return np.maximum(0.0, x - self.knot)
        return np.maximum(0.0, self.knot - x)

    def describe(self, names: Sequence[str]) -> str:
        name = names[self.variable]
        if self.direction == 0:
            return name
        if self.direction > 0:  # print "x + 0.3" rather than "x - -0.3"
            return f"max(0, {name} {'-' if self.knot >= 0 else '+'} {abs(self.knot):.6g})"
        return f"max(0, {self.knot:.6g} - {name})"


@dataclass(frozen=True)
class Term:
    """A basis function: one factor (degree 1) or ``min`` of two hinge factors (degree 2)."""

    factors: tuple[Factor, ...]

    @property
    def degree(self) -> int:
        return len(self.factors)

    def evaluate(self, X: np.ndarray) -> np.ndarray:
        vals = [f.evaluate(X) for f in self.factors]
        return vals[0] if len(vals) == 1 else np.minimum(vals[0], vals[1])

    def describe(self, names: Sequence[str]) -> str:
        parts = [f.describe(names) for f in self.factors]
        return parts[0] if len(parts) == 1 else f"min({parts[0]}, {parts[1]})"


@dataclass
class MarsModel:
    """CPWL model ``y_k = intercept_k + sum_i coef[k, i] * terms[i](x)``."""

    terms: list[Term]
    coef: np.ndarray            # [K, T] float64
    intercept: np.ndarray       # [K]
    n_features: int
    feature_names: list[str]
    max_degree: int
    fit_seconds: float
    substituted: bool = False   # True when degree-2 products were replaced by min()
    earth: Any = field(default=None, repr=False)

    @property
    def n_outputs(self) -> int:
        return int(self.coef.shape[0])

    def design(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if not self.terms:
            return np.zeros((X.shape[0], 0))
        return np.stack([t.evaluate(X) for t in self.terms], axis=1)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """The CPWL (possibly substituted) model, [N, K] in float64."""
        return self.design(X) @ self.coef.T + self.intercept

    def earth_predict(self, X: np.ndarray) -> np.ndarray:
        """pyearth's own prediction (products for degree 2), [N, K]."""
        y = self.earth.predict(np.asarray(X, dtype=np.float64))
        return y.reshape(len(y), -1)


def _factors_of(bf) -> tuple[Factor, ...]:
    """Walk a pyearth basis function up its parent chain to the constant root."""
    factors = []
    node = bf
    while type(node).__name__ != "ConstantBasisFunction":
        kind = type(node).__name__
        if kind == "HingeBasisFunction":
            factors.append(Factor(int(node.get_variable()), float(node.get_knot()),
                                  -1 if node.get_reverse() else 1))
        elif kind == "LinearBasisFunction":
            factors.append(Factor(int(node.get_variable()), 0.0, 0))
        else:  # smoothed hinges, missingness indicators: not CPWL / not supported here
            raise UsageError(f"unsupported MARS basis function {kind}: fit without smooth/allow_missing")
        node = node.get_parent()
    return tuple(reversed(factors))


def fit_mars(X, Y, *, max_degree: int = 1, max_terms: int | None = None, penalty: float | None = None,
             feature_names: Sequence[str] | None = None, max_samples: int | None = None, seed: int = 0,
             **earth_kwargs) -> MarsModel:
    """Fit MARS to ``X`` [N, D] -> ``Y`` [N] or [N, K]; all outputs share one basis.

    ``max_degree`` is 1 (exact CPWL) or 2 (products replaced by ``min``, see the module note).
    ``max_samples`` subsamples rows (seeded) to bound the fit time; extra keyword arguments go
    to ``pyearth.Earth``.
    """
    try:
        from pyearth import Earth
    except ImportError as exc:  # optional dependency
        raise UsageError("MARS needs py-earth2: pip install 'dfkd-deploy[spline]' (py-earth2)") from exc
    if max_degree not in (1, 2):
        raise UsageError(f"max_degree must be 1 or 2 (got {max_degree}); higher degrees have no CPWL stand-in here")
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim == 1:
        Y = Y[:, None]
    if X.ndim != 2 or Y.shape[0] != X.shape[0]:
        raise UsageError(f"fit_mars: X must be [N, D] and Y [N, K] with the same N (got {X.shape}, {Y.shape})")
    if not (np.isfinite(X).all() and np.isfinite(Y).all()):
        raise UsageError("fit_mars: X and Y must be finite (no NaN/Inf)")
    if max_samples is not None and X.shape[0] > max_samples:
        idx = np.random.default_rng(seed).choice(X.shape[0], size=max_samples, replace=False)
        X, Y = X[idx], Y[idx]
    names = list(feature_names) if feature_names is not None else [f"x{j}" for j in range(X.shape[1])]
    if len(names) != X.shape[1]:
        raise UsageError(f"fit_mars: {len(names)} feature names for {X.shape[1]} columns")

    kwargs = dict(max_degree=max_degree, max_terms=max_terms, penalty=penalty)
    if max_degree == 2:
        kwargs["allow_linear"] = False  # keep every factor a hinge >= 0 (see module note)
    kwargs.update(earth_kwargs)
    t0 = time.perf_counter()
    earth = Earth(**kwargs).fit(X, Y)
    seconds = time.perf_counter() - t0

    # coef_ columns follow basis_.piter() (the unpruned functions, constant first).
    coef = np.atleast_2d(np.asarray(earth.coef_, dtype=np.float64))
    terms, cols, intercept = [], [], np.zeros(coef.shape[0])
    for i, bf in enumerate(earth.basis_.piter()):
        if type(bf).__name__ == "ConstantBasisFunction":
            intercept = intercept + coef[:, i]
            continue
        terms.append(Term(_factors_of(bf)))
        cols.append(i)
    coef = coef[:, cols] if cols else np.zeros((coef.shape[0], 0))

    model = MarsModel(terms, coef, intercept, X.shape[1], names, max_degree, seconds, False, earth)
    if any(t.degree > 1 for t in terms):
        _refit_substituted(model, X, Y)
    return model


def _refit_substituted(model: MarsModel, X: np.ndarray, Y: np.ndarray) -> None:
    """Least-squares coefficients for the min()-substituted basis (minimum-norm solution, which
    copes with collinear columns), so the CPWL stand-in fits the data as well as it can with
    the same knots."""
    B = np.concatenate([np.ones((X.shape[0], 1)), model.design(X)], axis=1)
    sol = np.linalg.lstsq(B, Y, rcond=None)[0]
    model.intercept = sol[0]
    model.coef = sol[1:].T.copy()
    model.substituted = True


def term_rows(model: MarsModel) -> list[dict]:
    """One row per (term, factor): variable, knot, direction and the coefficient per output.
    Degree-2 terms get two rows with the same ``term`` index (their ``min`` is the term)."""
    rows = [{"term": 0, "kind": "intercept", "variable": "", "knot": "", "direction": "",
             **{f"coef_{k}": float(model.intercept[k]) for k in range(model.n_outputs)}}]
    for i, term in enumerate(model.terms, start=1):
        kind = "linear" if term.factors[0].direction == 0 else "hinge"
        if term.degree == 2:
            kind = "min" if model.substituted else "product"
        for f in term.factors:
            rows.append({
                "term": i, "kind": kind, "variable": model.feature_names[f.variable],
                "knot": "" if f.direction == 0 else float(f.knot),
                "direction": {1: "x-knot", -1: "knot-x", 0: "linear"}[f.direction],
                **{f"coef_{k}": float(model.coef[k, i - 1]) for k in range(model.n_outputs)}})
    return rows


def terms_csv(model: MarsModel) -> str:
    rows = term_rows(model)
    header = list(rows[0].keys())
    lines = [",".join(header)]
    for r in rows:
        lines.append(",".join(_csv_cell(r[h]) for h in header))
    return "\n".join(lines) + "\n"


def _csv_cell(v) -> str:
    s = f"{v:.8g}" if isinstance(v, float) else str(v)
    return f'"{s}"' if ("," in s or '"' in s) else s


def terms_markdown(model: MarsModel, output_names: Sequence[str] | None = None) -> str:
    outs = list(output_names) if output_names else [f"y{k}" for k in range(model.n_outputs)]
    lines = [f"# MARS terms ({len(model.terms)} terms, degree <= {model.max_degree}, "
             f"fit {model.fit_seconds:.2f} s)", ""]
    if model.substituted:
        lines += ["Degree-2 products h1*h2 were replaced by min(h1, h2) and the coefficients refitted "
                  "(a ReLU network computes min exactly, not a product).", ""]
    lines += ["| # | term | " + " | ".join(outs) + " |", "|---|---|" + "---|" * len(outs)]
    lines.append("| 0 | intercept | " + " | ".join(f"{c:.6g}" for c in model.intercept) + " |")
    for i, term in enumerate(model.terms, start=1):
        coefs = " | ".join(f"{c:.6g}" for c in model.coef[:, i - 1])
        lines.append(f"| {i} | `{term.describe(model.feature_names)}` | {coefs} |")
    return "\n".join(lines) + "\n"
