"""Model zoo: students (and known teacher architectures) behind one registry, plus the generator."""
from . import cifar_resnet, small_cnn, torchvision_zoo  # noqa: F401  (registers the models)
from .generator import Generator
from .registry import build_model, get_entry, model_names, register_model

__all__ = ["Generator", "build_model", "get_entry", "model_names", "register_model"]
