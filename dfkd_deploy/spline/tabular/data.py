"""Tabular regression data for the spline experiments: CSV reading (numeric + one-hot
categorical columns, no pandas needed), a fixed train/test split and standardisation."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dfkd_deploy.core.errors import DataError

__all__ = ["Table", "load_csv", "drop_outlier_rows", "split_standardise", "Split"]


@dataclass
class Table:
    X: np.ndarray               # [N, D] float64, categoricals one-hot encoded
    y: np.ndarray               # [N] float64
    feature_names: list[str]
    target: str


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def load_csv(path: str | Path, target: str) -> Table:
    """Read a header-ed CSV; a column with any non-numeric value is categorical and one-hot
    encoded (e.g. abalone's ``sex`` -> ``sex=F``, ``sex=I``, ``sex=M``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read CSV ({exc})") from exc
    rows = [r for r in rows if any(c.strip() for c in r)]
    if len(rows) < 3:
        raise DataError(f"{path}: needs a header and at least two data rows")
    header = [h.strip() for h in rows[0]]
    if target not in header:
        raise DataError(f"{path}: no column {target!r} (columns: {', '.join(header)})")
    body = rows[1:]
    for i, r in enumerate(body, start=2):
        if len(r) != len(header):
            raise DataError(f"{path}:{i}: {len(r)} fields, header has {len(header)}")
        if any(not c.strip() for c in r):
            raise DataError(f"{path}:{i}: empty field (missing values are not supported)")
    cols = {h: [r[j].strip() for r in body] for j, h in enumerate(header)}
    if not all(_is_float(v) for v in cols[target]):
        raise DataError(f"{path}: target column {target!r} is not numeric")

    feats, names = [], []
    for h in header:
        if h == target:
            continue
        vals = cols[h]
        if all(_is_float(v) for v in vals):
            feats.append(np.asarray(vals, dtype=np.float64)[:, None])
            names.append(h)
        else:
            levels = sorted(set(vals))
            feats.append(np.stack([np.asarray([v == lev for v in vals], dtype=np.float64) for lev in levels], 1))
            names += [f"{h}={lev}" for lev in levels]
    if not feats:
        raise DataError(f"{path}: no input columns besides {target!r}")
    X = np.concatenate(feats, axis=1)
    y = np.asarray(cols[target], dtype=np.float64)
    if not (np.isfinite(X).all() and np.isfinite(y).all()):
        raise DataError(f"{path}: non-finite values")
    return Table(X, y, names, target)


def drop_outlier_rows(table: Table, k: float = 50.0) -> tuple[Table, int]:
    """Drop rows where a numeric input lies more than ``k`` interquartile ranges from its
    column median. Meant for gross corruption (the shared winequality-red.csv has 11 rows with
    mangled decimals, e.g. volatile_acidity 1185 for 1.185, alcohol 1e14), not for ordinary
    tails: k=50 keeps every genuine row of both UCI files (the heaviest genuine tail, chlorides,
    sits ~27 IQR out). Returns the new table and the count."""
    keep = np.ones(len(table.y), dtype=bool)
    for j in range(table.X.shape[1]):
        x = table.X[:, j]
        q1, med, q3 = np.percentile(x, [25, 50, 75])
        if q3 > q1:
            keep &= np.abs(x - med) <= k * (q3 - q1)
    return Table(table.X[keep], table.y[keep], table.feature_names, table.target), int((~keep).sum())


@dataclass
class Split:
    X_train: np.ndarray         # standardised with training statistics
    y_train: np.ndarray         # standardised target
    X_test: np.ndarray
    y_test: np.ndarray
    y_mean: float
    y_std: float                # MSE in target units = standardised MSE * y_std**2
    feature_names: list[str]


def split_standardise(table: Table, *, test_fraction: float = 0.2, split_seed: int = 0) -> Split:
    """Fixed (seeded) shuffle split; inputs and target standardised with training statistics
    only, so the test set never leaks into the scaling. One-hot columns are standardised too,
    which keeps all inputs on one scale for MARS knots and for the random inits."""
    n = len(table.y)
    order = np.random.default_rng(split_seed).permutation(n)
    n_test = max(1, int(round(test_fraction * n)))
    te, tr = order[:n_test], order[n_test:]
    mu, sd = table.X[tr].mean(0), table.X[tr].std(0)
    sd = np.where(sd > 0, sd, 1.0)
    y_mu, y_sd = float(table.y[tr].mean()), float(table.y[tr].std()) or 1.0
    return Split((table.X[tr] - mu) / sd, (table.y[tr] - y_mu) / y_sd, (table.X[te] - mu) / sd,
                 (table.y[te] - y_mu) / y_sd, y_mu, y_sd, list(table.feature_names))
