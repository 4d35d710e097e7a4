"""Cross-backend comparison: does every deployable form of the student compute what the torch
student computes?

Each back end (torch, ORT fp32, ORT int8, TensorRT engines where present) is a
:class:`~dfkd_deploy.runtime.base.Runner`: model-space NCHW float32 inputs to logits. All are compared with one reference (the torch
student) on the same inputs, and judged by a tolerance preset for their precision: fp32 must
match elementwise, fp16 looser, and int8 is judged by top-1 agreement, because quantized logits
legitimately move while the decisions should not.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np

from dfkd_deploy.runtime.base import Runner

REFERENCE = "torch fp32 (CPU)"


@dataclass(frozen=True)
class Tolerance:
    atol: Optional[float] = None            # elementwise: |got - ref| <= atol + rtol * |ref|
    rtol: float = 0.0
    min_agreement: Optional[float] = None   # top-1 agreement with the reference

    def describe(self) -> str:
        parts = []
        if self.atol is not None:
            # No "|" here: the text goes into markdown table cells.
            parts.append(f"abs diff <= {self.atol:g}" + (f" + {self.rtol:g} x abs ref" if self.rtol else ""))
        if self.min_agreement is not None:
            parts.append(f"agreement >= {self.min_agreement:.0%}")
        return " and ".join(parts) or "none"


# Presets per precision (recipe candidates). fp32 back ends differ only by kernel order; fp16
# rounds at ~1e-3 relative; int8 is judged only by the decisions it makes.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-4),
    "fp16": Tolerance(atol=1e-2, rtol=1e-2, min_agreement=0.99),
    "int8": Tolerance(min_agreement=0.9),
}


@dataclass(frozen=True)
class Dataset:
    name: str
    inputs: np.ndarray                      # model-space NCHW float32
    labels: Optional[np.ndarray] = None


@dataclass
class ComparisonRow:
    backend: str
    precision: str
    data: str
    images: int
    max_abs_diff: Optional[float]
    mean_abs_diff: Optional[float]
    top1_agreement: Optional[float]
    accuracy: Optional[float]
    criterion: str
    passed: Optional[bool]                  # None: the reference itself, or a back end that failed to run
    error: Optional[str] = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Comparison:
    """Every row of a comparison and what they were compared with (report.json ``comparison``)."""

    rows: list[ComparisonRow] = field(default_factory=list)
    reference: str = REFERENCE

    @property
    def passed(self) -> bool:
        return all_passed(self.rows)

    def accuracy(self, backend: str, precision: str) -> Optional[float]:
        """The accuracy of a back end on labelled data (the last such row), or None."""
        found = [r.accuracy for r in self.rows
                 if (r.backend, r.precision) == (backend, precision) and r.accuracy is not None]
        return found[-1] if found else None

    def to_dict(self) -> dict:
        return {"passed": self.passed, "reference": self.reference, "rows": [r.to_dict() for r in self.rows]}


def compare_backends(reference: Runner, others: Sequence[Runner], datasets: Sequence[Dataset], *,
                     tolerances: Mapping[str, Tolerance] = TOLERANCES) -> list[ComparisonRow]:
    """One row per (back end, data set), the reference included (for its accuracy)."""
    rows: list[ComparisonRow] = []
    for ds in datasets:
        x = np.ascontiguousarray(ds.inputs, np.float32)
        ref = np.asarray(reference.predict(x), np.float64)
        rows.append(ComparisonRow(reference.name, reference.precision, ds.name, len(x), None, None, None,
                                  _accuracy(ref, ds.labels), "reference", None))
        for b in others:
            tol = tolerances.get(b.precision, TOLERANCES["fp32"])
            try:
                got = np.asarray(b.predict(x), np.float64)
            except Exception as exc:  # noqa: BLE001 - one broken back end must not hide the others
                rows.append(ComparisonRow(b.name, b.precision, ds.name, len(x), None, None, None, None,
                                          tol.describe(), False, f"{type(exc).__name__}: {exc}".splitlines()[0]))
                continue
            if got.shape != ref.shape:
                rows.append(ComparisonRow(b.name, b.precision, ds.name, len(x), None, None, None, None,
                                          tol.describe(), False, f"output shape {got.shape} != {ref.shape}"))
                continue
            diff = np.abs(got - ref)
            agree = float((got.argmax(1) == ref.argmax(1)).mean()) if len(x) else float("nan")
            rows.append(ComparisonRow(b.name, b.precision, ds.name, len(x),
                                      float(diff.max()) if diff.size else 0.0,
                                      float(diff.mean()) if diff.size else 0.0, agree,
                                      _accuracy(got, ds.labels), tol.describe(), _passes(diff, ref, agree, tol)))
    return rows


def all_passed(rows: Sequence[ComparisonRow]) -> bool:
    return all(r.passed is not False for r in rows)


# --- helpers -----------------------------------------------------------------------------------

def _passes(diff: np.ndarray, ref: np.ndarray, agreement: float, tol: Tolerance) -> bool:
    ok = True
    if tol.atol is not None:
        ok &= bool(np.all(diff <= tol.atol + tol.rtol * np.abs(ref)))
    if tol.min_agreement is not None:
        ok &= bool(agreement >= tol.min_agreement)
    return ok


def _accuracy(logits: np.ndarray, labels: Optional[np.ndarray]) -> Optional[float]:
    if labels is None or len(labels) == 0:
        return None
    return float((logits.argmax(1) == np.asarray(labels)).mean())

