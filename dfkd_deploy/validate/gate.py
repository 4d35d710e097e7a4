"""CI gate: judge a student's validation metrics against thresholds, and say so in JUnit XML.

The metrics come from :func:`dfkd_deploy.stages.validate` (flat keys: ``probe_agreement``,
``eval_agreement``, ``estimated_agreement`` (+ ``_low`` / ``_high``), ``student_accuracy``, ...).
Without real data, ``--min-agreement`` is held against the lower bound of the estimate's interval. Thresholds are fractions in [0, 1]; drops
against a baseline are in percentage points. Exit codes (applied by the CLI): 0 every
threshold holds, 1 one or more fail, 2 the inputs are unusable (raised as DfkdError).
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from dfkd_deploy.core.errors import DataError, UsageError
from dfkd_deploy.core.io import write_bytes

SUITE = "dfkd-deploy validate"


@dataclass
class Check:
    name: str                 # the threshold, e.g. "min_agreement"
    metric: str               # what was measured, e.g. "eval_agreement"
    value: Optional[float]
    threshold: float
    passed: bool
    message: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def check_options(*, eval_data, min_accuracy, baseline, max_drop, teacher_accuracy=None) -> None:
    """Usage errors caught before anything is computed (exit 2 fast, not after a validation run)."""
    if min_accuracy is not None and eval_data is None and teacher_accuracy is None:
        raise UsageError("--min-accuracy needs --eval-data (accuracy measured on real labelled data), or the "
                         "teacher's own accuracy (--teacher-accuracy / teacher.accuracy) to gate on the lower bound "
                         "of the data-free estimate")
    if (baseline is None) != (max_drop is None):
        raise UsageError("--baseline and --max-drop go together: the drop allowed against the baseline, in points")
    if baseline is not None and not Path(baseline).is_file():
        raise DataError(f"baseline report not found: {baseline}")


def agreement_of(metrics: Mapping[str, Any]) -> tuple[str, Optional[float]]:
    """Agreement measured on real data when there is any, else the data-free estimate of it, else
    agreement on synthetic probes (for like-for-like baseline comparisons)."""
    for key in ("eval_agreement", "estimated_agreement"):
        if metrics.get(key) is not None:
            return key, metrics[key]
    return "probe_agreement", metrics.get("probe_agreement")


def gated_agreement(metrics: Mapping[str, Any]) -> tuple[str, Optional[float]]:
    """What ``--min-agreement`` is held against: real agreement when there is eval data, else the
    LOWER bound of the estimate's interval (raw probe agreement is not real agreement: it is never
    gated on)."""
    if metrics.get("eval_agreement") is not None:
        return "eval_agreement", metrics["eval_agreement"]
    return "estimated_agreement_low", metrics.get("estimated_agreement_low")


def load_baseline(path: str | Path) -> dict:
    """Baseline figures from a report.json (nested) or a saved `validate --json` output (flat)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read baseline {path}: {exc}") from None
    if not isinstance(data, dict):
        raise DataError(f"baseline {path} is not a JSON object")
    if "agreement" in data and isinstance(data["agreement"], dict):   # report.json
        return {"student_accuracy": (data.get("student") or {}).get("accuracy"),
                "eval_agreement": data["agreement"].get("eval_data_top1"),
                "estimated_agreement": data["agreement"].get("estimated_real"),
                "probe_agreement": data["agreement"].get("probe_top1")}
    keys = ("student_accuracy", "eval_agreement", "estimated_agreement", "probe_agreement")
    if not any(k in data for k in keys):
        raise DataError(f"baseline {path} is neither a report.json nor `dfkd-deploy validate --json` output")
    return {k: data.get(k) for k in keys}


def run_gate(metrics: Mapping[str, Any], *, min_agreement: Optional[float] = None,
             min_accuracy: Optional[float] = None, baseline: Optional[Mapping[str, Any]] = None,
             max_drop: Optional[float] = None) -> list[Check]:
    """One Check per threshold given (none given: no checks, the gate passes)."""
    checks: list[Check] = []
    if min_agreement is not None:
        metric, value = gated_agreement(metrics)
        check = _at_least("min_agreement", metric, value, min_agreement)
        if metric == "estimated_agreement_low" and value is not None:
            check.message += (f" (estimate {_pct(metrics.get('estimated_agreement'))}, interval "
                              f"{_pct(value)}..{_pct(metrics.get('estimated_agreement_high'))})")
        checks.append(check)
    if min_accuracy is not None:
        if metrics.get("student_accuracy") is None and metrics.get("estimated_accuracy_low") is not None:
            check = _at_least("min_accuracy", "estimated_accuracy_low", metrics["estimated_accuracy_low"], min_accuracy)
            check.message += (f" (estimate {_pct(metrics.get('estimated_accuracy'))}, interval "
                              f"{_pct(metrics['estimated_accuracy_low'])}..{_pct(metrics.get('estimated_accuracy_high'))})")
            checks.append(check)
        else:
            checks.append(_at_least("min_accuracy", "student_accuracy", metrics.get("student_accuracy"), min_accuracy))
    if baseline is not None and max_drop is not None:
        metric, _ = agreement_of(metrics)   # compare like with like: same data source as now
        compared = 0
        for key in ("student_accuracy", metric):
            new, old = metrics.get(key), baseline.get(key)
            if new is None or old is None:
                continue
            compared += 1
            drop = 100.0 * (float(old) - float(new))
            ok = drop <= max_drop
            checks.append(Check(f"max_drop.{key}", key, new, max_drop, ok,
                                f"{key} {_pct(new)} vs baseline {_pct(old)}: drop {drop:.2f} pts "
                                + (f"<= {max_drop:g} pts" if ok else f"> {max_drop:g} pts by {drop - max_drop:.2f} pts")))
        if not compared:
            raise DataError("the baseline has no figure measured like this run's (accuracy or agreement on the "
                            "same kind of data); pass --eval-data if the baseline was measured on real data")
    return checks


def write_junit(path: str | Path, checks: Sequence[Check], *, metrics: Optional[Mapping[str, Any]] = None,
                error: Optional[str] = None) -> Path:
    """JUnit XML: one testcase per threshold; ``error`` (an input problem) becomes one errored case."""
    failures = sum(1 for c in checks if not c.passed)
    suites = ET.Element("testsuites")
    suite = ET.SubElement(suites, "testsuite", name=SUITE, tests=str(len(checks) + (1 if error else 0)),
                          failures=str(failures), errors=str(1 if error else 0), skipped="0")
    if metrics:
        props = ET.SubElement(suite, "properties")
        for k, v in metrics.items():
            ET.SubElement(props, "property", name=str(k), value=json.dumps(v))
        if metrics.get("estimated_agreement") is not None:   # the estimate and its interval, by name
            ET.SubElement(props, "property", name="estimated_agreement.interval",
                          value=json.dumps([metrics.get("estimated_agreement_low"),
                                            metrics.get("estimated_agreement_high")]))
        if metrics.get("estimated_accuracy") is not None:
            ET.SubElement(props, "property", name="estimated_accuracy.interval",
                          value=json.dumps([metrics.get("estimated_accuracy_low"),
                                            metrics.get("estimated_accuracy_high")]))
    for c in checks:
        case = ET.SubElement(suite, "testcase", classname="dfkd_deploy.validate.gate", name=c.name)
        if not c.passed:
            ET.SubElement(case, "failure", message=c.message, type="ThresholdFailed").text = json.dumps(c.to_dict())
        else:
            ET.SubElement(case, "system-out").text = c.message
    if error:
        case = ET.SubElement(suite, "testcase", classname="dfkd_deploy.validate.gate", name="inputs")
        ET.SubElement(case, "error", message=error, type="InputError")
    ET.indent(suites)
    return write_bytes(path, ET.tostring(suites, encoding="utf-8", xml_declaration=True) + b"\n")


# --- helpers -----------------------------------------------------------------------------------

def _at_least(name: str, metric: str, value: Optional[float], threshold: float) -> Check:
    if value is None:
        return Check(name, metric, None, threshold, False, f"{metric} was not measured (threshold {_pct(threshold)})")
    ok = float(value) >= threshold
    gap = 100.0 * (threshold - float(value))
    return Check(name, metric, float(value), threshold, ok,
                 f"{metric} {_pct(value)} " + (f">= {_pct(threshold)}" if ok
                                               else f"< {_pct(threshold)} by {gap:.2f} pts"))


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * float(v):.2f}%"
