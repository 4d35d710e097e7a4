"""Issue 14: what a copied run directory, a careless --out, a changed recipe or a stopped job must
not do. Each test names the item it keeps fixed. The real CLI in-process (CliRunner) where one
process suffices, subprocesses where a signal or a second process is the point."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dfkd_deploy.cli import cli
from dfkd_deploy.core import lock
from dfkd_deploy.core.errors import TrainingError
from dfkd_deploy.core.faults import PAUSE_AT, PAUSE_FILE
from dfkd_deploy.distill.checkpoint import load_checkpoint, save_checkpoint

from ..conftest import REPO, quick_recipe
from .conftest import subprocess_env

QUICK = {"distillation.epochs": 3, "distillation.warmup": 1, "distillation.kd_steps": 3,
         "synthesis.batch_size": 16, "distillation.batch_size": 16, "validation.probe_images": 16}


class _WritesMarker:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


@pytest.fixture(scope="module")
def quick_recipe_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "quick.yaml"
    path.write_text(quick_recipe(**QUICK).resolved_yaml())
    return path


def _compress(teacher, recipe, out, *extra):
    return CliRunner().invoke(cli, ["compress", str(teacher), "--recipe", str(recipe), "--out", str(out), "--quiet",
                                    "--device", "cpu", *map(str, extra)])


def _one_error_line(result, code: int = 2) -> str:
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "internal error" not in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(digits_teacher_onnx, quick_recipe_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    r = _compress(digits_teacher_onnx, quick_recipe_file, out)
    assert r.exit_code == 0, r.output
    return out


# -- 2. checkpoints are read with weights_only ----------------------------------------------------

def test_a_checkpoint_holding_code_is_refused_and_runs_nothing(digits_teacher_onnx, quick_recipe_file, tmp_path):
    marker = tmp_path / "payload-ran"
    out = tmp_path / "copied-run"
    ckpt = out / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"epoch": 1, "ranks": [{}], "history": [_WritesMarker(marker)]}, ckpt)
    with pytest.raises(TrainingError, match="Python objects"):
        load_checkpoint(ckpt)
    for flag in ("--resume", "--auto-resume"):
        line = _one_error_line(_compress(digits_teacher_onnx, quick_recipe_file, out, flag))
        assert "would run code" in line
    assert not marker.exists()


def test_a_real_checkpoint_loads_weights_only_and_numpy_values_are_stored_plain(finished_run, tmp_path):
    state = torch.load(finished_run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == QUICK["distillation.epochs"] and state["recipe"]["seed"] == 0
    path = save_checkpoint(tmp_path / "c.pt", {**state, "history": [{"x": np.float64(0.5), "n": np.int64(3)}]})
    assert load_checkpoint(path)["history"] == [{"x": 0.5, "n": 3}]


def test_a_checkpoint_missing_keys_is_named(finished_run, tmp_path):
    state = load_checkpoint(finished_run / "checkpoints" / "last.pt")
    del state["optimizer"]
    del state["ranks"][0]["rng"]
    torch.save(state, tmp_path / "c.pt")
    with pytest.raises(TrainingError, match=r"missing optimizer, ranks\[0\]\.rng"):
        load_checkpoint(tmp_path / "c.pt")


# -- 6. the run directory is locked -------------------------------------------------------------

def test_a_second_run_on_a_locked_directory_fails_naming_the_holder(digits_teacher_onnx, quick_recipe_file, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    held = lock.acquire(out)
    try:
        line = _one_error_line(_compress(digits_teacher_onnx, quick_recipe_file, out))
        assert f"in use by another dfkd-deploy run (pid {os.getpid()})" in line
        assert not (out / "pool").exists()
    finally:
        held.release()
    assert lock.acquire(out).release() is None   # released: free again


def test_the_lock_is_held_by_a_running_compress_and_freed_by_sigkill(digits_teacher_onnx, quick_recipe_file, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "paused"
    args = [sys.executable, "-m", "dfkd_deploy", "compress", str(digits_teacher_onnx), "--recipe",
            str(quick_recipe_file), "--out", str(out), "--quiet", "--device", "cpu"]
    proc = subprocess.Popen(args, cwd=REPO, env=subprocess_env(**{PAUSE_AT: "kd:2:1", PAUSE_FILE: str(marker)}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(marker, proc)
        with pytest.raises(Exception, match=f"pid {proc.pid}"):
            lock.acquire(out)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    lock.acquire(out).release()   # the kernel dropped the dead process's lock


def _wait_for(marker: Path, proc, limit: float = 300) -> None:
    deadline = time.monotonic() + limit
    while not marker.exists():
        assert proc.poll() is None, f"exited ({proc.returncode}) before the pause point"
        assert time.monotonic() < deadline, "never reached the pause point"
        time.sleep(0.05)


# -- 7. a directory that is not ours is left alone ----------------------------------------------

def test_out_on_a_foreign_directory_is_refused_and_untouched(digits_teacher_onnx, quick_recipe_file, tmp_path):
    out = tmp_path / "p"
    (out / "pool").mkdir(parents=True)
    (out / "pool" / "keep.txt").write_text("x")
    (out / "report.md").write_text("mine")
    line = _one_error_line(_compress(digits_teacher_onnx, quick_recipe_file, out))
    assert "not a dfkd-deploy run" in line
    assert (out / "pool" / "keep.txt").read_text() == "x" and (out / "report.md").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["pool", "report.md"]


def test_bundle_on_a_foreign_directory_is_refused_and_untouched(digits_teacher_onnx, quick_recipe_file, tmp_path):
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "README.md").write_text("mine")
    line = _one_error_line(_compress(digits_teacher_onnx, quick_recipe_file, tmp_path / "run", "--bundle", bundle))
    assert "not a dfkd-deploy bundle" in line
    assert (bundle / "README.md").read_text() == "mine" and not (tmp_path / "run").exists()


# -- 10. every path is checked before synthesis -------------------------------------------------

@pytest.mark.parametrize("case", ["missing_eval", "bundle_is_out", "bundle_above_out", "bundle_under_a_file",
                                  "eval_not_npz"])
def test_bad_paths_fail_before_anything_is_computed(digits_teacher_onnx, quick_recipe_file, tmp_path, case):
    out = tmp_path / "run"
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "renamed.npz").write_bytes(os.urandom(256))
    extra = {"missing_eval": ["--eval-data", tmp_path / "nope.npz"],
             "bundle_is_out": ["--bundle", out],
             "bundle_above_out": ["--bundle", tmp_path],
             "bundle_under_a_file": ["--bundle", tmp_path / "a-file" / "bundle"],
             "eval_not_npz": ["--eval-data", tmp_path / "renamed.npz"]}[case]
    line = _one_error_line(_compress(digits_teacher_onnx, quick_recipe_file, out, *extra))
    assert "pickled" not in line
    assert not out.exists()   # refused before the run directory was made, let alone synthesis


def test_a_batch_that_cannot_fit_in_memory_is_refused_up_front(digits_teacher_onnx, quick_recipe_file, tmp_path):
    line = _one_error_line(_compress(digits_teacher_onnx, quick_recipe_file, tmp_path / "run",
                                     "--set", "synthesis.batch_size=100000000000"))
    assert "synthesis.batch_size=100000000000 needs at least" in line and "GiB free" in line
    assert not (tmp_path / "run" / "pool").exists()


# -- 8. a resume must use the checkpoint's recipe; 11. it cleans what a killed run left ----------

@pytest.mark.parametrize("change, key", [(["--seed", "2"], "seed"),
                                         (["--set", "student.arch=cifar_resnet20"], "student.arch"),
                                         (["--set", "distillation.lr=0.5"], "distillation.lr")])
def test_resume_with_another_recipe_is_refused_naming_the_keys(digits_teacher_onnx, quick_recipe_file, finished_run,
                                                               change, key):
    before = (finished_run / "report.json").read_text()
    line = _one_error_line(_compress(digits_teacher_onnx, quick_recipe_file, finished_run, "--resume", *change))
    assert f"differs from the checkpoint's in {key} (" in line
    assert (finished_run / "report.json").read_text() == before


def test_resume_may_extend_the_epochs_and_removes_leftover_temporaries(digits_teacher_onnx, quick_recipe_file,
                                                                       finished_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    leftovers = [run / ".report.json.k3j2.tmp", run / "pool" / ".shard_000009.npy.x1.tmp",
                 run / "checkpoints" / ".last.pt.zz.tmp"]
    for f in leftovers:
        f.write_bytes(b"half")
    epochs = QUICK["distillation.epochs"] + 1
    r = _compress(digits_teacher_onnx, quick_recipe_file, run, "--resume", "--set", f"distillation.epochs={epochs}")
    assert r.exit_code == 0, r.output
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == epochs
    assert not any(f.exists() for f in leftovers)
    assert not list(run.rglob(".*.tmp"))


# -- 11. SIGTERM says what happened, like Ctrl-C ------------------------------------------------

def test_sigterm_exits_with_a_message_and_keeps_the_checkpoint(digits_teacher_onnx, quick_recipe_file, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "paused"
    args = [sys.executable, "-m", "dfkd_deploy", "compress", str(digits_teacher_onnx), "--recipe",
            str(quick_recipe_file), "--out", str(out), "--quiet", "--device", "cpu"]
    with open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.Popen(args, cwd=REPO, env=subprocess_env(**{PAUSE_AT: "kd:2:1", PAUSE_FILE: str(marker)}),
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            _wait_for(marker, proc)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    lines = (tmp_path / "stderr").read_text().strip().splitlines()
    assert proc.returncode == 128 + signal.SIGTERM, lines
    assert lines == ["error: terminated (SIGTERM); the last checkpoint is kept (rerun with --resume)"]
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 1
