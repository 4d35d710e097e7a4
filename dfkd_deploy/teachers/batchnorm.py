"""Finding a teacher's BatchNorm layers, whichever way they were built.

Two kinds exist after loading: torch's ``nn.BatchNorm*d`` modules (zoo models, TorchScript
wrappers, and onnx2torch when the BN parameters are initializers), and onnx2torch's
``OnnxBatchNorm``, a functional batch norm that receives weight/bias/running stats as inputs.
"""
from __future__ import annotations

from typing import Iterator

from torch import nn


def is_onnx_functional_bn(module: nn.Module) -> bool:
    return type(module).__name__ == "OnnxBatchNorm" and type(module).__module__.startswith("onnx2torch")


def find_batchnorms(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or is_onnx_functional_bn(m):
            yield name, m


def count_batchnorms(module: nn.Module) -> int:
    return sum(1 for _ in find_batchnorms(module))
