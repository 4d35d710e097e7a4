"""The run report: one nested dict (report.json) and its markdown rendering (report.md).

Every key in :data:`REQUIRED_KEYS` is always present, with ``None`` where a value was not
measured, so consumers (CI checks, dashboards) can rely on the shape without guarding.
Callers pass plain values (a TeacherSpec, dicts of measurements); extra keys in those dicts
are kept as they are.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping, Optional

from torch import nn

from dfkd_deploy.core.io import write_json, write_text
from dfkd_deploy.teachers.spec import TeacherSpec

REPORT_VERSION = 1
REPORT_JSON = "report.json"
REPORT_MD = "report.md"

REQUIRED_KEYS: tuple[str, ...] = (
    "teacher.format", "teacher.input_shape", "teacher.layout", "teacher.num_classes",
    "teacher.bn_layers", "teacher.accuracy",
    "student.arch", "student.params", "student.accuracy",
    "agreement.top1",
    "fidelity.onnx_max_abs_diff", "fidelity.onnx_top1_agreement",
    "synthesis.method", "synthesis.g_steps", "synthesis.images", "synthesis.seconds",
    "distillation.epochs", "distillation.seconds",
)

_MISSING = object()


def _estimate_rows(g) -> list[tuple[str, str]]:
    """The data-free estimate of real agreement and its interval, when the run made one."""
    if g("agreement.estimated_real") is None:
        return []
    lo, hi = g("agreement.interval") or (None, None)
    cov = g("agreement.interval_coverage")
    rows = [("Real data, estimated without it", f"{_pct(g('agreement.estimated_real'))} "
             f"({f'{100 * float(cov):.0f}% ' if cov is not None else ''}interval {_pct(lo)} to {_pct(hi)})")]
    acc = g("agreement.estimated_accuracy")
    if acc:
        lo, hi = acc.get("bounds") or (None, None)
        rows.append(("Student accuracy, estimated without data", f"{_pct(acc.get('value'))} (bounds {_pct(lo)} to "
                     f"{_pct(hi)}; from the teacher's own top-1 and the agreement interval)"))
    for name, src in (g("agreement.probe_sources") or {}).items():
        if name != "held_out":
            rows.append((f"Independent probes: {name}", f"{_pct(src.get('agreement'))} ({_count(src.get('images'))} images)"))
    return rows


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_report(teacher: TeacherSpec, *, student: Optional[Mapping[str, Any]] = None,
                 evaluation: Optional[Mapping[str, Any]] = None,
                 probe_agreement: Optional[Mapping[str, Any]] = None,
                 export: Any = None,
                 synthesis: Optional[Mapping[str, Any]] = None,
                 distillation: Optional[Mapping[str, Any]] = None,
                 extra: Optional[Mapping[str, Any]] = None) -> dict:
    """Assemble the report.

    - ``student``: ``{"arch", "params", ...}`` (see :func:`count_parameters`).
    - ``evaluation``: the dict from :func:`dfkd_deploy.validate.metrics.evaluate` (real data).
    - ``probe_agreement``: ``{"top1": float, "images": int}`` on held-out synthetic probes.
    - ``export``: an ``OnnxExportResult`` or its ``to_dict()``.
    - ``synthesis``: ``{"method", "g_steps", "images", "seconds", ...}``.
    - ``distillation``: ``{"epochs", "seconds", "kd_steps", ...}`` (``kd_steps``: the steps run).
    - ``extra``: further top-level sections, merged in last.

    ``agreement.top1`` is measured on real data when there is any, otherwise on the probes;
    ``agreement.measured_on`` says which, and both numbers are kept separately.
    """
    ev = dict(evaluation or {})
    probes = dict(probe_agreement or {})
    exp = _as_dict(export)

    teacher_section = teacher.to_dict()
    teacher_section["accuracy"] = ev.get("teacher_accuracy")
    teacher_section["top5"] = ev.get("teacher_top5")

    student_section = {"arch": None, "params": None, "accuracy": ev.get("student_accuracy"),
                       "top5": ev.get("student_top5")}
    student_section.update(student or {})
    if "onnx_accuracy" in ev:
        student_section["onnx_accuracy"] = ev["onnx_accuracy"]
        student_section["onnx_top5"] = ev.get("onnx_top5")

    eval_top1, probe_top1 = ev.get("agreement"), probes.get("top1")
    if eval_top1 is not None:
        top1, measured_on = eval_top1, "eval_data"
    elif probe_top1 is not None:
        top1, measured_on = probe_top1, "probes"
    else:
        top1, measured_on = None, None
    agreement = {"top1": top1, "measured_on": measured_on, "eval_data_top1": eval_top1,
                 "probe_top1": probe_top1, "probe_images": probes.get("images")}

    fidelity = {
        "onnx_max_abs_diff": exp.get("max_abs_diff"),
        "onnx_top1_agreement": exp.get("top1_agreement"),
        "onnx_file": Path(exp["path"]).name if exp.get("path") else None,
        "opset": exp.get("opset"),
        "layout": exp.get("layout"),
        "bn_nodes_remaining": exp.get("bn_nodes_remaining"),
        "parity_probes": exp.get("probes"),
        "teacher_converter_max_abs_diff": teacher.converter_max_abs_diff,
    }

    report = {
        "report_version": REPORT_VERSION,
        "teacher": teacher_section,
        "student": student_section,
        "agreement": agreement,
        "fidelity": fidelity,
        "synthesis": _section(("method", "g_steps", "images", "seconds"), synthesis),
        "distillation": _section(("epochs", "seconds", "kd_steps"), distillation),
        "eval_data": ({"source": ev.get("source"), "images": ev.get("images")} if ev else None),
    }
    for key, value in (extra or {}).items():
        if isinstance(value, Mapping) and isinstance(report.get(key), dict):
            report[key].update(value)
        else:
            report[key] = value
    return report


def get_path(report: Mapping[str, Any], dotted: str, default: Any = _MISSING) -> Any:
    """``get_path(r, "teacher.format") == r["teacher"]["format"]``; KeyError names the path."""
    node: Any = report
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if default is not _MISSING:
                return default
            raise KeyError(dotted)
        node = node[part]
    return node


def missing_keys(report: Mapping[str, Any]) -> list[str]:
    """The REQUIRED_KEYS absent from ``report`` (present-but-None counts as present)."""
    missing = []
    for key in REQUIRED_KEYS:
        try:
            get_path(report, key)
        except KeyError:
            missing.append(key)
    return missing


def write_report_json(run_dir: str | Path, report: Mapping[str, Any]) -> Path:
    return write_json(Path(run_dir) / REPORT_JSON, report)


def write_report_md(run_dir: str | Path, report: Mapping[str, Any]) -> Path:
    return write_text(Path(run_dir) / REPORT_MD, render_report_md(report))


def render_report_md(report: Mapping[str, Any]) -> str:
    g = lambda path: get_path(report, path, None)  # noqa: E731 - short local accessor
    shape = g("teacher.input_shape")
    lines = [
        "# dfkd-deploy report",
        "",
        "## Teacher",
        "",
        _table([
            ("Source", _text(g("teacher.source"))),
            ("Format", _text(g("teacher.format"))),
            ("Architecture", _text(g("teacher.arch"))),
            ("Input (C x H x W)", " x ".join(str(v) for v in shape) if shape else "not measured"),
            ("Layout", _text(g("teacher.layout"))),
            ("Classes", _text(g("teacher.num_classes"))),
            ("BatchNorm layers", _text(g("teacher.bn_layers"))),
        ]),
        "",
        "## Student",
        "",
        _table([
            ("Architecture", _text(g("student.arch"))),
            ("Parameters", _count(g("student.params"))),
        ] + _student_rows(g)),
        "",
        *[f"**Warning:** {w}.\n" for w in (g("student.warnings") or [])],
        "## Accuracy",
        "",
    ]
    source = g("eval_data.source")
    if source:
        lines += [f"On `{source}` ({_count(g('eval_data.images'))} images).", ""]
    accuracy_rows = [("Teacher", _pct(g("teacher.accuracy")), _pct(g("teacher.top5"))),
                     ("Student", _pct(g("student.accuracy")), _pct(g("student.top5")))]
    if g("student.onnx_accuracy") is not None:
        accuracy_rows.append(("Student (exported ONNX)", _pct(g("student.onnx_accuracy")),
                              _pct(g("student.onnx_top5"))))
    lines += [_table(accuracy_rows, header=("Model", "Top-1", "Top-5")), ""]

    lines += [
        "## Teacher-student agreement",
        "",
        "Fraction of images on which the student picks the teacher's class.",
        "",
        _table([
            ("On real eval data", _pct(g("agreement.eval_data_top1"))),
            ("On held-out synthetic probes", _pct(g("agreement.probe_top1"))
             + (f" ({_count(g('agreement.probe_images'))} images)" if g("agreement.probe_images") else "")),
        ] + _estimate_rows(g), header=("Measured on", "Top-1 agreement")),
        "",
        "Raw agreement on synthetic probes is not real agreement (it has been measured both far above and far "
        "below it); without real data, judge the student by the estimate and its interval's lower bound.",
        "",
        "## Fidelity",
        "",
        _table([
            ("ONNX file", _text(g("fidelity.onnx_file"))),
            ("ONNX vs torch student, max abs diff", _sci(g("fidelity.onnx_max_abs_diff"))),
            ("ONNX vs torch student, top-1 agreement", _pct(g("fidelity.onnx_top1_agreement"))),
            ("BatchNorm nodes left in ONNX", _text(g("fidelity.bn_nodes_remaining"))),
            ("Teacher converter max abs diff", _sci(g("fidelity.teacher_converter_max_abs_diff"))),
        ] + _int8_rows(g("teacher.int8"))),
        "",
        "## Timings",
        "",
        _table([
            ("Synthesis", f"{_text(g('synthesis.method'))}, g_steps {_text(g('synthesis.g_steps'))}, "
                          f"{_count(g('synthesis.images'))} images, {_secs(g('synthesis.seconds'))}"),
            ("Distillation", f"{_text(g('distillation.epochs'))} epochs, {_secs(g('distillation.seconds'))}"),
        ], header=("Stage", "")),
    ]
    if g("budget.requested_s") is not None:
        lines += ["", "## Budget", "", _table([
            ("Requested", _secs(g("budget.requested_s"))),
            ("Used", _secs(g("budget.used_s"))),
            ("Plan", f"{_text(g('budget.plan.epochs'))} epochs ({_text(g('budget.plan.warmup'))} warm-up), "
                     f"{_count(g('budget.plan.pool_images'))} pool images, "
                     f"{_text(g('budget.plan.kd_steps'))} KD steps per epoch"),
        ])]
    notes = g("teacher.notes")
    if notes:
        lines += ["", "## Assumptions", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _student_rows(g) -> list[tuple[str, str]]:
    """How the student was made and how it compares in size (rows present only when recorded)."""
    rows = []
    if g("student.init"):
        rows.append(("Initialisation", _text(g("student.init"))))
    if g("student.target"):
        met = g("student.target_met")
        rows.append(("Target", f"{g('student.target')} ({'met' if met else 'not met'})"))
    ratio = g("student.size.ratio") or {}
    for key, label in (("params", "Parameters / teacher's"), ("macs", "MACs / teacher's"),
                       ("latency_b1", "Latency batch 1 / teacher's"), ("latency_b32", "Latency batch 32 / teacher's")):
        if ratio.get(key) is not None:
            rows.append((label, f"{ratio[key]:.3f}"))
    return rows


# --- formatting ----------------------------------------------------------------------------------

NOT_MEASURED = "not measured"


def _int8_rows(int8) -> list:
    """An int8 teacher's parity is top-1 agreement with onnxruntime on the int8 file, not a max abs diff."""
    if not int8:
        return []
    return [("Teacher int8 file", f"{int8.get('format')}, {'per-channel' if int8.get('per_channel') else 'per-tensor'} "
                                  f"weights, surrogate activations {int8.get('activations')}"),
            ("Teacher vs onnxruntime on the int8 file, top-1 agreement",
             f"{_pct(int8.get('agreement_probes'))} on random probes, {_pct(int8.get('agreement_smooth'))} on smooth "
             f"images ({_text(int8.get('images'))} each)")]


def _table(rows, header=("Item", "Value")) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _text(v) -> str:
    return NOT_MEASURED if _missing(v) else str(v)


def _pct(v) -> str:
    return NOT_MEASURED if _missing(v) else f"{100 * float(v):.2f} %"


def _sci(v) -> str:
    return NOT_MEASURED if _missing(v) else f"{float(v):.2e}"


def _count(v) -> str:
    return NOT_MEASURED if _missing(v) else f"{int(v):,}"


def _secs(v) -> str:
    if _missing(v):
        return NOT_MEASURED
    v = float(v)
    return f"{v:.1f} s" if v < 120 else f"{v / 60:.1f} min"


def _section(required: tuple[str, ...], given: Optional[Mapping[str, Any]]) -> dict:
    out: dict[str, Any] = {k: None for k in required}
    out.update(given or {})
    return out


def _as_dict(export: Any) -> dict:
    if export is None:
        return {}
    if hasattr(export, "to_dict"):
        return export.to_dict()
    if dataclasses.is_dataclass(export):
        return dataclasses.asdict(export)
    return dict(export)
