"""Classifier-head surgery on any student: find the final Linear, read the features it sees,
and swap it for an FC ReLU MLP (``student.head.type: mlp``).

Works on every registered architecture without per-model code: the head is the last
``nn.Linear`` whose ``out_features`` is the number of classes (``linear`` in the CIFAR ResNets and
small CNNs, ``fc`` in torchvision ResNets, ``classifier.1`` in MobileNetV2), and the penultimate
features are whatever that module receives, read with a forward pre-hook.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from dfkd_deploy.core.errors import UsageError

MLP_FORMAT = "mlp"   # the head config saved in student.pt names this


def head_name(model: nn.Module, num_classes: int) -> str:
    """Dotted name of the classifier head: the last Linear with ``num_classes`` outputs, or the
    Sequential(Linear, ReLU, Linear) an earlier :func:`attach_mlp_head` put in its place."""
    found = None
    for name, m in model.named_modules():
        if getattr(m, "_dfkd_head", False):
            return name
        if isinstance(m, nn.Linear) and m.out_features == num_classes:
            found = name
    if found is None:
        raise UsageError(f"{type(model).__name__} has no final Linear layer with {num_classes} outputs "
                         "to use as the classifier head")
    return found


def get_module(model: nn.Module, dotted: str) -> nn.Module:
    return model.get_submodule(dotted)


def _set_module(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, leaf = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if leaf.isdigit():
        parent[int(leaf)] = new
    else:
        setattr(parent, leaf, new)


def mlp_head(in_features: int, hidden: int, num_classes: int) -> nn.Sequential:
    head = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
    head._dfkd_head = True
    return head


def attach_mlp_head(model: nn.Module, num_classes: int, hidden: int) -> nn.Module:
    """Replace the final Linear(D, K) by Linear(D, hidden)-ReLU-Linear(hidden, K) (default init)."""
    name = head_name(model, num_classes)
    old = get_module(model, name)
    if getattr(old, "_dfkd_head", False):
        return model
    _set_module(model, name, mlp_head(old.in_features, hidden, num_classes))
    return model


@contextmanager
def _capture_input(module: nn.Module):
    box: dict[str, Tensor] = {}

    def hook(_mod, args):
        box["x"] = args[0]

    handle = module.register_forward_pre_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def features_and_logits(model: nn.Module, x: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """One forward pass: the features the classifier head receives, flattened to [N, D], and
    the model's output."""
    head = get_module(model, head_name(model, num_classes))
    with _capture_input(head) as box:
        out = model(x)
    return box["x"].reshape(len(x), -1), out


def penultimate_features(model: nn.Module, x: Tensor, num_classes: int) -> Tensor:
    """The features the classifier head receives for ``x``, flattened to [N, D]."""
    return features_and_logits(model, x, num_classes)[0]


def load_head_weights(model: nn.Module, num_classes: int, weights: nn.Sequential) -> None:
    """Copy a Linear-ReLU-Linear ``weights`` module into the model's MLP head, in place (so an
    optimizer holding the head's parameters keeps working)."""
    head = get_module(model, head_name(model, num_classes))
    if not getattr(head, "_dfkd_head", False):
        raise UsageError("the student has no MLP head to initialise (student.head.type must be mlp)")
    src = [m for m in weights if isinstance(m, nn.Linear)]
    dst = [m for m in head if isinstance(m, nn.Linear)]
    if len(src) != len(dst) or any(a.weight.shape != b.weight.shape for a, b in zip(src, dst)):
        raise UsageError(f"head shapes differ: fitted {[tuple(m.weight.shape) for m in src]}, "
                         f"student {[tuple(m.weight.shape) for m in dst]}")
    with torch.no_grad():
        for a, b in zip(src, dst):
            b.weight.copy_(a.weight)
            b.bias.copy_(a.bias)


def head_config(model: nn.Module, num_classes: int) -> dict:
    """What :func:`apply_head_config` needs to rebuild this model's head (saved in student.pt)."""
    head = get_module(model, head_name(model, num_classes))
    if getattr(head, "_dfkd_head", False):
        return {"type": MLP_FORMAT, "hidden": head[0].out_features}
    return {"type": "linear"}


def apply_head_config(model: nn.Module, num_classes: int, config: dict | None) -> nn.Module:
    if not config or config.get("type", "linear") == "linear":
        return model
    if config["type"] != MLP_FORMAT:
        raise UsageError(f"unknown student head type {config['type']!r}")
    return attach_mlp_head(model, num_classes, int(config["hidden"]))
