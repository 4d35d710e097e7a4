"""Progress (rich bars on a terminal, one plain line per epoch elsewhere, --quiet) and the
per-epoch metrics log (metrics.jsonl, resume without duplicates, TensorBoard)."""
from __future__ import annotations

import json

import pytest
import torch

from dfkd_deploy.core import progress
from dfkd_deploy.distill.metrics_log import METRICS_JSONL, MetricsLog, read_metrics


def _plain(monkeypatch):
    monkeypatch.setattr(progress, "interactive", lambda: False)


def test_plain_output_prints_one_line_per_epoch_with_eta_and_figures(monkeypatch, capsys):
    _plain(monkeypatch)
    with progress.task("distill (epochs)", 3, every_step=True) as bar:
        for e in range(3):
            bar.advance(1, f"kd_loss={e}")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("distill (epochs): 1/3  elapsed ") and " eta " in lines[0]
    assert lines[-1].endswith("kd_loss=2")


def test_resumed_epochs_are_counted_but_not_printed(monkeypatch, capsys):
    _plain(monkeypatch)
    with progress.task("distill (epochs)", 4, every_step=True) as bar:
        bar.resume_at(2)
        bar.advance(1)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distill (epochs): 3/4")


def test_ci_gets_plain_lines_even_on_a_terminal(monkeypatch):
    monkeypatch.setattr(progress.console, "_force_terminal", True)
    monkeypatch.setenv("CI", "true")
    assert not progress.interactive()
    monkeypatch.delenv("CI")
    assert progress.interactive()


def test_quiet_drops_progress_but_not_warnings(monkeypatch, capsys):
    _plain(monkeypatch)
    with progress.task("distill (epochs)", 2, enabled=False, every_step=True) as bar:
        bar.advance(1, "kd_loss=1")
        progress.warn("something the user must see")
    assert capsys.readouterr().err == "warning: something the user must see\n"


def test_metrics_log_appends_and_resume_drops_epochs_past_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path)
    for epoch in (1, 2, 3):
        log({"epoch": epoch, "kd_loss": 1.0 / epoch, "bad": float("nan")})
    with open(tmp_path / METRICS_JSONL, "a") as fh:
        fh.write('{"epoch": 4, "kd_lo')   # a crash mid-line
    assert [r["epoch"] for r in read_metrics(tmp_path / METRICS_JSONL)] == [1, 2, 3]
    resumed = MetricsLog(tmp_path, start_epoch=2)   # the checkpoint holds 2 epochs
    resumed({"epoch": 3, "kd_loss": 0.3})
    rows = read_metrics(tmp_path / METRICS_JSONL)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[-1]["kd_loss"] == 0.3
    assert rows[0]["bad"] is None and "elapsed_s" in rows[0]
    json.loads((tmp_path / METRICS_JSONL).read_text().splitlines()[0])   # valid JSON, no NaN
    MetricsLog(tmp_path)   # a fresh run starts the file afresh
    assert read_metrics(tmp_path / METRICS_JSONL) == []


def test_tensorboard_scalars_and_images(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path / "run", tensorboard_dir=tmp_path / "tb")
    (tmp_path / "run").mkdir(exist_ok=True)
    for epoch in (1, 2):
        log({"epoch": epoch, "kd_loss": 2.0 / epoch}, torch.rand(4, 3, 8, 8))
    log.close()
    acc = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert [e.value for e in acc.Scalars("kd_loss")] == [2.0, 1.0]
    assert "synthesis/last_batch" in acc.Tags()["images"]


def test_tensorboard_absent_is_one_warning(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # import fails as if not installed
    log = MetricsLog(tmp_path, tensorboard_dir=tmp_path / "tb")
    log({"epoch": 1, "kd_loss": 1.0})
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tensorboard" in err and log.writer is None
    assert not (tmp_path / "tb").exists()
