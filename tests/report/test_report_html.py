"""report.html: self-contained, every section there, and as a real browser shows it."""
from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from dfkd_deploy.distill.metrics_log import read_metrics
from dfkd_deploy.report.figures import image_strip_png
from dfkd_deploy.report.html import REPORT_HTML, render_report_html

from .browser import check_page, find_chromium, screenshot

SECTIONS = ("What the teacher made", "Held-out probes", "Training, epoch by epoch", "Teacher vs student on the eval data",
            "Back-end comparison", "INT8 (ONNX Runtime, data-free calibration)", "Latency and size against the teacher", "What was assumed about the teacher")


def _page(report_run) -> str:
    return (report_run.run_dir / REPORT_HTML).read_text(encoding="utf-8")


def test_report_html_is_self_contained_with_every_section(report_run):
    page = _page(report_run)
    for title in SECTIONS:
        assert f">{title}<" in page, title
    sources = re.findall(r'<img[^>]* src="([^"]+)"', page)
    assert len(sources) >= 5   # class strips, probes, curves, confusion, latency
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as img:
            assert img.format == "PNG" and img.width > 0 and img.height > 0
    # nothing fetched from anywhere: no external scripts, styles, fonts or images
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "url(" not in page and "@import" not in page


def test_report_html_shows_the_runs_figures(report_run):
    page, report = _page(report_run), report_run.report
    assert f"{100 * report['student']['accuracy']:.2f} %" in page
    assert report["student"]["accuracy_measured_on"] in page
    for note in report["teacher"]["notes"]:
        assert note in page
    assert report["teacher"]["sources"]["channel_order"] in page


def test_rendering_without_metrics_or_gallery_says_so():
    page = render_report_html({"teacher": {"source": "t.onnx", "input_shape": [3, 8, 8]}, "student": {}}, [], None)
    assert "No synthesized images to show" in page and "No per-epoch figures" in page
    assert "<img" not in page


def test_strips_show_bgr_images_in_rgb_and_scale_small_ones():
    img = np.zeros((1, 3, 4, 4), np.uint8)
    img[0, 0] = 255   # channel 0 set: blue in BGR order, red in RGB order
    with Image.open(io.BytesIO(image_strip_png(img, "BGR"))) as bgr, \
            Image.open(io.BytesIO(image_strip_png(img, "RGB"))) as rgb:
        assert bgr.getpixel((0, 0)) == (0, 0, 255) and rgb.getpixel((0, 0)) == (255, 0, 0)
        assert bgr.width >= 48


def test_metrics_jsonl_has_one_row_per_epoch(report_run):
    rows = read_metrics(report_run.run_dir / "metrics.jsonl")
    epochs = report_run.report["distillation"]["epochs"]
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
    trained = [r for r in rows if "kd_loss" in r]
    assert trained and all(0 <= r["train_agreement"] <= 1 and r["lr"] > 0 for r in trained)
    assert all(0 <= r["new_batch_agreement"] <= 1 for r in trained)
    assert all(r["synth_confidence"] > 0 and "synth_bn" in r for r in rows)


def test_report_renders_in_headless_chromium(report_run, tmp_path):
    browser = find_chromium()
    if browser is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)")
    page = report_run.run_dir / REPORT_HTML
    found = check_page(browser, page)
    assert found["images"] == len(re.findall(r"<img ", _page(report_run)))
    assert found["undecoded"] == [], found
    assert found["errors"] == [], found
    shot = screenshot(browser, page, tmp_path / "report.png", width=1200, height=2400)
    with Image.open(shot) as img:
        assert img.size == (1200, 2400)
        # not a blank page: the rendered report has both ink and background
        grey = np.asarray(img.convert("L"))
        assert grey.min() < 100 and grey.max() > 200


def test_report_json_and_md_say_what_each_figure_was_measured_on(report_run):
    r = report_run.report
    n = r["eval_data"]["images"]
    on_eval = f"eval data: {n:,} images"
    assert r["teacher"]["accuracy_measured_on"] == on_eval
    assert r["student"]["accuracy_measured_on"] == r["student"]["onnx_accuracy_measured_on"] == on_eval
    assert r["int8"]["accuracy_measured_on"] == on_eval
    assert r["agreement"]["probe_measured_on"] == f"synthetic probes: {r['agreement']['probe_images']:,} (held out)"
    # the comparison (and int8.accuracy) ran on the images the headline figures did
    eval_rows = [row for row in r["comparison"]["rows"] if row["data"].startswith("eval data")]
    assert eval_rows and all(row["images"] == n for row in eval_rows)
    torch_row = next(row for row in eval_rows if row["backend"] == "torch")
    assert torch_row["accuracy"] == pytest.approx(r["student"]["accuracy"], abs=1e-6)
    md = (report_run.run_dir / "report.md").read_text()
    assert "## What each figure was measured on" in md and on_eval in md
    on_disk = json.loads((report_run.run_dir / "report.json").read_text())
    assert on_disk["confusion"]["measured_on"] == on_eval
    assert np.asarray(on_disk["confusion"]["matrix"]).sum() == n
