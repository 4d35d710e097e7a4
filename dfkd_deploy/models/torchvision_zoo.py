"""torchvision's ImageNet architectures as students (randomly initialised: no hub downloads)."""
from __future__ import annotations

from torch import nn

from dfkd_deploy._compat import import_torchvision
from dfkd_deploy.models.registry import register_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _adapt_stem(model: nn.Module, attr_path: list[str], in_channels: int) -> None:
    """Replace the first conv when the teacher is not RGB."""
    if in_channels == 3:
        return
    parent = model
    for name in attr_path[:-1]:
        parent = getattr(parent, name) if not name.isdigit() else parent[int(name)]
    last = attr_path[-1]
    old = getattr(parent, last) if not last.isdigit() else parent[int(last)]
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=old.bias is not None)
    if last.isdigit():
        parent[int(last)] = new
    else:
        setattr(parent, last, new)


def _resnet(fn_name):
    def build(num_classes: int, in_channels: int = 3, input_size=(224, 224)):
        tv = import_torchvision()
        model = getattr(tv.models, fn_name)(weights=None, num_classes=num_classes)
        _adapt_stem(model, ["conv1"], in_channels)
        if max(input_size) <= 64:  # small images: CIFAR-style stem keeps spatial resolution
            model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            model.maxpool = nn.Identity()
        return model

    build.__doc__ = f"torchvision {fn_name} (CIFAR stem for inputs up to 64 px)"
    return build


register_model("resnet18", mean=IMAGENET_MEAN, std=IMAGENET_STD)(_resnet("resnet18"))
register_model("resnet34", mean=IMAGENET_MEAN, std=IMAGENET_STD)(_resnet("resnet34"))


def _mobilenet_v2(num_classes: int, in_channels: int, input_size, width_mult: float) -> nn.Module:
    tv = import_torchvision()
    model = tv.models.mobilenet_v2(weights=None, num_classes=num_classes, width_mult=width_mult)
    stem = model.features[0][0]
    stride = 1 if max(input_size) <= 64 else 2
    model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, stride, 1, bias=False)
    return model


@register_model("mobilenet_v2", mean=IMAGENET_MEAN, std=IMAGENET_STD)
def mobilenet_v2(num_classes: int, in_channels: int = 3, input_size=(224, 224)):
    """torchvision MobileNetV2 (stride-1 stem for inputs up to 64 px)"""
    return _mobilenet_v2(num_classes, in_channels, input_size, 1.0)


@register_model("mobilenet_v2_050", mean=IMAGENET_MEAN, std=IMAGENET_STD)
def mobilenet_v2_050(num_classes: int, in_channels: int = 3, input_size=(224, 224)):
    """torchvision MobileNetV2 at width 0.5 (channels halved; stride-1 stem up to 64 px)"""
    return _mobilenet_v2(num_classes, in_channels, input_size, 0.5)
