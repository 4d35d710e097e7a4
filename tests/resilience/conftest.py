"""Helpers for the resilience tests: subprocess runs of the real CLI (``python -m dfkd_deploy``,
``torchrun -m dfkd_deploy``) on the digits teacher, and one reference run they compare with."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ..conftest import REPO, quick_recipe

# Short but not trivial: the student learns enough for agreement figures to mean something.
REFERENCE = {"synthesis.batch_size": 64, "distillation.epochs": 8, "distillation.warmup": 2,
             "distillation.kd_steps": 15, "distillation.batch_size": 64, "validation.probe_images": 64}


def subprocess_env(**extra: str) -> dict:
    """The test's environment for a child process: this checkout importable, one thread each
    (deterministic kernels, and two processes share the 2 CI cores)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in extra:
            env.pop(var, None)
    return env


def run_together(commands: list[tuple[list, dict]], timeout: float, workdir: Path) -> list[subprocess.CompletedProcess]:
    """Run processes side by side, each in its own session with its output in files (never a
    pipe that a blocked reader could fill), all under one deadline. When the deadline passes,
    every process group is killed (torchrun's workers included, so nothing lingers) and the test
    fails with each process's output."""
    workdir.mkdir(parents=True, exist_ok=True)
    logs = [(workdir / f"process{i}.out", workdir / f"process{i}.err") for i in range(len(commands))]
    procs = []
    for (args, env), (out, err) in zip(commands, logs):
        with open(out, "wb") as fo, open(err, "wb") as fe:
            procs.append(subprocess.Popen([str(a) for a in args], cwd=REPO, env=env, stdout=fo, stderr=fe,
                                          start_new_session=True))
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        _kill_groups(procs)
        outputs = "\n".join(f"--- process {i}: {' '.join(map(str, args[:5]))} ...\n{_read(out, 4000)}{_read(err, 4000)}"
                             for i, ((args, _), (out, err)) in enumerate(zip(commands, logs)))
        pytest.fail(f"timed out after {timeout:.0f} s; their output:\n{outputs}", pytrace=False)
    finally:
        _kill_groups(procs)
    return [subprocess.CompletedProcess(p.args, p.returncode, _read(out), _read(err)) for p, (out, err) in zip(procs, logs)]


def _kill_groups(procs) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)   # the whole session: the children of torchrun too
        except (ProcessLookupError, PermissionError):
            pass
        if p.poll() is None:
            p.wait()


def _read(path: Path, tail: int | None = None) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text if tail is None else text[-tail:]


def cli(*args, env: dict | None = None, timeout: float = 300, workdir: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m dfkd_deploy ARGS`` under :func:`run_together`'s deadline."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="dfkd-cli-"))
    return run_together([([sys.executable, "-m", "dfkd_deploy", *args], env or subprocess_env())], timeout, workdir)[0]


def start_ranks(module: str, args: list, world_size: int, workdir: Path, timeout: float) -> list[subprocess.CompletedProcess]:
    """``python -m MODULE ARGS`` as ``world_size`` ranks that meet through a FileStore in
    ``workdir`` (see ddp_worker.join_group): no TCP port is picked in advance, so no other
    process can take it between the pick and the bind."""
    store = workdir / "rendezvous.store"
    store.unlink(missing_ok=True)
    env = {str(r): subprocess_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world_size),
                                  DFKD_TEST_FILE_STORE=str(store)) for r in range(world_size)}
    return run_together([([sys.executable, "-m", module, *args], env[str(r)]) for r in range(world_size)],
                        timeout, workdir / "logs")


@pytest.fixture(scope="session")
def reference_recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ref-recipe") / "reference.yaml"
    path.write_text(quick_recipe(**REFERENCE).resolved_yaml())
    return path


@pytest.fixture(scope="session")
def reference_run(digits_teacher_onnx, digits_eval_npz, reference_recipe, tmp_path_factory) -> Path:
    """One uninterrupted single-process run: the SIGKILL tests must reproduce its student exactly,
    the two-process run must come close to it."""
    out = tmp_path_factory.mktemp("reference") / "run"
    r = cli("compress", digits_teacher_onnx, "--recipe", reference_recipe, "--eval-data", digits_eval_npz,
            "--out", out, "--quiet", "--device", "cpu")
    assert r.returncode == 0, r.stdout + r.stderr
    return out
