"""Which images every accuracy and agreement in a report was measured on.

:func:`label_measurements` adds ``*_measured_on`` strings ("eval data: 1,797 images",
"synthetic probes: 512") beside each figure of a report dict, from what the dict itself records
(``eval_data``, ``agreement.probe_images``, the back-end comparison's rows), and
:func:`measured_on_markdown` lists them for report.md. Pure dict work: nothing is measured here.
"""
from __future__ import annotations

from typing import Any, Mapping, MutableMapping, Optional

EVAL_SEED = 0   # EvalData.subset's default: the subset every figure of a run is measured on


def eval_label(images: Optional[int], available: Optional[int] = None) -> Optional[str]:
    if not images:
        return None
    if available and available > images:
        return f"eval data: {images:,} of {available:,} images, drawn at random (seed {EVAL_SEED})"
    return f"eval data: {images:,} images"


def probe_label(images: Optional[int]) -> Optional[str]:
    return f"synthetic probes: {images:,} (held out)" if images else None


def label_measurements(report: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Add the ``*_measured_on`` keys in place (and return the report)."""
    ev = report.get("eval_data") or {}
    on_eval = eval_label(ev.get("images"), ev.get("available"))
    agreement = report.get("agreement") or {}
    on_probes = probe_label(agreement.get("probe_images"))
    for section in ("teacher", "student"):
        if isinstance(report.get(section), dict) and report[section].get("accuracy") is not None:
            report[section]["accuracy_measured_on"] = on_eval
    student = report.get("student") or {}
    if student.get("onnx_accuracy") is not None:
        student["onnx_accuracy_measured_on"] = on_eval
    if agreement:
        agreement["eval_data_measured_on"] = on_eval if agreement.get("eval_data_top1") is not None else None
        agreement["probe_measured_on"] = on_probes if agreement.get("probe_top1") is not None else None
        agreement["top1_measured_on"] = (agreement["eval_data_measured_on"] if agreement.get("measured_on") == "eval_data"
                                         else agreement["probe_measured_on"])
    int8 = report.get("int8")
    if isinstance(int8, dict) and not int8.get("error"):
        int8["top1_agreement_vs_fp32_measured_on"] = probe_label(int8.get("probe_images"))
        if int8.get("accuracy") is not None:
            int8["accuracy_measured_on"] = _int8_accuracy_set(report, on_eval)
    return report


def _int8_accuracy_set(report: Mapping[str, Any], on_eval: Optional[str]) -> Optional[str]:
    """The comparison's eval-data row for ONNX Runtime int8 says how many images it ran on."""
    rows = (report.get("comparison") or {}).get("rows") or []
    for r in rows:
        if r.get("backend") == "onnxruntime" and r.get("precision") == "int8" and r.get("accuracy") is not None:
            ev = report.get("eval_data") or {}
            return eval_label(r.get("images"), ev.get("available")) if r.get("images") != ev.get("images") else on_eval
    return on_eval


_FIGURES = (
    ("teacher.accuracy", "Teacher accuracy", "teacher.accuracy_measured_on"),
    ("student.accuracy", "Student accuracy (torch)", "student.accuracy_measured_on"),
    ("student.onnx_accuracy", "Student accuracy (ONNX Runtime fp32)", "student.onnx_accuracy_measured_on"),
    ("int8.accuracy", "Student accuracy (ONNX Runtime int8)", "int8.accuracy_measured_on"),
    ("agreement.eval_data_top1", "Teacher-student agreement", "agreement.eval_data_measured_on"),
    ("agreement.probe_top1", "Teacher-student agreement", "agreement.probe_measured_on"),
    ("int8.top1_agreement_vs_fp32", "int8 vs fp32 agreement", "int8.top1_agreement_vs_fp32_measured_on"),
)


def _get(report: Mapping[str, Any], dotted: str) -> Any:
    node: Any = report
    for part in dotted.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def measured_figures(report: Mapping[str, Any]) -> list[tuple[str, float, str]]:
    """(label, value, measured on) for every figure the report holds, in a fixed order."""
    out = []
    for path, label, where in _FIGURES:
        value = _get(report, path)
        if value is not None:
            out.append((label, float(value), _get(report, where) or "not recorded"))
    return out


def measured_on_markdown(report: Mapping[str, Any]) -> str:
    rows = measured_figures(report)
    if not rows:
        return ""
    lines = ["", "## What each figure was measured on", "", "| Figure | Value | Measured on |", "|---|---|---|"]
    lines += [f"| {label} | {100 * v:.2f} % | {where} |" for label, v, where in rows]
    return "\n".join(lines) + "\n"
