"""The public API: every name in ``dfkd_deploy.__all__`` resolves, and it is what the CLI uses."""
from __future__ import annotations

import subprocess
import sys

import pytest

import dfkd_deploy


@pytest.mark.parametrize("name", [n for n in dfkd_deploy.__all__ if n != "__version__"])
def test_every_public_name_resolves(name):
    value = getattr(dfkd_deploy, name)
    assert value is not None and name in dir(dfkd_deploy)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        dfkd_deploy.no_such_thing  # noqa: B018


def test_stage_functions_are_the_library_ones():
    from dfkd_deploy import run, stages

    assert dfkd_deploy.compress is run.compress
    assert dfkd_deploy.validate_student is stages.validate
    assert {e.name for e in dfkd_deploy.list_students()} >= {"cifar_resnet20", "tiny_cnn", "resnet18"}


def test_import_is_lazy():
    """``import dfkd_deploy`` does not load the pipeline (the CLI's --help stays fast)."""
    code = "import sys, dfkd_deploy; print('dfkd_deploy.run' in sys.modules, 'onnx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr


def test_openmp_waits_passively_on_a_busy_machine_only():
    """Spinning OpenMP workers starve other work on the same cores (and are starved by it), but
    passive waiting is slower on an idle machine: the package chooses by the load it starts under."""
    from dfkd_deploy import _wait_policy

    assert _wait_policy(3.1, 2) == "PASSIVE" and _wait_policy(1.5, 2) == "PASSIVE"
    assert _wait_policy(0.3, 2) is None and _wait_policy(5.0, 16) is None


def test_import_leaves_a_users_wait_policy_alone():
    import os
    import subprocess
    import sys

    code = "import dfkd_deploy, os; print(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "ACTIVE", out.stderr
