"""report.html: the run as a page people look at, one self-contained file.

Rendered only from what the run directory already holds: report.json's dict, metrics.jsonl (per
epoch) and report_gallery.npz (pool images and probes labelled by the teacher). Every image is an
inline base64 PNG and the styles are inline, so the page needs no network and opens the same on a
laptop and in a CI artifact viewer.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from dfkd_deploy.core.io import write_text
from dfkd_deploy.validate.gallery import GALLERY_FILE
from dfkd_deploy.distill.metrics_log import METRICS_JSONL, read_metrics
from dfkd_deploy.report import figures
from dfkd_deploy.report.provenance import measured_figures

REPORT_HTML = "report.html"

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;
color:#1d2330;padding:0 16px;line-height:1.4}
h1{font-size:1.6em;margin-bottom:0}h2{margin-top:1.8em;border-bottom:1px solid #d6dae3;padding-bottom:4px}
.sub{color:#5b6475;margin-top:4px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #d6dae3;padding:4px 10px;text-align:left;
vertical-align:middle;font-size:0.92em}th{background:#f2f4f8}td.num{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:14px 0}
.card{border:1px solid #d6dae3;border-radius:6px;padding:10px 14px;min-width:170px;background:#fafbfd}
.card .v{font-size:1.5em;font-weight:600}.card .k{color:#5b6475;font-size:0.85em}
img{image-rendering:pixelated;max-width:100%}.plot{image-rendering:auto}
.ok{color:#1a7f37}.bad{color:#c62828}.note{color:#5b6475;font-size:0.9em}
"""


# --- small helpers --------------------------------------------------------------------------------

def _e(v: Any) -> str:
    return html.escape("-" if v is None else str(v))


def _pct(v) -> str:
    return "-" if v is None else f"{100 * float(v):.2f} %"


def _num(v, fmt: str = "{:,}") -> str:
    return "-" if v is None else fmt.format(v)


def _img(png: bytes, alt: str, cls: str = "") -> str:
    data = base64.b64encode(png).decode("ascii")
    klass = f' class="{cls}"' if cls else ""
    return f'<img{klass} alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _get(d: Mapping, *path, default=None):
    for p in path:
        if not isinstance(d, Mapping) or p not in d:
            return default
        d = d[p]
    return d


def _class_names(report: Mapping) -> Optional[list[str]]:
    return _get(report, "confusion", "class_names") or _get(report, "classes", "names")


def _load_gallery(run_dir: Path) -> Optional[dict]:
    path = run_dir / GALLERY_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


# --- sections -------------------------------------------------------------------------------------

def _headline(report: Mapping) -> str:
    cards = [(label, _pct(v), where) for label, v, where in measured_figures(report)]
    size = report.get("size") or {}
    if size.get("param_ratio"):
        cards.append(("Parameters, teacher / student", f"{size['param_ratio']:.1f}x",
                      f"{_num(size.get('teacher_params'))} vs {_num(size.get('student_params'))}"))
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{_e(v)}</div><div class="note">{_e(w)}</div></div>'
        for k, v, w in cards) + "</div>"


def _gallery(report: Mapping, gallery: Optional[dict]) -> str:
    out = ["<h2>What the teacher made</h2>"]
    if gallery is None or not len(gallery.get("pool_labels", [])):
        return out[0] + '<p class="note">No synthesized images to show (no pool in this run directory).</p>'
    labels = gallery["pool_labels"]
    out.append(f'<p class="sub">Synthesized pool images ({_num(int(gallery["pool_total"]))} in the pool; '
               f'{len(labels)} drawn at random), grouped by the class the teacher assigns them (its argmax).</p>')
    out.append(_by_class(report, gallery["pool_images"], labels, "pool images"))
    probes = gallery.get("probe_images")
    if probes is not None and len(probes):
        out.append(f'<h3>Held-out probes</h3><p class="sub">{len(probes)} of the '
                   f'{_num(int(gallery["probes_total"]))} held-out synthetic probes (never trained on), by the '
                   "teacher's class.</p>")
        out.append(_by_class(report, probes, gallery["probe_labels"], "probes"))
    return "".join(out)


def _by_class(report: Mapping, images: np.ndarray, labels: np.ndarray, what: str) -> str:
    """A table row of images per class the teacher assigned, and a line naming the classes it never did."""
    order = _get(report, "teacher", "channel_order", default="RGB")
    names = _class_names(report)
    name = lambda c: names[c] if names and c < len(names) else f"class {c}"  # noqa: E731
    rows = []
    for c in sorted(set(int(v) for v in labels)):
        sel = images[labels == c]
        rows.append((_e(name(c)), str(len(sel)),
                     _img(figures.image_strip_png(sel[:figures.STRIP_MAX], order), f"{what}, {name(c)}")))
    out = _table(("Teacher's class", "Shown", "Images"), rows, numeric=(1,))
    k = _get(report, "teacher", "num_classes") or 0
    absent = [name(c) for c in range(k) if c not in set(int(v) for v in labels)]
    if absent and k <= 50:
        out += f'<p class="note">No {what} drawn here were of: {_e(", ".join(absent))}.</p>'
    return out


def _curves(rows: list[dict]) -> str:
    out = ["<h2>Training, epoch by epoch</h2>"]
    png = figures.curves_png(rows)
    if png is None:
        return out[0] + f'<p class="note">No per-epoch figures ({METRICS_JSONL} is absent or empty).</p>'
    out.append(f'<p class="sub">From {METRICS_JSONL} ({len(rows)} epochs).</p>')
    out.append(_img(png, "per-epoch curves", "plot"))
    return "".join(out)


def _confusion(report: Mapping) -> str:
    conf = report.get("confusion")
    if not conf:
        return ""
    out = ["<h2>Teacher vs student on the eval data</h2>",
           f'<p class="sub">Measured on {_e(conf.get("measured_on"))}. Rows: the teacher\'s class, columns: the '
           "student's; off-diagonal cells are where the student disagrees with the teacher.</p>"]
    if conf.get("matrix") is None:
        return "".join(out) + f'<p class="note">{_e(conf.get("reason"))}</p>'
    out.append(_img(figures.confusion_png(conf["matrix"], conf.get("class_names")), "confusion", "plot"))
    return "".join(out)


def _comparison(report: Mapping) -> str:
    comp = report.get("comparison") or {}
    rows = comp.get("rows") or []
    if not rows:
        return ""

    def verdict(r):
        if r.get("error"):
            return f'<span class="bad">failed: {_e(r["error"])}</span>'
        if r.get("passed") is None:
            return "reference"
        return '<span class="ok">pass</span>' if r["passed"] else '<span class="bad">FAIL</span>'

    body = [(_e(f"{r.get('backend')} {r.get('precision')}"), _e(r.get("data")), _num(r.get("images")),
             _num(r.get("max_abs_diff"), "{:.2e}"), _pct(r.get("top1_agreement")), _pct(r.get("accuracy")),
             _e(r.get("criterion")), verdict(r)) for r in rows]
    return ("<h2>Back-end comparison</h2>"
            f'<p class="sub">Every back end against the {_e(comp.get("reference"))}, on the same inputs.</p>'
            + _table(("Back end", "Data", "Images", "Max abs diff", "Top-1 agreement", "Accuracy", "Criterion",
                      "Verdict"), body, numeric=(2, 3, 4, 5)))


def _latency(report: Mapping) -> str:
    lat, size = report.get("latency") or {}, report.get("size") or {}
    if not lat and not size:
        return ""
    batches = list(lat.get("batches") or [])
    rows = []
    for key, label, params, nbytes in (("teacher", "Teacher", "teacher_params", "teacher_bytes"),
                                       ("student", "Student fp32", "student_params", "student_bytes"),
                                       ("student_int8", "Student int8", None, "student_int8_bytes")):
        times = lat.get(key) or {}
        if not times and not size.get(nbytes):
            continue
        rows.append([label, _num(size.get(params)) if params else "-", _bytes(size.get(nbytes))]
                    + [_num(times.get(f"batch_{b}_ms"), "{:.3f}") for b in batches])
    out = ["<h2>Latency and size against the teacher</h2>",
           f'<p class="sub">Median of {_e(lat.get("repeats"))} runs after {_e(lat.get("warmup"))} warm-up, '
           f'{_e(lat.get("provider"))}.</p>',
           _table(["Model", "Parameters", "File size"] + [f"batch {b} (ms)" for b in batches], rows,
                  numeric=tuple(range(1, 3 + len(batches))))]
    if lat.get("teacher_reason"):
        out.append(f'<p class="note">Teacher latency: {_e(lat["teacher_reason"])}</p>')
    png = figures.latency_png(lat)
    if png is not None:
        out.append(_img(png, "latency", "plot"))
    return "".join(out)


def _bytes(v) -> str:
    if v is None:
        return "-"
    return f"{v / 1e6:.2f} MB" if v >= 1e6 else f"{v / 1e3:.1f} kB"


def _int8(report: Mapping) -> str:
    int8 = report.get("int8") or {}
    if not int8:
        return ""
    if int8.get("error"):
        return f'<h2>INT8</h2><p class="bad">Not produced: {_e(int8["error"])}</p>'
    rows = [("File", _e(int8.get("file"))), ("Format", _e(int8.get("format"))),
            ("Q/DQ nodes", _num(int8.get("qdq_nodes"))),
            ("Calibration", f"{_num(int8.get('calibration_images'))} synthetic pool images "
                            f"({_e(int8.get('calibration_method'))})"),
            ("Top-1 agreement with fp32", f"{_pct(int8.get('top1_agreement_vs_fp32'))} "
                                          f"({_e(int8.get('top1_agreement_vs_fp32_measured_on'))})"),
            ("Max abs diff vs fp32", _num(int8.get("max_abs_diff_vs_fp32"), "{:.3g}"))]
    if int8.get("accuracy") is not None:
        rows.append(("Accuracy", f"{_pct(int8['accuracy'])} ({_e(int8.get('accuracy_measured_on'))})"))
    return "<h2>INT8 (ONNX Runtime, data-free calibration)</h2>" + _table(("Item", "Value"), rows)


def _assumptions(report: Mapping) -> str:
    t = report.get("teacher") or {}
    sources = t.get("sources") or {}
    out = ["<h2>What was assumed about the teacher</h2>",
           _table(("Convention", "Value", "Where it came from"),
                  [(_e(k), _e(_convention_value(t, k)), _e(v)) for k, v in sources.items()])]
    notes = t.get("notes") or []
    if notes:
        out.append("<ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    return "".join(out)


def _convention_value(t: Mapping, key: str) -> str:
    if key == "normalisation":
        return "none" if t.get("mean") is None and t.get("std") is None else f"mean {t.get('mean')} std {t.get('std')}"
    if key == "bn_statistics":
        return f"{t.get('bn_layers') or 0} BN layers"
    if key == "value_range":
        return f"[0, {t.get('value_range')}]"
    return str(t.get(key, "-"))


# --- the page -------------------------------------------------------------------------------------

def render_report_html(report: Mapping[str, Any], metrics_rows: list[dict], gallery: Optional[dict]) -> str:
    t, s = report.get("teacher") or {}, report.get("student") or {}
    title = f"dfkd-deploy: {Path(str(t.get('source') or 'teacher')).name} -> {s.get('arch') or 'student'}"
    shape = " x ".join(str(v) for v in t.get("input_shape") or [])
    colour = f"{t.get('channel_order')}, " if (t.get("input_shape") or [0])[0] == 3 else ""
    sub = (f"Teacher {_e(Path(str(t.get('source'))).name)} ({_e(t.get('format'))}, {_e(shape)} {_e(t.get('layout'))}, "
           f"{_e(colour)}{_e(t.get('num_classes'))} classes); student {_e(s.get('arch'))}, "
           f"{_num(s.get('params'))} parameters; seed {_e(report.get('seed'))}, "
           f"{_e(_get(report, 'synthesis', 'images'))} synthesized images.")
    body = [f"<h1>{_e(title)}</h1>", f'<p class="sub">{sub}</p>', _headline(report), _gallery(report, gallery),
            _curves(metrics_rows), _confusion(report), _comparison(report), _int8(report), _latency(report),
            _assumptions(report)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>"
            + "\n".join(b for b in body if b) + "</body></html>\n")


def write_report_html(run_dir: str | Path, report: Mapping[str, Any]) -> Path:
    run_dir = Path(run_dir)
    page = render_report_html(report, read_metrics(run_dir / METRICS_JSONL), _load_gallery(run_dir))
    return write_text(run_dir / REPORT_HTML, page)
