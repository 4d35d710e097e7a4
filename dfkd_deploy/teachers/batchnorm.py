"""Finding a teacher's BatchNorm layers, whichever way they were built.

Two kinds exist after loading: torch's ``nn.BatchNorm*d`` modules (zoo models, TorchScript
wrappers, and onnx2torch when the BN parameters are initializers), and onnx2torch's
``OnnxBatchNorm``, a functional batch norm that receives weight/bias/running stats as inputs.
"""
from __future__ import annotations

from typing import Iterator

from torch import nn

from dfkd_deploy.teachers.spec import has_convolution


def is_onnx_functional_bn(module: nn.Module) -> bool:
    return type(module).__name__ == "OnnxBatchNorm" and type(module).__module__.startswith("onnx2torch")


def find_batchnorms(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or is_onnx_functional_bn(m):
            yield name, m


def count_batchnorms(module: nn.Module) -> int:
    return sum(1 for _ in find_batchnorms(module))


def missing_statistics_warning(teacher) -> str | None:
    """One line for a convolutional teacher (a loaded Teacher: ``.module``, ``.spec``) without
    usable BN statistics (``spec.bn_layers == 0``: BN folded at export, a BN-free net, a file
    whose BN cannot be hooked), which is where the measured students are far weaker; None
    otherwise. MLP teachers get none: nothing was measured to say so."""
    if teacher.spec.bn_layers or not has_convolution(teacher.module):
        return None
    return ("the teacher has no usable BatchNorm statistics (bn_statistics in `dfkd-deploy inspect` says why): synthesis falls "
            "back to priors, and students of such teachers came out far weaker than from the same network "
            "with BN kept (docs/benchmarks.md, \"Accuracy against minutes\"). If you have the model before "
            "export, hand over its state_dict, or an ONNX file that keeps the BatchNormalization nodes "
            "(torch.onnx.export(..., dynamo=False, do_constant_folding=False))")
