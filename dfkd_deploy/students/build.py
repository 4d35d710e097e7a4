"""The student a recipe asks for: ``student.init`` (auto | scratch | prune | depth) and ``student.target``
(or, with neither an arch nor a target, a student at least 2x smaller and faster than the teacher).

Returns a :class:`BuiltStudent`: the module, the label recorded as ``student.arch``, the
architecture description ``student.pt`` needs to rebuild a derived student, and the size figures
and warnings that go into report.json / report.md.
"""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from dfkd_deploy.core.errors import UsageError
from dfkd_deploy.models.mlp import MLP_NAMES
from dfkd_deploy.students import architecture, depth, prune
from dfkd_deploy.students.recognise import recognise
from dfkd_deploy.core.units import Target, parse_target
from dfkd_deploy.recipe import (DERIVED_LR_SCALE, FOLDED_DEPTH_FEATURES, FOLDED_DEPTH_LR_SCALE, FOLDED_DEPTH_SHARE,
                                FOLDED_DEPTH_SYNTH_BATCH, SYNTHESIS_BATCH, SYNTHESIS_SHARE)
from dfkd_deploy.students.targets import (DEFAULT_FRACTION, SizeFigures, measure, meets, ratios,
                                                size_warnings, teacher_figures, worst_latency_ratio)

# Scratch candidates for the default choice and for targets, from the zoo (small to large): conv
# nets for a teacher with convolutions, MLPs for one without (a conv student replacing an MLP
# needs more MACs at any size and is slower at both batch sizes: 13.6x at batch 32 for tiny_cnn
# against the Fashion-MNIST MLP).
SCRATCH_CANDIDATES = ("tiny_cnn", "small_cnn", "cifar_resnet8", "cifar_resnet14", "cifar_resnet20",
                      "cifar_resnet32", "cifar_resnet44", "cifar_resnet56", "mobilenet_v2", "resnet18", "resnet34")
MLP_CANDIDATES = MLP_NAMES


def has_convolution(module: nn.Module) -> bool:
    """Whether any submodule is a convolution (torch's, onnx2torch's or an int8 one: by class name)."""
    return any("conv" in type(m).__name__.lower() for m in module.modules())


def scratch_candidates(teacher) -> tuple[str, ...]:
    return SCRATCH_CANDIDATES if has_convolution(teacher.module) else MLP_CANDIDATES


@dataclass
class BuiltStudent:
    module: nn.Module
    arch: str                              # label for student.arch
    init: str
    description: Optional[dict] = None     # derived students: what student.pt rebuilds them from
    info: dict = field(default_factory=dict)   # report.json student.* additions


def _zoo(arch: str, spec) -> nn.Module:
    from dfkd_deploy.models.registry import build_model

    c, h, w = spec.input_shape
    return build_model(arch, num_classes=spec.num_classes, in_channels=c, input_size=(h, w))


def teacher_arch(teacher) -> str | None:
    """The teacher's zoo architecture when it is a zoo model (a state_dict loaded with an arch)."""
    from dfkd_deploy.models.registry import model_names

    arch = teacher.spec.arch
    return arch if arch in model_names() else None


def _figures(module: nn.Module, spec, latency: bool) -> SizeFigures:
    return measure(module, spec.input_shape, latency=latency)


def _metric_value(figures: SizeFigures, metric: str):
    if metric == "latency":
        return figures.latency_ms
    return getattr(figures, metric)


def build(recipe, teacher, *, images: Callable[[int], torch.Tensor] | None = None,
          measure_latency: bool = True) -> BuiltStudent:
    """``images(n)``: n synthesized model-space images (BN recalibration, Taylor importance); called
    only when a derived student needs them."""
    recipe, auto = resolve_init(recipe, teacher)
    s = recipe.student
    target = parse_target(s.target) if s.target else None
    t_fig = teacher_figures(teacher, latency=measure_latency)
    if s.init == "scratch":
        built = _scratch(recipe, teacher, target, t_fig, measure_latency)
    elif s.init == "prune":
        built = _prune(recipe, teacher, target or Target("params", DEFAULT_FRACTION), t_fig, images)
    elif s.init == "depth":
        built = _depth(recipe, teacher, target, t_fig, images, measure_latency)
    else:
        raise UsageError(f"student.init {s.init!r}: choose auto, scratch, prune or depth")
    s_fig = _figures(built.module, teacher.spec, measure_latency)
    r = ratios(s_fig, t_fig)
    if auto:
        built.info["init_choice"] = auto
    built.info.update({"init": s.init, "target": str(target) if target else None,
                       "size": {"student": s_fig.to_dict(), "teacher": t_fig.to_dict(), "ratio": r},
                       "warnings": size_warnings(r)})
    if target is not None:
        built.info["target_met"] = meets(r, target)
    return built


# --- scratch --------------------------------------------------------------------------------------

def _scratch(recipe, teacher, target, t_fig: SizeFigures, measure_latency: bool) -> BuiltStudent:
    s, spec = recipe.student, teacher.spec
    if s.arch:
        if target is not None:
            raise UsageError("student.arch and student.target both given: name an architecture or a target, not both")
        return BuiltStudent(_zoo(s.arch, spec), s.arch, "scratch")
    wanted = [target] if target else [Target("params", DEFAULT_FRACTION), Target("macs", DEFAULT_FRACTION)]
    if not target and measure_latency:
        wanted.append(Target("latency", DEFAULT_FRACTION))
    candidates = scratch_candidates(teacher)
    arch = choose_arch(candidates, spec, t_fig, wanted, measure_latency)
    if arch is None:
        what = str(target) if target else "at least 2x smaller and faster than the teacher"
        if target is not None:
            raise UsageError(f"no zoo architecture meets {what} for this teacher; try student.init: prune")
        arch = _smallest(candidates, spec)
        return BuiltStudent(_zoo(arch, spec), arch, "scratch",
                            info={"choice": f"no zoo architecture is {what}; the smallest, {arch}, was taken"})
    return BuiltStudent(_zoo(arch, spec), arch, "scratch",
                        info={"choice": f"{arch}: the largest zoo architecture meeting "
                                        f"{', '.join(map(str, wanted))} (measured)"})


def _buildable(arch: str, spec) -> nn.Module | None:
    try:
        return _zoo(arch, spec)
    except Exception:  # noqa: BLE001 - an architecture that does not take this input shape
        return None


def choose_arch(candidates, spec, t_fig: SizeFigures, wanted: list[Target], measure_latency: bool) -> str | None:
    """The largest candidate (by parameters) meeting every target in ``wanted``; params and MACs are
    checked first (cheap), latency is measured only on the survivors, largest first."""
    from dfkd_deploy.students.targets import count_macs, count_params

    fits = []
    for arch in candidates:
        model = _buildable(arch, spec)
        if model is None:
            continue
        fig = SizeFigures(count_params(model), count_macs(model, spec.input_shape))
        r = ratios(fig, t_fig)
        if all(meets(r, t) for t in wanted if t.metric != "latency"):
            fits.append((fig.params, arch, model))
    for _, arch, model in sorted(fits, key=lambda x: -x[0]):
        if not any(t.metric == "latency" for t in wanted):
            return arch
        r = ratios(measure(model, spec.input_shape), t_fig)
        if all(meets(r, t) for t in wanted):
            return arch
    return None


def _smallest(candidates, spec) -> str:
    from dfkd_deploy.students.targets import count_params

    sizes = [(count_params(m), a) for a in candidates if (m := _buildable(a, spec)) is not None]
    return min(sizes)[1]


# --- prune ----------------------------------------------------------------------------------------

def _example(spec) -> torch.Tensor:
    return torch.zeros(1, *spec.input_shape)


def _prune_source(teacher) -> tuple[nn.Module, dict, nn.Module]:
    """(a clean copy of the teacher to prune, its description base, the unpruned base module to
    diff against). The copy is rebuilt from the base plus the teacher's state_dict, so hooks
    others put on the teacher (synthesis) do not come along."""
    arch = teacher_arch(teacher)
    spec = teacher.spec
    if arch is not None:
        base, weights = architecture.zoo_base(arch), teacher.module.model.state_dict()
    elif spec.format == "onnx":
        base, weights = architecture.onnx_base(spec), teacher.module.state_dict()
    else:
        raise UsageError(f"student.init: prune needs a zoo teacher (state_dict + arch) or an ONNX teacher; this "
                         f"{spec.format} teacher cannot be rebuilt without pickle; use student.init: scratch")
    kw = dict(num_classes=spec.num_classes, input_shape=spec.input_shape)
    source = architecture.build_base(base, **kw)
    source.load_state_dict({k: v.detach().cpu() for k, v in weights.items()})
    return source.eval(), base, architecture.build_base(base, **kw)



def _prune(recipe, teacher, target: Target, t_fig: SizeFigures, images) -> BuiltStudent:
    d, spec = recipe.student.derived, teacher.spec
    if recipe.student.arch:
        raise UsageError("student.init: prune keeps the teacher's architecture; leave student.arch unset")
    source, base, base_module = _prune_source(teacher)
    calib = images(d.images) if images and (d.recalibrate_bn or d.prune_importance == "taylor") else None
    measure_fn, teacher_value = None, _metric_value(t_fig, target.metric)
    if target.metric == "latency":   # bisect on the measured student/teacher ratio (worst batch size)
        if not t_fig.latency_ms:
            raise UsageError(f"the teacher's latency could not be measured ({t_fig.latency_reason}); "
                             "use a params or macs target")
        teacher_value = 1.0
        measure_fn = lambda m: worst_latency_ratio(ratios(measure(m, spec.input_shape), t_fig))  # noqa: E731
    result = prune.prune_to_target(source, target, example=_example(spec), num_classes=spec.num_classes,
                                   teacher_value=teacher_value, measure=measure_fn,
                                   importance=d.prune_importance, teacher=teacher.module,
                                   images=calib[:64] if calib is not None else None, round_to=d.round_to)
    model = architecture.trainable(result.model)
    if d.recalibrate_bn and calib is not None:
        depth.recalibrate_bn(model, calib)
    label = f"{teacher_arch(teacher) or 'teacher'}-pruned"
    description = architecture.describe(model, base, base_module, init="prune")
    return BuiltStudent(model, label, "prune", description,
                        info={"prune": {"ratio": round(result.ratio, 4), "mode": result.mode,
                                        "round_to": d.round_to,
                                        "importance": result.importance, "layers": result.prunable_layers,
                                        "bn_recalibrated": bool(d.recalibrate_bn and calib is not None)}})


# --- depth ----------------------------------------------------------------------------------------

_recognised: "weakref.WeakKeyDictionary[nn.Module, object]" = weakref.WeakKeyDictionary()


def depth_source(teacher):
    """(zoo arch, module holding its blocks, Recognised or None) of a teacher ``depth`` can start
    from: a zoo model loaded as a state_dict, or an ONNX graph that computes one (recognised once
    per teacher module: ``auto`` asks first, the build asks again); (None, None, None) otherwise."""
    t_arch = teacher_arch(teacher)
    if t_arch is not None:
        return t_arch, teacher.module.model, None
    if teacher.spec.format != "onnx":
        return None, None, None
    if teacher.module not in _recognised:
        _recognised[teacher.module] = recognise(teacher)
    found = _recognised[teacher.module]
    return (found.arch, found.module, found) if found is not None else (None, None, None)


def resolve_init(recipe, teacher):
    """The student's ``auto`` choices made concrete for this teacher, before anything reads them:
    ``student.init`` (:func:`_resolve_init`), then the KD settings whose ``auto`` differs for a
    depth student of a BN-folded teacher (:func:`_resolve_folded_auto`; recipe.py says what was
    measured): ``student.derived.lr_scale``, ``distillation.features`` (only with KD labels
    recomputed per batch, which the term needs), ``distillation.synthesis_share`` (said only
    with a budget, where it matters) and ``synthesis.batch_size`` (only with a budget). Returns (the recipe, a copy when it changed; the reasons, or None)."""
    recipe, why = _resolve_init(recipe, teacher)
    folded = _folded_depth(recipe, teacher)
    recipe, why_lr = _resolve_folded_auto(recipe, "student.derived.lr_scale", folded,
                                          FOLDED_DEPTH_LR_SCALE, DERIVED_LR_SCALE)
    recipe, why_ft = _resolve_folded_auto(recipe, "distillation.features",
                                          folded and recipe.distillation.teacher_logits == "recompute",
                                          FOLDED_DEPTH_FEATURES, 0.0)
    recipe, why_sh = _resolve_folded_auto(recipe, "distillation.synthesis_share", folded,
                                          FOLDED_DEPTH_SHARE, SYNTHESIS_SHARE, say=bool(recipe.budget))
    recipe, why_sb = _resolve_folded_auto(recipe, "synthesis.batch_size", folded and bool(recipe.budget),
                                          FOLDED_DEPTH_SYNTH_BATCH, SYNTHESIS_BATCH)
    return recipe, "; ".join(w for w in (why, why_lr, why_ft, why_sh, why_sb) if w) or None


def _folded_depth(recipe, teacher) -> bool:
    """A depth student of a BN-folded teacher: its BNs are matched to the teacher's layers, and its
    auto settings differ (KD lr scale, feature matching, synthesis share, synthesis batch)."""
    return recipe.student.init == "depth" and _bn_folded(depth_source(teacher)[2])


def _bn_folded(recognised) -> bool:
    """An ONNX graph recognised as a zoo net whose BNs were folded away (its depth student's BNs
    are matched to the teacher's layers, and it is fine-tuned at FOLDED_DEPTH_LR_SCALE)."""
    return recognised is not None and recognised.bn != "kept"


def _resolve_folded_auto(recipe, path: str, folded: bool, folded_value: float, other_value: float, *,
                         say: bool = True):
    """The recipe value at dotted ``path`` when it is ``auto``: ``folded_value`` for a depth
    student of a BN-folded teacher (``folded``), ``other_value`` for any other. Returns (the
    recipe, a copy when it changed; the reason for the run output when ``folded`` and ``say``)."""
    if functools.reduce(getattr, path.split("."), recipe) != "auto":
        return recipe, None
    value = folded_value if folded else other_value

    def put(model, keys):
        head, *rest = keys
        return model.model_copy(update={head: put(getattr(model, head), rest) if rest else value})

    why = f"{path} auto -> {value:g}: a depth student of a BN-folded teacher" if folded and say else None
    return put(recipe, path.split(".")), why


def _resolve_init(recipe, teacher):
    """``student.init: auto`` made concrete for this teacher: ``depth`` where the teacher is a
    residual zoo net (or computes one) with a shallower member, of ``student.arch``'s family when
    one is named (it beat scratch and prune at every CPU budget measured, docs/benchmarks.md, BN
    kept or folded: with a folded teacher's BNs matched to its layers, :func:`depth.match_teacher_bn`),
    else ``scratch``. Returns (the recipe, a copy when it changed; the reason, or None)."""
    s = recipe.student
    if s.init != "auto":
        return recipe, None
    t_arch = depth_source(teacher)[0]
    options = depth.shallower(t_arch) if t_arch else []
    target = parse_target(s.target) if s.target else None
    if options and s.arch is None and target is not None and target.metric != "latency" and \
            choose_arch(options, teacher.spec, teacher_figures(teacher, latency=False), [target], False) is None:
        init, why = "scratch", f"no shallower {t_arch} meets {target}, so a zoo architecture from random weights"
    elif options and (s.arch is None or s.arch in options):
        init, why = "depth", f"a shallower {t_arch} from the teacher's own blocks"
    else:
        init = "scratch"
        why = (f"{s.arch} is not a shallower {t_arch}" if options else
               "the teacher is not a residual zoo net (nor an ONNX graph computing one)") + \
              ", so a zoo architecture from random weights"
    student = s.model_copy(update={"init": init})
    return recipe.model_copy(update={"student": student}), f"student.init auto -> {init}: {why}"


def _depth(recipe, teacher, target, t_fig: SizeFigures, images, measure_latency: bool) -> BuiltStudent:
    s, spec = recipe.student, teacher.spec
    t_arch, source, recognised = depth_source(teacher)
    options = depth.shallower(t_arch) if t_arch else []
    if not options:
        raise UsageError(f"student.init: depth needs a residual zoo teacher ({', '.join(f.name for f in depth.FAMILIES)}) "
                         f"loaded as a state_dict with its arch, or an ONNX graph that computes one; this "
                         f"teacher is {t_arch or spec.format}. Use student.init: prune or scratch")
    if s.arch:
        arch = s.arch
    else:
        wanted = [target] if target else [Target("params", DEFAULT_FRACTION), Target("macs", DEFAULT_FRACTION)]
        if not target and measure_latency:
            wanted.append(Target("latency", DEFAULT_FRACTION))
        arch = choose_arch(options, spec, t_fig, wanted, measure_latency)
        if arch is None:
            raise UsageError(f"no shallower {t_arch} meets {', '.join(map(str, wanted))}; try student.init: prune")
    blocks = depth.block_map(t_arch, arch, s.derived.depth_blocks)
    model = depth.copy_blocks(source, architecture.trainable(_zoo(arch, spec)), blocks)
    # A folded teacher's BNs are identities: their scales and shifts come from the teacher's outputs.
    matched = _bn_folded(recognised)
    calibrated = False
    if s.derived.recalibrate_bn and images is not None:
        if matched:
            depth.match_teacher_bn(model, source, blocks, images(s.derived.images))
        else:
            depth.recalibrate_bn(model, images(s.derived.images))
        calibrated = True
    info = {"teacher_arch": t_arch, "blocks": blocks, "choice": s.derived.depth_blocks,
            "bn_recalibrated": calibrated}
    if recognised is not None:
        info["recognised"] = recognised.to_dict()
        info["bn_recalibration"] = "teacher-matched" if matched else "statistics"
    return BuiltStudent(model, arch, "depth", info={"depth": info})
