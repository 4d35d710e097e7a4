"""Helpers for the resilience tests: subprocess runs of the real CLI (``python -m dfkd_deploy``,
``torchrun -m dfkd_deploy``) on the digits teacher, and one reference run they compare with."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dfkd_deploy", *map(str, args)], cwd=REPO, env=env or subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


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
