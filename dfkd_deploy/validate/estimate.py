"""A data-free estimate of the student's real-data agreement with the teacher, with an interval.

Agreement on synthetic probes is not agreement on real data (it has been measured 3x too high
and 0.7x too low). The estimate maps probe statistics from independent sources
(:mod:`dfkd_deploy.validate.probes`) to real agreement with a small linear model, monotone
(non-negative weights) in every agreement feature, fitted on calibration pairs (teacher, student)
whose real agreement was measured (``benchmarks/probe_calibration.py``). The interval is
split-conformal: the half-width is the empirical quantile of the absolute residuals obtained
leave-one-teacher-out, so it says how far the estimate was off on teachers it had not seen.

The fitted model is a small JSON file of coefficients (``estimator.json`` beside this module),
never a pickle.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from dfkd_deploy.core.errors import DataError

DEFAULT_FILE = Path(__file__).with_name("estimator.json")
DEFAULT_FEATURES = ("agree.fresh", "agree.deepinversion", "agree.boundary")
# When the user passes unlabelled natural images (--probe-data), the estimate rests on their
# agreement instead: calibrated apart, on the pairs measured with such images (estimator_user.json).
USER_FILE = Path(__file__).with_name("estimator_user.json")
USER_FEATURES = ("agree.user",)
CONFIDENCE_BINS = ((0.0, 0.5, "low"), (0.5, 0.9, "mid"), (0.9, 1.01, "high"))
NOT_POOLED = ("held_out", "user")   # kept apart: the run's own generator, and data only some users have


# --- probe statistics --------------------------------------------------------------------------

def probe_statistics(teacher_logits: Mapping[str, torch.Tensor],
                     student_logits: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Per-source agreement (``agree.<source>``, ``images.<source>``); over the pooled independent
    sources: agreement (``agree.pooled``), agreement per teacher-confidence bin
    (``agree.conf_low|mid|high``) and the mean teacher-student KL (``kl``)."""
    stats: dict[str, float] = {}
    pooled_t, pooled_s = [], []
    for name, t in teacher_logits.items():
        s = student_logits[name]
        stats[f"images.{name}"] = int(len(t))
        stats[f"agree.{name}"] = _agree(t, s)
        if name not in NOT_POOLED and len(t):
            pooled_t.append(t.float())
            pooled_s.append(s.float())
    if pooled_t:
        t, s = torch.cat(pooled_t), torch.cat(pooled_s)
        stats["agree.pooled"] = _agree(t, s)
        pt = torch.softmax(t, 1)
        kl = (pt * (torch.log_softmax(t, 1) - torch.log_softmax(s, 1))).sum(1)
        stats["kl"] = float(kl.mean())
        stats["exp_neg_kl"] = math.exp(-stats["kl"])   # rises with agreement, as every feature must
        conf = pt.max(1).values
        for lo, hi, name in CONFIDENCE_BINS:
            m = (conf >= lo) & (conf < hi)
            stats[f"agree.conf_{name}"] = _agree(t[m], s[m])
    return stats


def _finite(v):
    return None if v is None or not math.isfinite(float(v)) else float(v)


def _agree(t: torch.Tensor, s: torch.Tensor) -> float:
    if len(t) == 0:
        return float("nan")
    return float((t.argmax(1) == s.argmax(1)).float().mean())


# --- from a teacher and a student to the estimate ----------------------------------------------

def estimate_agreement(teacher, student_logits, synthesis_options, device, *, seed: int, held_out=None,
                       probe_data=None, estimator=None, budget=None, show_progress: bool = True) -> dict:
    """``student_logits`` maps pixels to the student's logits; ``held_out`` is (pixels, teacher
    logits) of the run's own probes, reported beside the others but not used by the estimate.
    Returns flat validate keys: agreement per probe source (``probe_sources``) and, where an estimator
    is available, ``estimated_agreement`` with ``estimated_agreement_low`` / ``_high``."""
    from dfkd_deploy.core.progress import task, warn
    from dfkd_deploy.validate.metrics import predict
    from dfkd_deploy.validate.probes import independent_sources, user_images

    norm = teacher.normalizer().to(device)
    with task("validate: independent probes", 1, show_progress) as bar:
        sources = independent_sources(teacher, synthesis_options, device, seed=seed, budget=budget)
        if probe_data is not None:
            sources.append(user_images(probe_data, teacher.spec, seed=seed))
        bar.advance()
    t_logits = {s.name: predict(teacher.module, s.pixels, normalizer=norm, device=device) for s in sources}
    s_logits = {s.name: student_logits(s.pixels) for s in sources}
    if held_out is not None:
        t_logits["held_out"], s_logits["held_out"] = held_out[1], student_logits(held_out[0])
    stats = probe_statistics(t_logits, s_logits)
    out = {"probe_sources": {name: {"agreement": _finite(stats[f"agree.{name}"]), "images": stats[f"images.{name}"]}
                             for name in t_logits},
           "probe_kl": stats.get("kl")}
    if estimator is None and probe_data is not None and stats.get("images.user"):
        estimator = default_estimator(user=True)   # natural images track real agreement far better
    estimator = estimator if estimator is not None else default_estimator()
    if estimator is None:
        warn("no agreement estimator is installed: the real agreement cannot be estimated")
        return out
    e = estimator.estimate(stats)
    out.update({"estimated_agreement": e.value, "estimated_agreement_low": e.low, "estimated_agreement_high": e.high,
                "estimate_coverage": e.coverage, "estimate_based_on": e.based_on})
    return out


# --- accuracy, from agreement and the teacher's own accuracy ------------------------------------

def estimate_accuracy(teacher_accuracy: float, agreement: float, low: float, high: float,
                      num_classes: int) -> dict:
    """The student's real top-1 from its estimated agreement with the teacher and the teacher's
    own real top-1 (e.g. from its model card).

    Bounds hold whatever the data: with agreement a and teacher accuracy t, the student is right at
    least where it agrees with a right teacher (>= t + a - 1) and at most where it agrees with a
    right teacher or disagrees with a wrong one (<= min(a, t) + min(1 - a, 1 - t)); the interval is
    those bounds over the agreement interval [low, high]. The point value assumes the student's
    agreement does not depend on whether the teacher is right, and that where it disagrees with a
    wrong teacher it picks the true class as often as chance among the K - 1 others:
    a * t + (1 - a) * (1 - t) / (K - 1)."""
    t = min(max(float(teacher_accuracy), 0.0), 1.0)
    lo_a, hi_a = min(max(float(low), 0.0), 1.0), min(max(float(high), 0.0), 1.0)
    a = min(max(float(agreement), lo_a), hi_a)

    def upper(x: float) -> float:
        return min(x, t) + min(1.0 - x, 1.0 - t)

    top = 1.0 if lo_a <= t <= hi_a else max(upper(lo_a), upper(hi_a))
    k = max(int(num_classes), 2)
    high_acc = min(1.0, top)
    low_acc = min(max(0.0, t + lo_a - 1.0), high_acc)         # equal in exact arithmetic at the extremes
    point = min(max(a * t + (1.0 - a) * (1.0 - t) / (k - 1), low_acc), high_acc)   # inside already, but for rounding
    return {"estimated_accuracy": point, "estimated_accuracy_low": low_acc, "estimated_accuracy_high": high_acc,
            "estimated_accuracy_based_on": f"the estimated agreement and the teacher's own top-1 {100 * t:.2f}% "
                                           "(teacher.accuracy)"}


# --- the estimator -----------------------------------------------------------------------------

@dataclass
class Estimate:
    value: float
    low: float
    high: float
    coverage: float                 # the interval's nominal coverage
    features: dict                  # the feature values it was computed from
    based_on: str                   # one line: what the estimate rests on

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Estimator:
    features: list[str]
    coef: list[float]
    intercept: float
    half_width: float               # conformal half-width of the interval
    coverage: float = 0.9
    calibration: dict = field(default_factory=dict)

    # -- use --
    def feature_vector(self, stats: Mapping[str, float]) -> np.ndarray:
        """The features in order; a missing or empty one (a source that yielded no image) falls
        back to the pooled agreement, which every run has."""
        fallback = stats.get("agree.pooled")
        out = []
        for name in self.features:
            transform, _, key = name.rpartition(":")   # "sqrt:agree.pooled": a concave, still monotone, feature
            if transform not in ("", "sqrt"):
                raise DataError(f"unknown feature transform {transform!r} in {name!r}")
            v = stats.get(key)
            if v is None or not math.isfinite(float(v)):
                v = fallback
            if v is None or not math.isfinite(float(v)):
                raise DataError(f"probe statistics lack {name!r} (and the pooled agreement to stand in for it)")
            out.append(math.sqrt(max(0.0, float(v))) if transform == "sqrt" else float(v))
        return np.asarray(out, np.float64)

    def predict(self, stats: Mapping[str, float]) -> float:
        return float(np.clip(self.intercept + self.feature_vector(stats) @ np.asarray(self.coef), 0.0, 1.0))

    def interval(self, stats: Mapping[str, float]) -> tuple[float, float]:
        v = self.predict(stats)
        return max(0.0, v - self.half_width), min(1.0, v + self.half_width)

    def estimate(self, stats: Mapping[str, float]) -> Estimate:
        v = self.predict(stats)
        lo, hi = self.interval(stats)
        cal = self.calibration
        what = ("unlabelled images passed with --probe-data" if list(self.features) == list(USER_FEATURES)
                else "probes the student never trained on")
        based = (f"linear model on {', '.join(self.features)} of {what}; "
                 f"{int(cal.get('pairs', 0))} calibration pairs on {len(cal.get('teachers', []))} teachers; "
                 f"{100 * self.coverage:.0f}% interval from leave-one-teacher-out residuals "
                 f"(+/- {100 * self.half_width:.1f} pts)")
        return Estimate(v, lo, hi, self.coverage, {k: float(x) for k, x in zip(self.features,
                                                                                self.feature_vector(stats))}, based)

    # -- storage --
    def to_json(self) -> dict:
        return {"format": "dfkd-deploy agreement estimator v1", **asdict(self)}

    def save(self, path: str | Path) -> Path:
        from dfkd_deploy.core.io import write_text

        return write_text(path, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def from_json(cls, data: Mapping) -> "Estimator":
        try:
            est = cls(features=list(data["features"]), coef=[float(c) for c in data["coef"]],
                      intercept=float(data["intercept"]), half_width=float(data["half_width"]),
                      coverage=float(data.get("coverage", 0.9)), calibration=dict(data.get("calibration", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"not an agreement estimator: {exc}") from None
        if len(est.coef) != len(est.features):
            raise DataError(f"estimator has {len(est.coef)} coefficients for {len(est.features)} features")
        return est

    @classmethod
    def load(cls, path: str | Path = DEFAULT_FILE) -> "Estimator":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read estimator {path}: {exc}") from None
        return cls.from_json(data)

    # -- fitting --
    @classmethod
    def fit(cls, stats: Sequence[Mapping[str, float]], real: Sequence[float], groups: Sequence[str], *,
            features: Sequence[str] = DEFAULT_FEATURES, coverage: float = 0.9) -> "Estimator":
        """Least squares with non-negative weights (monotone in every agreement) on all pairs; the
        interval's half-width from leave-one-group-out residuals (groups = teachers)."""
        coef, intercept = _fit_linear(stats, real, features)
        residuals = loo_residuals(stats, real, groups, features=features)
        est = cls(list(features), coef, intercept, conformal_half_width(residuals, coverage), coverage)
        est.calibration = {"pairs": len(real), "teachers": sorted(set(groups)),
                           "loto_abs_residuals": [round(float(r), 4) for r in residuals]}
        return est


def _design(stats, features) -> np.ndarray:
    probe = Estimator(list(features), [0.0] * len(features), 0.0, 0.0)
    return np.stack([probe.feature_vector(s) for s in stats])


def _fit_linear(stats, real, features) -> tuple[list[float], float]:
    from scipy.optimize import lsq_linear

    x = _design(stats, features)
    a = np.hstack([x, np.ones((len(x), 1))])
    lb = [0.0] * len(features) + [-np.inf]
    sol = lsq_linear(a, np.asarray(real, np.float64), bounds=(lb, [np.inf] * (len(features) + 1)))
    return [float(c) for c in sol.x[:-1]], float(sol.x[-1])


def loo_residuals(stats, real, groups, *, features=DEFAULT_FEATURES) -> np.ndarray:
    """|prediction - real| for every pair, each predicted by a fit that never saw its group."""
    real = np.asarray(real, np.float64)
    groups = np.asarray(groups)
    out = np.full(len(real), np.nan)
    for g in np.unique(groups):
        test = groups == g
        if test.all():
            raise DataError("leave-one-teacher-out needs at least two teachers")
        coef, b = _fit_linear([s for s, t in zip(stats, test) if not t], real[~test], features)
        pred = np.clip(b + _design([s for s, t in zip(stats, test) if t], features) @ np.asarray(coef), 0, 1)
        out[test] = np.abs(pred - real[test])
    return out


def conformal_half_width(abs_residuals: Sequence[float], coverage: float) -> float:
    """Split-conformal quantile: the ceil((n+1) * coverage)-th smallest residual (all of [0, 1]
    when there are too few residuals for that coverage)."""
    r = np.sort(np.asarray(abs_residuals, np.float64))
    k = math.ceil((len(r) + 1) * coverage)
    return 1.0 if k > len(r) or len(r) == 0 else float(r[k - 1])


def default_estimator(user: bool = False) -> Optional[Estimator]:
    """The estimator shipped with the package (``user``: the one on unlabelled user images), or
    None when it is absent."""
    path = USER_FILE if user else DEFAULT_FILE
    return Estimator.load(path) if path.is_file() else None
