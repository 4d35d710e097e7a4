"""``student.init: prune``: structured channel pruning of the teacher itself, through Torch-Pruning.

Importance is data-free: weight magnitude (L2 of each channel group), BatchNorm scale, or Taylor
(first-order gradients of the KL to the teacher's own predictions on synthesized images). The
classifier's final Linear is never pruned (its outputs are the classes).

Two modes:
- ``all``: every Conv/Linear but the head, coupled channels kept consistent by Torch-Pruning's
  dependency graph (onnx2torch graphs, plain CNNs).
- ``inner``: only the channels inside residual blocks (a BasicBlock's conv1 outputs = its conv2
  inputs): the zoo CIFAR ResNets' option-A shortcuts (stride-2 slicing plus zero channel padding)
  are outside what the dependency graph understands, so the residual stream is left as it is.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dfkd_deploy.core.errors import UsageError
from dfkd_deploy.core.units import Target
from dfkd_deploy.students.targets import count_macs, count_params

IMPORTANCES = ("magnitude", "bn_scale", "taylor")
SEARCH_STEPS = 9            # bisection steps on the channel ratio (2^-9 of the range)
MAX_RATIO = 0.95
RESHAPE_TYPES = ("OnnxReshape", "Reshape")   # onnx2torch's, and the one dfkd_deploy.teachers.converters registers


class PruneError(UsageError):
    """A graph Torch-Pruning cannot prune (the message names the layer and suggests scratch)."""


@dataclass
class PruneResult:
    model: nn.Module
    ratio: float           # channel ratio removed from each prunable layer
    mode: str              # all | inner
    importance: str
    prunable_layers: int


def inner_layers(model: nn.Module) -> list[nn.Module] | None:
    """The convs whose output channels stay inside a residual block, for the zoo's residual families
    (CIFAR BasicBlock conv1; torchvision BasicBlock conv1, Bottleneck conv1 and conv2); None for others."""
    from dfkd_deploy.models.cifar_resnet import BasicBlock as CifarBlock

    found = []
    for m in model.modules():
        if isinstance(m, CifarBlock):
            found.append(m.conv1)
        elif type(m).__name__ == "BasicBlock" and type(m).__module__.startswith("torchvision"):
            found.append(m.conv1)
        elif type(m).__name__ == "Bottleneck" and type(m).__module__.startswith("torchvision"):
            found += [m.conv1, m.conv2]
    return found or None


# Modules a conv's output may pass through, one input to one output, channel for channel, on its
# way to the next conv inside a block.
_PASS_THROUGH = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.BatchNorm2d, nn.Identity)


def graph_inner_layers(model: nn.Module) -> list[nn.Module] | None:
    """The same for a converted graph (an onnx2torch GraphModule, e.g. a dynamo export with BN
    fused): each Conv2d whose output reaches exactly one other Conv2d through a chain of
    single-user pass-through modules, and nothing else (no Add, Pad, Concat on the way), so its
    output channels are that block's own; None when there is no graph or no such conv."""
    import torch.fx

    graphs = [m for m in model.modules() if isinstance(m, torch.fx.GraphModule)]
    found = []
    for gm in graphs:
        def module(node):
            return gm.get_submodule(node.target) if node.op == "call_module" else None

        for node in gm.graph.nodes:
            if not isinstance(module(node), nn.Conv2d):
                continue
            cur = node
            while len(cur.users) == 1:
                nxt = next(iter(cur.users))
                m = module(nxt)
                if isinstance(m, nn.Conv2d):
                    if len(nxt.all_input_nodes) == 1:
                        found.append(module(node))
                    break
                if not isinstance(m, _PASS_THROUGH) or len(nxt.all_input_nodes) != 1:
                    break
                cur = nxt
    return found or None


def _head(model: nn.Module, num_classes: int) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]


def import_torch_pruning():
    try:
        import torch_pruning
    except ImportError:
        raise UsageError("student.init: prune needs the torch-pruning package: pip install 'dfkd-deploy[prune]'") from None
    return torch_pruning


def _importance(kind: str, has_bn: bool):
    tp = import_torch_pruning()

    if kind == "magnitude" or (kind == "bn_scale" and not has_bn):
        return tp.importance.GroupMagnitudeImportance(p=2)
    if kind == "bn_scale":
        return tp.importance.BNScaleImportance()
    if kind == "taylor":
        return tp.importance.GroupTaylorImportance()
    raise UsageError(f"student.prune_importance {kind!r}: choose one of {', '.join(IMPORTANCES)}")


def _taylor_gradients(model: nn.Module, teacher: nn.Module, images: torch.Tensor) -> None:
    """Gradients of the cross-entropy to the teacher's own labels on synthesized (model-space)
    images: what Taylor importance reads."""
    model.zero_grad(set_to_none=True)
    dev = next(iter(teacher.parameters()), torch.empty(0)).device
    with torch.no_grad():
        t = teacher(images.to(dev)).cpu()
    loss = F.cross_entropy(model(images), t.argmax(1))
    loss.backward()


def _rounded_ratios(model: nn.Module, ignored: list, ratio: float, round_to: int) -> dict:
    """Per-layer ratios that keep a multiple of ``round_to`` channels, rounded *up* and never
    under ``round_to`` (Torch-Pruning's own ``round_to`` rounds the kept channels down, so at high
    ratios a thin layer would keep none and the pruner then skips it: the size is not monotone in
    the ratio and the bisection breaks). CPU conv kernels run whole channel blocks of 8 (ONNX
    Runtime's NCHWc on AVX2, oneDNN): odd widths are slow out of proportion to their MACs."""
    skip = set(map(id, ignored))
    out = {}
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in skip:
            c = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            keep = min(c, max(round_to, round_to * math.ceil(c * (1 - ratio) / round_to)))
            out[m] = 1 - (keep + 0.5) / c if keep < c else 0.0   # +0.5: Torch-Pruning keeps int(c * (1 - r))
    return out


def prune_once(model: nn.Module, ratio: float, *, example: torch.Tensor, num_classes: int, mode: str,
               importance: str = "magnitude", teacher: nn.Module | None = None,
               images: torch.Tensor | None = None, round_to: int | None = None) -> PruneResult:
    """A pruned copy of ``model`` with ``ratio`` of each prunable layer's channels removed (with
    ``round_to``, each layer keeps the next multiple of it)."""
    tp = import_torch_pruning()

    model = copy.deepcopy(model).cpu().eval()
    for p in model.parameters():
        p.requires_grad_(True)
    head = _head(model, num_classes)
    if mode == "inner":
        keep = set(map(id, inner_layers(model) or graph_inner_layers(model) or []))
        ignored = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in keep]
    else:
        ignored = head
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    try:
        per_layer = _rounded_ratios(model, ignored, ratio, round_to) if round_to else None
        pruner = tp.pruner.MetaPruner(model, example, importance=_importance(importance, has_bn),
                                      pruning_ratio=ratio, pruning_ratio_dict=per_layer, ignored_layers=ignored,
                                      round_to=None)
    except Exception as exc:  # noqa: BLE001 - a graph the dependency tracer cannot follow
        raise PruneError(f"Torch-Pruning cannot trace this teacher ({type(exc).__name__}: {_line(exc)}); "
                         "use student.init: scratch") from None
    if importance == "taylor" and teacher is not None and images is not None:
        _taylor_gradients(model, teacher, images)
    flattens = flatten_reshapes(model, example)
    try:
        pruner.step()
    except Exception as exc:  # noqa: BLE001 - coupled channels the dependency graph got wrong
        raise PruneError(f"Torch-Pruning failed removing channels ({mode} mode; {type(exc).__name__}: {_line(exc)}): "
                         "the graph couples channels it cannot follow (e.g. a shortcut that pads channels); "
                         "use student.init: scratch") from None
    refit_flattens(model, flattens, example)
    model.zero_grad(set_to_none=True)
    n = sum(1 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m not in ignored)
    return PruneResult(model.eval(), ratio, mode, importance, n)


def _reshapes(model: nn.Module) -> dict[str, nn.Module]:
    """Reshape modules of converted ONNX graphs (the target shape comes in as a second, constant input)."""
    return {n: m for n, m in model.named_modules() if type(m).__name__ in RESHAPE_TYPES}


def _forward_with_pre_hooks(model: nn.Module, example: torch.Tensor, hooks: dict) -> None:
    """One no-grad forward of ``example`` with ``{module: forward pre-hook}`` in place."""
    handles = [m.register_forward_pre_hook(fn) for m, fn in hooks.items()]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()


def flatten_reshapes(model: nn.Module, example: torch.Tensor) -> list[str]:
    """The Reshapes that flatten each sample (a constant shape ``[-1, K]``, K the per-sample size
    of their input), as exporters write ``torch.flatten``: after pruning, K must follow the channels."""
    found: list[str] = []

    def watcher(name):
        def pre(_m, args):
            x, shape = args[0], args[1] if len(args) > 1 else None
            if (isinstance(shape, torch.Tensor) and shape.numel() == 2 and int(shape[0]) == -1
                    and x.dim() >= 2 and int(shape[1]) == x[0].numel()):
                found.append(name)
        return pre

    _forward_with_pre_hooks(model, example, {m: watcher(n) for n, m in _reshapes(model).items()})
    return found


def refit_flattens(model: nn.Module, names: list[str], example: torch.Tensor) -> None:
    """Rewrite each flattening Reshape's ``K`` to its input's per-sample size after pruning."""
    if not names:
        return
    reshapes = _reshapes(model)

    def pre(_m, args):
        x, shape = args[0], args[1]
        if int(shape[1]) != x[0].numel():
            shape.fill_(-1)
            shape[1] = x[0].numel()

    _forward_with_pre_hooks(model, example, {reshapes[n]: pre for n in names if n in reshapes})


def check_forward(model: nn.Module, example: torch.Tensor, num_classes: int) -> None:
    """The pruned graph must still run, at batch 1 and 2, to (batch, classes); otherwise one line
    names the layer where it breaks and suggests scratch."""
    entered: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda _m, _a, n=name: entered.append(n))
             for name, m in model.named_modules() if name and not list(m.children())]
    try:
        for batch in (1, 2):
            x = example[:1].expand(batch, *example.shape[1:]).clone()
            entered.clear()
            with torch.no_grad():
                out = model(x)
            if tuple(out.shape) != (batch, num_classes):
                raise RuntimeError(f"output shape {tuple(out.shape)}, expected {(batch, num_classes)}")
    except Exception as exc:  # noqa: BLE001
        where = f"at layer '{entered[-1]}'" if entered else "before its first layer"
        raise PruneError(f"the pruned teacher no longer runs: it breaks {where} ({_line(exc)}); "
                         "this graph cannot be pruned channel-wise, use student.init: scratch") from None
    finally:
        for h in hooks:
            h.remove()


def prune_to_target(model: nn.Module, target: Target, *, example: torch.Tensor, num_classes: int,
                    teacher_value: float, measure: Callable[[nn.Module], Optional[float]] | None = None,
                    importance: str = "magnitude", teacher: nn.Module | None = None,
                    images: torch.Tensor | None = None, mode: str | None = None,
                    round_to: int | None = None) -> PruneResult:
    """The smallest channel ratio whose pruned model is within ``target`` (bisection: the pruned
    size falls monotonically with the ratio). ``measure`` returns the target's figure for a model
    (defaults: parameters, MACs); ``teacher_value`` is the teacher's."""
    if mode is None:
        mode = "inner" if inner_layers(model) else "all"
    if measure is None:
        measure = (lambda m: count_params(m)) if target.metric == "params" else \
                  (lambda m: count_macs(m, tuple(example.shape[1:])))
    kw = dict(example=example, num_classes=num_classes, mode=mode, importance=importance, teacher=teacher, images=images,
              round_to=round_to)

    def fits(result: PruneResult) -> bool:
        value = measure(result.model)
        if value is None:
            raise UsageError(f"the pruned student's {target.metric} could not be measured; "
                             "choose another target metric")
        return value <= target.fraction * teacher_value

    try:
        best = prune_once(model, MAX_RATIO, **kw)
    except PruneError:
        # e.g. the BN-fused dynamo export of a CIFAR ResNet: its option-A shortcuts (stride-2
        # slicing, zero channel padding) break the residual stream's coupling, as in the zoo net;
        # the channels inside its blocks can still go
        if mode != "all" or not graph_inner_layers(model):
            raise
        mode = kw["mode"] = "inner"
        best = prune_once(model, MAX_RATIO, **kw)
    check_forward(best.model, example, num_classes)
    if not fits(best):
        raise UsageError(f"pruning {MAX_RATIO:.0%} of the prunable channels ({mode} mode) does not reach "
                         f"{target}; choose a larger fraction, or student.init: scratch / depth")
    lo, hi = 0.0, MAX_RATIO
    for _ in range(SEARCH_STEPS):
        mid = (lo + hi) / 2
        trial = prune_once(model, mid, **kw)
        if fits(trial):
            hi, best = mid, trial
        else:
            lo = mid
    check_forward(best.model, example, num_classes)
    return best


def _line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]
