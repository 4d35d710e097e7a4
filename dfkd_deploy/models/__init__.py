"""Model zoo: students (and known teacher architectures) behind one registry, plus the generator."""
from dfkd_deploy.models import cifar_resnet, mlp, small_cnn, torchvision_zoo  # noqa: F401  (registers the models)
from dfkd_deploy.models.generator import Generator
from dfkd_deploy.models.registry import build_model, get_entry, list_students, model_names, register_model

__all__ = ["Generator", "build_model", "get_entry", "list_students", "model_names", "register_model"]
