"""Running a model on a back end: one interface (predict and time) for torch, ONNX Runtime and
TensorRT. Depends only on dfkd_deploy.core and the back ends themselves, so every layer above
(exporters' parity checks, validation, the deploy stage, bundle verify) can use it."""
from dfkd_deploy.runtime.base import LatencyStats, Runner
from dfkd_deploy.runtime.onnxruntime import OrtRunner
from dfkd_deploy.runtime.torch import TorchRunner

__all__ = ["LatencyStats", "Runner", "OrtRunner", "TorchRunner"]
