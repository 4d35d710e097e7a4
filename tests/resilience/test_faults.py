"""Nothing lost, nothing half-written: full disks, read-only locations, NaN losses, and kills
in the middle of a write.

A full disk is simulated with /dev/full: the temporary file a write goes to is a link to it, so
every write(2) really fails with ENOSPC from the kernel, whatever library (numpy, torch, json)
does the writing.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dfkd_deploy.core.io as dio
from dfkd_deploy.run import build_student, make_synthesizer
from dfkd_deploy.cli import cli
from dfkd_deploy.distill.checkpoint import load_checkpoint
from dfkd_deploy.distill.trainer import Distiller, seed_everything
from dfkd_deploy.core.errors import TrainingError
from dfkd_deploy.core.io import OutputError
from dfkd_deploy.synthesis.pool import ImagePool

from ..conftest import REPO, quick_recipe
from .conftest import subprocess_env

needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) to simulate a full disk")


def _distiller(teacher, recipe, run_dir):
    seed_everything(recipe.seed)
    student = build_student(recipe, teacher)
    synth = make_synthesizer(teacher, recipe, "cpu")
    return Distiller(teacher.module, teacher.normalizer(), student, synth, ImagePool(run_dir / "pool"),
                     recipe, run_dir, "cpu", show_progress=False)


def _full_disk_for(monkeypatch, predicate):
    """Writes to files for which ``predicate(path)`` holds go to /dev/full (ENOSPC)."""
    real = dio._make_temp

    def make_temp(path: Path) -> Path:
        if not predicate(path):
            return real(path)
        tmp = path.parent / f".{path.name}.full.tmp"
        tmp.symlink_to("/dev/full")
        return tmp

    monkeypatch.setattr(dio, "_make_temp", make_temp)


@contextmanager
def read_only(directory: Path):
    """Make ``directory`` refuse new files: chmod for a normal user; root ignores modes, so
    there the immutable attribute (chattr +i) is used, or the test is skipped."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            yield
        finally:
            directory.chmod(0o755)
        return
    if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode:
        pytest.skip("running as root, where permissions do not stop writes, and chattr +i is unavailable here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


def _temp_files(directory: Path) -> list[str]:
    return [p.name for p in directory.rglob(".*.tmp")]


@needs_dev_full
def test_full_disk_at_a_checkpoint_keeps_the_last_good_one(digits_teacher, tmp_path, monkeypatch):
    recipe = quick_recipe(**{"distillation.epochs": 3})
    d = _distiller(digits_teacher, recipe, tmp_path)
    d.run(until_epoch=2)
    ckpt = tmp_path / "checkpoints" / "last.pt"
    before = ckpt.read_bytes()
    _full_disk_for(monkeypatch, lambda p: p.name == "last.pt")
    with pytest.raises(OutputError) as err:
        d.run()
    assert str(err.value) == (f"cannot write {ckpt}: no space left on the device; the last good checkpoint "
                              f"(2 epoch(s) done) is kept: {ckpt} (continue with --resume)")
    assert ckpt.read_bytes() == before and not _temp_files(tmp_path)
    assert load_checkpoint(ckpt)["epoch"] == 2


@needs_dev_full
def test_full_disk_stops_the_cli_with_one_line_and_resume_finishes(digits_teacher_onnx, tmp_path, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(quick_recipe().resolved_yaml())
    out = tmp_path / "run"
    args = ["compress", str(digits_teacher_onnx), "--recipe", str(recipe), "--out", str(out), "--quiet", "--device", "cpu"]
    _full_disk_for(monkeypatch, lambda p: p.name == "shard_000002.npy")     # the disk fills in epoch 3
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2, r.output
    shard = out / "pool" / "shard_000002.npy"
    assert r.stderr.splitlines() == [f"error: cannot write {shard}: no space left on the device; the last good "
                                     f"checkpoint (2 epoch(s) done) is kept: {out / 'checkpoints' / 'last.pt'} "
                                     "(continue with --resume)"]
    assert "Traceback" not in r.output and not _temp_files(out)
    monkeypatch.undo()                                                       # space freed
    r = CliRunner().invoke(cli, args + ["--resume"])
    assert r.exit_code == 0, r.output
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 4 and (out / "student.onnx").is_file()


def test_a_raw_os_error_from_any_writer_is_one_line_exit_2(digits_teacher_onnx, tmp_path, monkeypatch):
    """Writers outside dfkd_deploy.core.io (a library writing its own file) still end in one line."""
    import dfkd_deploy.run as api

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.onnx"))

    monkeypatch.setattr(api, "load_teacher", no_space)
    r = CliRunner().invoke(cli, ["compress", str(digits_teacher_onnx), "--out", str(tmp_path / "o"), "--quiet"])
    assert r.exit_code == 2 and r.stderr.splitlines() == [f"error: cannot write {tmp_path / 'x.onnx'}: no space left on the device"]


def test_read_only_output_directory_fails_before_any_work(digits_teacher_onnx, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    with read_only(parent):
        r = CliRunner().invoke(cli, ["compress", str(digits_teacher_onnx), "--out", str(parent / "run"), "--quiet"])
        r2 = CliRunner().invoke(cli, ["compress", str(digits_teacher_onnx), "--out", str(parent), "--quiet"])
    assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1, r.output
    assert r.stderr.startswith(f"error: cannot create the run directory {parent / 'run'}: ")
    assert r2.exit_code == 2 and r2.stderr.startswith(f"error: the run directory {parent} is not writable: "), r2.output
    assert "Traceback" not in r.output + r2.output


def test_checkpoint_directory_turning_read_only_keeps_the_last_checkpoint(digits_teacher, tmp_path):
    recipe = quick_recipe(**{"distillation.epochs": 3})
    d = _distiller(digits_teacher, recipe, tmp_path)
    d.run(until_epoch=2)
    ckpt = tmp_path / "checkpoints" / "last.pt"
    before = ckpt.read_bytes()
    with read_only(ckpt.parent):
        with pytest.raises(OutputError, match=r"cannot write .*last\.pt: .*; the last good checkpoint \(2 epoch"):
            d.run()
    assert ckpt.read_bytes() == before and not _temp_files(tmp_path)


def test_nan_in_synthesis_names_epoch_terms_and_the_kept_checkpoint(digits_teacher, tmp_path, monkeypatch):
    recipe = quick_recipe(**{"distillation.epochs": 4})
    d = _distiller(digits_teacher, recipe, tmp_path)
    gen_cls = type(d.synth.generator)
    real = gen_cls.forward
    monkeypatch.setattr(gen_cls, "forward", lambda self, z: real(self, z) * (float("nan") if d.epoch >= 2 else 1.0))
    with pytest.raises(TrainingError) as err:
        d.run()
    msg = str(err.value)
    assert msg.startswith("epoch 3: synthesis loss is nan (bn=nan, ce=nan, adv=")
    assert msg.endswith(f"the last good checkpoint (2 epoch(s) done) is kept: {tmp_path / 'checkpoints' / 'last.pt'} "
                        "(continue with --resume)")
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == 2


def test_interrupted_write_leaves_the_old_version(tmp_path):
    target = tmp_path / "report.json"
    dio.write_json(target, {"version": 1})
    with pytest.raises(RuntimeError):
        with dio.atomic_path(target) as tmp:
            tmp.write_text('{"version": 2, "trunc')
            raise RuntimeError("killed half-way")
    assert json.loads(target.read_text()) == {"version": 1} and not _temp_files(tmp_path)


_WRITER = """
import sys, numpy as np, torch
from pathlib import Path
from dfkd_deploy.core.io import atomic_path, save_torch, write_json
out = Path(sys.argv[1])
k = 0
while True:
    payload = [k] * 50_000                       # ~300 kB of JSON: most of the time goes to writing
    write_json(out / "state.json", {"version": k, "payload": payload})
    save_torch(out / "state.pt", {"version": k, "weights": torch.full((100_000,), float(k))})
    with atomic_path(out / "shard.npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.full((64, 3, 32, 32), k % 256, dtype=np.uint8))
    if k == 0:
        (out / "ready").write_text("1")
    k += 1
"""


def test_sigkill_at_a_random_moment_leaves_complete_files(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], cwd=REPO, env=subprocess_env(),
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "ready").exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(random.uniform(0.2, 0.6))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["payload"] == [state["version"]] * 50_000
    blob = torch.load(tmp_path / "state.pt", weights_only=True)
    assert torch.equal(blob["weights"], torch.full((100_000,), float(blob["version"])))
    shard = np.load(tmp_path / "shard.npy")
    assert shard.shape == (64, 3, 32, 32) and len(np.unique(shard)) == 1
    versions = {state["version"], blob["version"], int(shard[0, 0, 0, 0])}
    assert max(versions) - min(versions) <= 1                   # each file: the last or the one before
