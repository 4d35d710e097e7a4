"""Teachers: load any supported model file as a frozen, differentiable classifier.

``load_teacher(path, options)`` returns a :class:`Teacher` (module + spec) for ONNX,
TorchScript, ``torch.export`` (.pt2), plain state_dicts (with ``options.arch``) and, when
trusted, pickled whole modules. ``inspect_teacher`` is the same call, named for the CLI's
``inspect`` command, which prints ``teacher.spec.to_dict()``.
"""
from dfkd_deploy.teachers.batchnorm import count_batchnorms, find_batchnorms
from dfkd_deploy.teachers.loaders import EXTENSIONS, load_teacher
from dfkd_deploy.teachers.spec import Normalizer, Teacher, TeacherModule, TeacherSpec, freeze

inspect_teacher = load_teacher

__all__ = ["EXTENSIONS", "Normalizer", "Teacher", "TeacherModule", "TeacherSpec", "count_batchnorms",
           "find_batchnorms", "freeze", "inspect_teacher", "load_teacher"]
