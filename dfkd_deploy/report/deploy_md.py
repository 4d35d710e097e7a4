"""report.md sections of the hand-off stage (int8, back-end comparison, latency and size,
TensorRT, bundle), rendered from the report.json sections that
:meth:`dfkd_deploy.deploy.results.DeployResult.sections` returns; the comparison table also goes
into the bundle README."""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

DEFAULT_BATCHES = (1, 32)


def deploy_report_md(sections: Mapping[str, Any]) -> str:
    """The deployment sections appended to report.md."""
    lines = _int8_lines(sections.get("int8") or {})
    rows = (sections.get("comparison") or {}).get("rows") or []
    if rows:
        lines += ["", "## Back-end comparison", "", "Every back end against the torch student.", "",
                  comparison_markdown(rows)]
    if sections.get("latency"):
        lines += ["", "## Latency and size", "", latency_markdown(sections["latency"], sections.get("size") or {})]
    lines += _tensorrt_lines(sections.get("tensorrt") or {})
    b = sections.get("bundle") or {}
    if b.get("path"):
        lines += ["", "## Deployment bundle", "", f"`{b['path']}` ({len(b.get('files') or [])} files); "
                  "check it with `dfkd-deploy bundle verify`."]
    return "\n".join(lines) + "\n"


def comparison_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The back-end comparison (rows as in report.json) as a markdown table."""
    out = ["| Back end | Precision | Data | Images | Max abs diff | Top-1 agreement | Accuracy | Criterion | Result |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        result = "reference" if r["criterion"] == "reference" else ("pass" if r["passed"] else "FAIL")
        if r.get("error"):
            result += f" ({r['error']})"
        out.append(f"| {r['backend']} | {r['precision']} | {r['data']} | {r['images']} | {_sci(r['max_abs_diff'])} | "
                   f"{_pct(r['top1_agreement'])} | {_pct(r['accuracy'])} | {r['criterion']} | {result} |")
    return "\n".join(out)


def latency_markdown(latency: Mapping[str, Any], size: Mapping[str, Any]) -> str:
    """One row per model, one column per batch size."""
    batches = latency.get("batches") or list(DEFAULT_BATCHES)
    head = "| Model | Parameters | File size | " + " | ".join(f"batch {b} (ms)" for b in batches) + " |"
    lines = [f"CPU (ONNX Runtime; edge runtimes where installed), median of {latency.get('repeats')} runs after {latency.get('warmup')} warm-up runs.",
             "", head, "|" + "---|" * (3 + len(batches))]

    def row(label, timings, params, nbytes):
        cells = [_ms((timings or {}).get(f"batch_{b}_ms")) for b in batches]
        return f"| {label} | {_int(params)} | {_bytes(nbytes)} | " + " | ".join(cells) + " |"

    lines.append(row("Teacher", latency.get("teacher"), size.get("teacher_params"), size.get("teacher_bytes")))
    lines.append(row("Student (fp32)", latency.get("student"), size.get("student_params"), size.get("student_bytes")))
    if latency.get("student_int8"):
        lines.append(row("Student (int8)", latency["student_int8"], size.get("student_params"),
                         size.get("student_int8_bytes")))
    for b in latency.get("backends") or []:
        lines.append(row(f"Student, {b['backend']} {b['precision']} (`{b.get('file')}`)", b,
                         size.get("student_params"), b.get("bytes")))
    lines += no_int8_speed_lines(latency)
    if latency.get("teacher_reason"):
        lines += ["", f"Teacher not timed: {latency['teacher_reason']}"]
    elif latency.get("teacher_source") == "exported":
        lines += ["", "The teacher was exported to a temporary ONNX file for timing."]
    return "\n".join(lines)


def no_int8_speed_lines(latency: Mapping[str, Any]) -> list[str]:
    """One line per back end whose int8 model is not faster than its fp32 model, per batch size."""
    batches = latency.get("batches") or list(DEFAULT_BATCHES)
    pairs = {"onnxruntime": (latency.get("student"), latency.get("student_int8"))}
    for b in latency.get("backends") or []:
        fp32, int8 = pairs.get(b["backend"], (None, None))
        pairs[b["backend"]] = (b if b["precision"] == "fp32" else fp32, b if b["precision"] == "int8" else int8)
    lines = []
    for backend, (fp32, int8) in pairs.items():
        slow = [f"batch {n}: int8 {int8[f'batch_{n}_ms']:.3f} ms vs fp32 {fp32[f'batch_{n}_ms']:.3f} ms"
                for n in batches if fp32 and int8 and fp32.get(f"batch_{n}_ms") and int8.get(f"batch_{n}_ms")
                and int8[f"batch_{n}_ms"] >= fp32[f"batch_{n}_ms"]]
        if slow:
            lines.append(f"- {backend}: INT8 brings no speed on this machine ({'; '.join(slow)}).")
    return ["", *lines] if lines else []


def _int8_lines(int8: Mapping[str, Any]) -> list[str]:
    lines = ["", "## INT8 (ONNX Runtime, data-free calibration)", ""]
    if int8.get("error"):
        lines.append(f"Not produced: {int8['error']}")
    elif int8:
        lines.append(f"`{int8.get('file')}`: {int8.get('format')}, {int8.get('qdq_nodes')} Q/DQ nodes, calibrated on "
                     f"{int8.get('calibration_images')} synthetic pool images ({int8.get('calibration_method')}); "
                     f"top-1 agreement with fp32 on {int8.get('probe_images')} held-out probes "
                     f"{_pct(int8.get('top1_agreement_vs_fp32'))}"
                     + (f", accuracy {_pct(int8['accuracy'])}" if int8.get("accuracy") is not None else "") + ".")
    return lines


def _tensorrt_lines(trt: Mapping[str, Any]) -> list[str]:
    if not trt:
        return []
    return ["", "## TensorRT", "", f"TensorRT {trt.get('version')} on {trt.get('gpu')}." if trt.get("available")
            else (trt.get("message") or "TensorRT not available.")]


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _pct(v) -> str:
    return "-" if _missing(v) else f"{100 * float(v):.2f} %"


def _sci(v) -> str:
    return "-" if v is None else f"{v:.2e}"


def _ms(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _int(v) -> str:
    return "-" if v is None else f"{int(v):,}"


def _bytes(v) -> str:
    if v is None:
        return "-"
    return f"{v / 1e6:.2f} MB" if v >= 1e6 else f"{v / 1e3:.1f} kB"
