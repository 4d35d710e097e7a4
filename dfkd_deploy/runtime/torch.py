"""TorchRunner: an nn.Module on CPU (the reference every exported file is compared with)."""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from dfkd_deploy.runtime.base import BATCH_SIZE, Runner


class TorchRunner(Runner):
    """Runs ``module`` (model-space NCHW -> logits, or a tuple whose first item is the logits) on CPU.

    A module that is not on the CPU is copied there (the caller's keeps its device: on a GPU,
    TF32 would blur an fp32 comparison). The module runs in eval mode without gradients and gets
    its previous mode back after every batch.
    """

    def __init__(self, module: nn.Module, *, name: str = "torch", precision: str = "fp32",
                 input_shape: Optional[Sequence[int]] = None, batch_size: int = BATCH_SIZE):
        self.module = _on_cpu(module)
        self.name, self.precision, self.batch_size = name, precision, batch_size
        self.input_shape = tuple(int(v) for v in input_shape) if input_shape else None

    def prepare(self, x_nchw: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x_nchw, dtype=np.float32))

    @torch.no_grad()
    def run(self, prepared: torch.Tensor) -> np.ndarray:
        was_training = self.module.training
        self.module.eval()
        try:
            out = self.module(prepared)
        finally:
            self.module.train(was_training)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.float().numpy()


def _on_cpu(module: nn.Module) -> nn.Module:
    tensors = [*module.parameters(), *module.buffers()]
    if all(t.device.type == "cpu" for t in tensors):
        return module
    return copy.deepcopy(module).cpu()


@contextlib.contextmanager
def cpu_eval(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` itself, moved to the CPU in eval mode for the block, then given back its device
    and mode. No copy: modules carrying hooks that hold graph tensors cannot be deep-copied."""
    tensors = [*module.parameters(), *module.buffers()]
    device = tensors[0].device if tensors else None
    was_training = module.training
    module.cpu().eval()
    try:
        yield module
    finally:
        module.train(was_training)
        if device is not None:
            module.to(device)
