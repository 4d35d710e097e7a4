"""Recognise a converted teacher graph as a zoo architecture, so ``student.init: depth`` works on an
ONNX teacher too (e.g. the dynamo export of a CIFAR ResNet-56, BN folded into its convs).

The converted graph's Conv / BatchNorm / Linear modules, in the order the graph calls them, are
matched shape by shape against a zoo architecture's layers (a zoo layer is a conv with its BN,
or the head). Where the teacher kept its BN, the BN is copied as it is; where BN was folded into
the conv (a conv with a bias and no BN after it), the zoo BN gets the identity statistics
(mean 0, var 1 - eps, scale 1) and the conv's bias as its shift, which computes exactly the
folded conv. The match is accepted only if the zoo module then computes the teacher's outputs
on random inputs (:data:`TOLERANCE`): a graph that merely has the same shapes is not taken for
the architecture.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Families whose layer order a converted graph follows (module order = call order).
CANDIDATES = tuple(f"cifar_resnet{d}" for d in (8, 14, 20, 32, 44, 56))
TOLERANCE = 1e-3      # max |difference| of log-softmax outputs, relative to their spread


@dataclass
class Recognised:
    arch: str
    module: nn.Module          # the zoo architecture, computing the teacher's function (eval)
    bn: str                    # "kept" | "folded" | "mixed"
    max_abs_diff: float
    layers: int                # convs + BN + linear matched

    def to_dict(self) -> dict:
        return {"arch": self.arch, "bn": self.bn, "max_abs_diff": self.max_abs_diff, "layers": self.layers}


def _called_layers(graph_module: nn.Module) -> list[nn.Module] | None:
    graph = getattr(graph_module, "graph", None)
    if graph is None:
        return None
    modules = dict(graph_module.named_modules())
    out = []
    for node in graph.nodes:
        if node.op == "call_module":
            m = modules.get(node.target)
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
                out.append(m)
    return out


def _zoo_units(model: nn.Module) -> list[tuple[nn.Module, nn.Module | None]]:
    """(conv, its BN) pairs and (linear, None), in module order."""
    mods = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]
    units, i = [], 0
    while i < len(mods):
        m = mods[i]
        if isinstance(m, nn.Conv2d) and i + 1 < len(mods) and isinstance(mods[i + 1], nn.BatchNorm2d):
            units.append((m, mods[i + 1]))
            i += 2
        else:
            units.append((m, None))
            i += 1
    return units


def _same_conv(a: nn.Conv2d, b: nn.Conv2d) -> bool:
    return (a.weight.shape == b.weight.shape and a.stride == b.stride and a.padding == b.padding
            and a.groups == b.groups and a.dilation == b.dilation)


@torch.no_grad()
def _load(zoo: nn.Module, layers: list[nn.Module]) -> str | None:
    """Copy the teacher's layers into ``zoo``; the BN mode, or None when the shapes do not match."""
    kept = folded = 0
    i = 0
    for unit, bn in _zoo_units(zoo):
        if i >= len(layers):
            return None
        src = layers[i]
        if isinstance(unit, nn.Linear):
            if not isinstance(src, nn.Linear) or src.weight.shape != unit.weight.shape or src.bias is None:
                return None
            unit.weight.copy_(src.weight)
            unit.bias.copy_(src.bias)
            i += 1
            continue
        if not isinstance(src, nn.Conv2d) or not _same_conv(src, unit) or bn is None:
            return None
        unit.weight.copy_(src.weight)
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        if isinstance(nxt, nn.BatchNorm2d) and nxt.num_features == bn.num_features:
            if nxt.running_mean is None or not nxt.affine:
                return None
            bn.load_state_dict(nxt.state_dict())
            bn.eps = nxt.eps
            if src.bias is not None:   # BN(Wx + b) = BN'(Wx) with the running mean moved by -b
                bn.running_mean.sub_(src.bias.to(bn.running_mean))
            kept += 1
            i += 2
        else:
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
            bn.weight.fill_(1.0)
            bn.bias.copy_(src.bias if src.bias is not None else torch.zeros_like(bn.bias))
            folded += 1
            i += 1
    if i != len(layers):
        return None
    return "kept" if not folded else "folded" if not kept else "mixed"


@torch.no_grad()
def _max_diff(a: nn.Module, b: nn.Module, input_shape, n: int = 4, seed: int = 0) -> float:
    """On the teacher's (``b``'s) device; ``a`` is back on the CPU afterwards."""
    g = torch.Generator().manual_seed(seed)
    device = next((p.device for p in b.parameters()), torch.device("cpu"))
    x = torch.randn(n, *input_shape, generator=g).to(device)
    pa = torch.log_softmax(a.to(device)(x).float(), 1).cpu()
    a.cpu()
    pb = torch.log_softmax(b(x).float(), 1).cpu()
    spread = max(float(pb.max() - pb.min()), 1e-6)
    return float((pa - pb).abs().max()) / spread


def recognise(teacher) -> Recognised | None:
    """The zoo architecture the converted ``teacher`` computes, or None."""
    from dfkd_deploy.models.registry import build_model

    spec = teacher.spec
    inner = getattr(teacher.module, "model", None)
    layers = _called_layers(inner) if inner is not None else None
    if not layers or getattr(teacher.module, "layout", "NCHW") != "NCHW":
        return None
    c, h, w = spec.input_shape
    for arch in CANDIDATES:
        try:
            zoo = build_model(arch, num_classes=spec.num_classes, in_channels=c, input_size=(h, w)).eval()
        except Exception:  # noqa: BLE001 - an architecture that does not take this input
            continue
        if sum(1 for m in zoo.modules() if isinstance(m, (nn.Conv2d, nn.Linear))) != \
                sum(1 for m in layers if isinstance(m, (nn.Conv2d, nn.Linear))):
            continue
        bn = _load(zoo, layers)
        if bn is None:
            continue
        diff = _max_diff(zoo, teacher.module, spec.input_shape)
        if diff <= TOLERANCE:
            return Recognised(arch, zoo, bn, round(diff, 7), len(layers))
    return None
