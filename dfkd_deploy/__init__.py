"""dfkd-deploy: data-free distillation of a deployed image classifier into a small, exported student.

The public API: everything the command line does is one of these calls, with the same names.

    import dfkd_deploy as dd
    recipe = dd.load_recipe("recipes/tiny.yaml", {"distillation.epochs": 5})
    result = dd.compress("teacher.onnx", recipe, "runs/t", eval_data="test.npz")

Names are imported on first use, so ``import dfkd_deploy`` (and the CLI's ``--help``) stays fast.
"""
from __future__ import annotations

import importlib
import os
import sys



def _wait_policy(load: float, cores: int) -> str | None:
    """OpenMP's wait policy for a machine this busy: OpenMP workers that spin while they wait (the
    default) lose their time slices to whatever else runs on the cores, and passive waiting costs
    a little on an idle machine. Measured with the demo on 2 cores: beside a 2-thread benchmark
    101 s spinning, 65 s passive; quiet 32 s spinning, 47 s passive (same student each time)."""
    return "PASSIVE" if load >= 0.75 * max(cores, 1) else None


# Only where torch is not loaded yet (it reads the variable once) and the user has not chosen.
if "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ and hasattr(os, "getloadavg"):
    _policy = _wait_policy(os.getloadavg()[0], os.cpu_count() or 1)
    if _policy:
        os.environ["OMP_WAIT_POLICY"] = _policy

from dfkd_deploy._compat import import_torchvision as _import_torchvision  # noqa: E402

_import_torchvision()  # once, before anything (onnx2torch included) imports torchvision

__version__ = "0.1.0"

# public name -> module that defines it (and the name there, where it differs: the `validate` stage
# is `validate_student` here, because `dfkd_deploy.validate` is the validation package)
_EXPORTS = {
    "compress": "dfkd_deploy.run",
    "CompressResult": "dfkd_deploy.run",
    "build_student": "dfkd_deploy.run",
    "plan": "dfkd_deploy.run",
    "make_synthesizer": "dfkd_deploy.synthesis",
    "make_probes": "dfkd_deploy.run",
    "run_demo": "dfkd_deploy.demo",
    "synthesize": "dfkd_deploy.stages",
    "distill_on_pool": "dfkd_deploy.stages",
    "export": "dfkd_deploy.stages",
    "export_teacher": "dfkd_deploy.stages",
    "validate_student": ("dfkd_deploy.stages", "validate"),
    "load_teacher": "dfkd_deploy.teachers",
    "Teacher": "dfkd_deploy.teachers",
    "TeacherSpec": "dfkd_deploy.teachers",
    "load_recipe": "dfkd_deploy.recipe",
    "Recipe": "dfkd_deploy.recipe",
    "list_students": "dfkd_deploy.models",
    "build_model": "dfkd_deploy.models",
    "load_student": "dfkd_deploy.students.student_file",
    "save_student": "dfkd_deploy.students.student_file",
    "load_eval_data": "dfkd_deploy.validate",
    "verify_bundle": "dfkd_deploy.deploy.bundle",
    "DfkdError": "dfkd_deploy.core.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'dfkd_deploy' has no attribute {name!r}")
    module, attr = target if isinstance(target, tuple) else (target, name)
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
