"""dfkd-deploy: data-free distillation of a deployed image classifier into a small, exported student."""
from dfkd_deploy._compat import import_torchvision as _import_torchvision

_import_torchvision()  # once, before anything (onnx2torch included) imports torchvision

__version__ = "0.1.0"
