"""SIGKILL in the middle of a run, then ``--resume``: the same student as a run never interrupted.

Real processes (``python -m dfkd_deploy compress``) are stopped at chosen points through the
pause hook (dfkd_deploy/distill/faults.py: the process writes its pid to a marker file and
sleeps) and killed there with SIGKILL, once during synthesis and once during KD. On CPU with
one thread per process the resumed run is bit-identical to the reference run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dfkd_deploy.distill.checkpoint import load_checkpoint
from dfkd_deploy.core.faults import PAUSE_AT, PAUSE_FILE

from ..conftest import REPO
from .conftest import REFERENCE, cli, subprocess_env


def _killed_at(point: str, args: list, marker) -> None:
    """Start ``compress`` with the pause hook at ``point``; SIGKILL it once it is there."""
    proc = subprocess.Popen([sys.executable, "-m", "dfkd_deploy", "compress", *map(str, args)], cwd=REPO,
                            env=subprocess_env(**{PAUSE_AT: point, PAUSE_FILE: str(marker)}),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    try:
        while not marker.exists():
            assert proc.poll() is None, f"exited ({proc.returncode}) before {point}:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, f"never reached {point}"
            time.sleep(0.05)
        assert int(marker.read_text()) == proc.pid
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    marker.unlink()


def _student(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_sigkill_during_synthesis_and_kd_then_resume_gives_the_same_student(
        digits_teacher_onnx, digits_eval_npz, reference_recipe, reference_run, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "paused"
    args = [digits_teacher_onnx, "--recipe", reference_recipe, "--eval-data", digits_eval_npz, "--out", out,
            "--quiet", "--device", "cpu"]
    epochs = REFERENCE["distillation.epochs"]

    # 1. Killed in epoch 4's synthesis: the 4th shard is on disk and indexed, the checkpoint says 3 epochs.
    _killed_at("pool.add:4", [*args, "--auto-resume"], marker)       # nothing to resume yet: a fresh start
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 3
    assert len(json.loads((out / "pool" / "index.json").read_text())["shards"]) == 4

    # 2. Resumed, then killed at KD step 7 of epoch 6 (epoch 6's shard written, its KD half done).
    _killed_at("kd:6:7", [*args, "--resume"], marker)
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 5

    # 3. Restarted by the same command a scheduler would repeat: --auto-resume finds the checkpoint.
    r = cli("compress", *args, "--auto-resume", timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr

    ckpt, ref_ckpt = (load_checkpoint(d / "checkpoints" / "last.pt") for d in (out, reference_run))
    assert ckpt["epoch"] == ref_ckpt["epoch"] == epochs
    resumed, reference = _student(out / "student.pt"), _student(reference_run / "student.pt")
    assert resumed.keys() == reference.keys()
    for k in reference:
        assert torch.equal(resumed[k], reference[k]), k                           # bit-identical
    for k, v in ref_ckpt["synthesizer"]["generator"].items():
        assert torch.equal(ckpt["synthesizer"]["generator"][k], v), k
    assert [h.get("kd_loss") for h in ckpt["history"]] == [h.get("kd_loss") for h in ref_ckpt["history"]]
    report, ref_report = (json.loads((d / "report.json").read_text()) for d in (out, reference_run))
    assert report["student"]["accuracy"] == ref_report["student"]["accuracy"]
    assert report["synthesis"]["images"] == ref_report["synthesis"]["images"] == epochs * 64
