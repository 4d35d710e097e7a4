"""``student.init: depth``: the chosen teacher blocks are copied exactly, block 0 always kept."""
from __future__ import annotations

import pytest
import torch

from dfkd_deploy.students import build
from dfkd_deploy.students.depth import block_map, choose_blocks, recalibrate_bn, shallower
from dfkd_deploy.recipe import (DERIVED_LR_SCALE, FOLDED_DEPTH_FEATURES, FOLDED_DEPTH_LR_SCALE, FOLDED_DEPTH_SHARE,
                               FOLDED_DEPTH_SYNTH_BATCH, SYNTHESIS_BATCH, SYNTHESIS_SHARE, load_recipe)


@pytest.mark.parametrize("t,s,how,want", [(9, 3, "spread", [0, 4, 8]), (9, 3, "last", [0, 7, 8]),
                                          (9, 3, "first", [0, 1, 2]), (2, 1, "spread", [0]),
                                          (3, 2, "spread", [0, 2]), (6, 3, "last", [0, 4, 5])])
def test_choose_blocks(t, s, how, want):
    assert choose_blocks(t, s, how) == want


def test_shallower_members_of_the_family():
    assert shallower("cifar_resnet56")[:2] == ["cifar_resnet44", "cifar_resnet32"]
    assert shallower("resnet34") == ["resnet18"]
    assert shallower("small_cnn") == []


@pytest.mark.parametrize("how", ["spread", "last"])
def test_depth_copies_the_chosen_blocks_exactly(zoo_teacher, how):
    r = load_recipe(None, {"student.init": "depth", "student.arch": "cifar_resnet8",
                           "student.derived.depth_blocks": how, "student.derived.recalibrate_bn": False})
    built = build(r, zoo_teacher, measure_latency=False)
    blocks = built.info["depth"]["blocks"]
    assert blocks == block_map("cifar_resnet14", "cifar_resnet8", how) and all(b[0] == 0 for b in blocks.values())
    t = zoo_teacher.module.model.state_dict()
    s = built.module.state_dict()
    for key, value in s.items():
        parts = key.split(".")
        if parts[0].startswith("layer"):
            parts[1] = str(blocks[parts[0]][int(parts[1])])
        assert torch.equal(value, t[".".join(parts)]), key
    assert not any(k.startswith("layer1.1.") for k in s)     # resnet8: one block per stage


def test_depth_with_bn_recalibration_changes_only_running_statistics(zoo_teacher):
    r = load_recipe(None, {"student.init": "depth", "student.arch": "cifar_resnet8", "student.derived.images": 32})
    images = torch.rand(32, *zoo_teacher.spec.input_shape)
    built = build(r, zoo_teacher, images=lambda n: images[:n], measure_latency=False)
    assert built.info["depth"]["bn_recalibrated"] is True
    t = zoo_teacher.module.model.state_dict()
    plain = build(load_recipe(None, {"student.init": "depth", "student.arch": "cifar_resnet8",
                                     "student.derived.recalibrate_bn": False}), zoo_teacher,
                  measure_latency=False).module.state_dict()
    for key, value in built.module.state_dict().items():
        if "running_" in key or "num_batches_tracked" in key:
            continue
        assert torch.equal(value, plain[key]), key
    assert not torch.equal(built.module.bn1.running_mean, t["bn1.running_mean"])


def test_recalibrate_bn_matches_the_batch_statistics():
    bn = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    x = torch.randn(64, 3, 4, 4) * 2 + 1
    recalibrate_bn(bn, x, batch_size=64)
    assert torch.allclose(bn[0].running_mean, x.mean((0, 2, 3)), atol=1e-5)


def test_depth_needs_a_residual_zoo_teacher(digits_teacher):
    from dfkd_deploy.core.errors import UsageError

    with pytest.raises(UsageError, match="depth needs a residual zoo teacher.*prune or scratch"):
        build(load_recipe(None, {"student.init": "depth"}), digits_teacher, measure_latency=False)


@pytest.mark.parametrize("form,bn", [("zoo_teacher_fused", "folded"), ("zoo_teacher_legacy", "kept")])
def test_an_onnx_graph_of_a_zoo_resnet_is_recognised(request, zoo_teacher, form, bn):
    """The converted graph is matched layer by layer and accepted only because the zoo module then
    computes the teacher's outputs; a folded BN becomes an identity BN with the conv's bias."""
    from dfkd_deploy.students.recognise import recognise

    teacher = request.getfixturevalue(form)
    rec = recognise(teacher)
    assert rec is not None and rec.arch == "cifar_resnet14" and rec.bn == bn
    x = torch.randn(5, *teacher.spec.input_shape)
    with torch.no_grad():
        assert torch.allclose(rec.module(x), zoo_teacher.module(x), atol=1e-4)
    if bn == "kept":   # the real statistics came along
        assert torch.equal(rec.module.bn1.running_var, zoo_teacher.module.model.bn1.running_var)
    else:
        assert torch.equal(rec.module.bn1.running_mean, torch.zeros(16))


def test_a_graph_of_the_same_shapes_but_another_function_is_not_recognised(zoo_teacher_fused):
    """Same layer shapes, different wiring (a ReLU dropped): the outputs differ, so no match."""
    import copy

    from dfkd_deploy.students.recognise import recognise

    teacher = copy.deepcopy(zoo_teacher_fused)
    gm = teacher.module.model
    relu = next(n for n in gm.graph.nodes if n.op == "call_module" and "relu" in str(n.target).lower())
    relu.replace_all_uses_with(relu.args[0])
    gm.graph.erase_node(relu)
    gm.recompile()
    assert recognise(teacher) is None


def _bn_outputs(model, x):
    """Per BN module name: the per-channel mean and standard deviation of its eval-mode output on x."""
    out, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            hooks.append(m.register_forward_hook(
                lambda mod, i, o, name=name: out.__setitem__(name, (o.mean((0, 2, 3)), o.std((0, 2, 3), unbiased=False)))))
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return out


def test_depth_on_a_folded_onnx_teacher_copies_its_blocks_and_matches_its_layers(zoo_teacher_fused):
    """ResNet-14 (dynamo, BN folded) -> ResNet-8: the chosen blocks' convs are the teacher's, and
    after the teacher-matched BN every student layer puts out, on the calibration images, the
    per-channel mean and spread of the teacher layer it was copied from; the stem, which is
    the teacher's own, computes exactly what the teacher's stem computes."""
    r = load_recipe(None, {"student.init": "depth", "student.arch": "cifar_resnet8", "student.derived.images": 32})
    images = torch.rand(32, *zoo_teacher_fused.spec.input_shape)
    built = build(r, zoo_teacher_fused, images=lambda n: images[:n], measure_latency=False)
    info = built.info["depth"]
    assert info["recognised"]["arch"] == "cifar_resnet14" and info["bn_recalibration"] == "teacher-matched"
    plain = build(load_recipe(None, {"student.init": "depth", "student.arch": "cifar_resnet8",
                                     "student.derived.recalibrate_bn": False}), zoo_teacher_fused,
                  measure_latency=False).module
    from dfkd_deploy.students.recognise import recognise

    zoo = recognise(zoo_teacher_fused).module       # the folded file as its zoo architecture
    t = zoo.state_dict()
    blocks = info["blocks"]
    for key, value in plain.state_dict().items():   # convs and head: the teacher file's own weights
        if "conv" in key or key.startswith("linear"):
            parts = key.split(".")
            if parts[0].startswith("layer"):
                parts[1] = str(blocks[parts[0]][int(parts[1])])
            assert torch.equal(value, t[".".join(parts)]), key
    student, teacher = _bn_outputs(built.module, images), _bn_outputs(zoo, images)
    assert len(student) == 7     # stem + 3 blocks of 2 BNs
    for name, (mean, sd) in student.items():
        parts = name.split(".")
        if parts[0].startswith("layer"):
            parts[1] = str(blocks[parts[0]][int(parts[1])])
        t_mean, t_sd = teacher[".".join(parts)]
        assert torch.allclose(mean, t_mean, rtol=1e-3, atol=5e-3 * float(t_sd.mean())), name
        assert torch.allclose(sd, t_sd, rtol=1e-2, atol=1e-4), name
    stem = {}
    for model, key in ((built.module, "s"), (zoo, "t")):
        h = model.bn1.register_forward_hook(lambda mod, i, o, key=key: stem.__setitem__(key, o))
        with torch.no_grad():
            model.eval()(images[:4])
        h.remove()
    assert torch.allclose(stem["s"], stem["t"], atol=1e-3)
    # the eval-mode student is not the copied blocks' function any more (that one is near chance)
    with torch.no_grad():
        assert not torch.allclose(built.module.eval()(images[:4]), plain.eval()(images[:4]), atol=1e-3)


def test_match_teacher_bn_names_a_missing_teacher_layer(zoo_teacher_fused):
    from dfkd_deploy.core.errors import UsageError
    from dfkd_deploy.students.depth import match_teacher_bn
    from dfkd_deploy.students.recognise import recognise

    plain = build(load_recipe(None, {"student.init": "depth", "student.arch": "cifar_resnet8",
                                     "student.derived.recalibrate_bn": False}), zoo_teacher_fused,
                  measure_latency=False).module
    with pytest.raises(UsageError, match="no BN layer1.5.bn1 that ran"):
        match_teacher_bn(plain, recognise(zoo_teacher_fused).module, {"layer1": [5], "layer2": [0], "layer3": [0]},
                         torch.rand(4, *zoo_teacher_fused.spec.input_shape))


def test_a_biased_conv_before_its_bn_is_taken_into_the_bn(zoo_teacher):
    """Some exporters keep a conv bias in front of the BN: BN(Wx + b) is loaded as BN'(Wx) with the
    running mean moved by -b, so the zoo module computes the same function."""
    import copy

    from torch import nn

    from dfkd_deploy.models import build_model
    from dfkd_deploy.students.recognise import _load, _zoo_units

    torch.manual_seed(0)
    source = copy.deepcopy(zoo_teacher.module.model).eval()
    layers = []
    for conv, bn in _zoo_units(source):
        if bn is None:
            layers.append(conv)
            continue
        biased = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                           bias=True)
        with torch.no_grad():
            biased.weight.copy_(conv.weight)
            biased.bias.copy_(torch.randn(conv.out_channels))
            moved = copy.deepcopy(bn)
            moved.running_mean.add_(biased.bias)       # same function as conv -> bn
        layers += [biased, moved]
    zoo = build_model("cifar_resnet14", num_classes=10, in_channels=3, input_size=(16, 16)).eval()
    assert _load(zoo, layers) == "kept"
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(zoo(x), source(x), atol=1e-4)


@pytest.mark.parametrize("form", ["zoo_teacher", "zoo_teacher_legacy", "zoo_teacher_fused"])
def test_auto_init_takes_depth_for_a_residual_teacher_and_its_onnx_graph(request, form):
    """``student.init: auto`` resolves to depth where the teacher (a state_dict, or an ONNX graph
    recognised as one, BN kept or folded) has a shallower member, and the student built is that
    depth student."""
    from dfkd_deploy.students.build import resolve_init

    teacher = request.getfixturevalue(form)
    r = load_recipe(None, {"student.init": "auto", "student.arch": "cifar_resnet8",
                           "student.derived.recalibrate_bn": False})
    resolved, why = resolve_init(r, teacher)
    assert resolved.student.init == "depth" and "auto -> depth" in why
    assert r.student.init == "auto"                    # the caller's recipe is left as it was
    built = build(r, teacher, measure_latency=False)
    assert built.init == "depth" and built.info["init"] == "depth"
    assert built.info["depth"]["blocks"] == block_map("cifar_resnet14", "cifar_resnet8", "spread")
    assert built.info["init_choice"] == why


@pytest.mark.parametrize("form, sets, reason", [
    ("digits_teacher", {}, "not a residual zoo net"),
    ("zoo_teacher", {"student.arch": "tiny_cnn"}, "tiny_cnn is not a shallower cifar_resnet14"),
    # the smallest shallower ResNet (resnet8, 0.44 of the ResNet-14's params) is too big for 0.1
    ("zoo_teacher", {"student.target": "params=0.1"}, "no shallower cifar_resnet14 meets params=0.1"),
])
def test_auto_init_falls_back_to_scratch(request, form, sets, reason):
    from dfkd_deploy.students.build import resolve_init

    teacher = request.getfixturevalue(form)
    r = load_recipe(None, {"student.init": "auto", **sets})
    resolved, why = resolve_init(r, teacher)
    assert resolved.student.init == "scratch" and reason in why, why
    built = build(r, teacher, measure_latency=False)
    assert built.init == "scratch" and built.info["init"] == "scratch"


def test_the_plan_and_the_run_recipe_hold_the_resolved_init(zoo_teacher):
    """The run's recipe (recipe.resolved.yaml, KD's lr scale for derived students) holds the
    resolved init, never auto."""
    import yaml

    from dfkd_deploy.run import plan

    r = load_recipe(None, {"student.init": "auto", "student.arch": "cifar_resnet8"})
    assert plan(zoo_teacher, r)["student"]["init"] == "depth"
    from dfkd_deploy.distill.trainer import kd_lr
    from dfkd_deploy.students.build import resolve_init

    resolved = resolve_init(r, zoo_teacher)[0]
    assert resolved.student.derived.lr_scale == DERIVED_LR_SCALE    # BN kept: the general fine-tuning scale
    assert kd_lr(resolved) == pytest.approx(r.distillation.lr * DERIVED_LR_SCALE)
    assert yaml.safe_load(resolved.resolved_yaml())["student"]["init"] == "depth"
    assert yaml.safe_load(resolved.resolved_yaml())["student"]["derived"]["lr_scale"] == DERIVED_LR_SCALE


@pytest.mark.parametrize("form,init,want", [("zoo_teacher_fused", "auto", FOLDED_DEPTH_LR_SCALE),
                                            ("zoo_teacher_fused", "prune", DERIVED_LR_SCALE),
                                            ("zoo_teacher_legacy", "depth", DERIVED_LR_SCALE)])
def test_auto_lr_scale_is_lower_for_a_depth_student_of_a_folded_teacher(request, form, init, want):
    """student.derived.lr_scale: auto resolves against the teacher: a depth student of a BN-folded
    teacher is fine-tuned at the lower scale (and the run says so); a number given is kept."""
    from dfkd_deploy.distill.trainer import kd_lr
    from dfkd_deploy.students.build import resolve_init

    teacher = request.getfixturevalue(form)
    r = load_recipe(None, {"student.init": init, "student.arch": "cifar_resnet8"})
    resolved, why = resolve_init(r, teacher)
    assert resolved.student.derived.lr_scale == want
    assert kd_lr(resolved) == pytest.approx(r.distillation.lr * want)
    assert ("lr_scale auto -> 0.03" in (why or "")) == (want == FOLDED_DEPTH_LR_SCALE)
    given = load_recipe(None, {"student.init": init, "student.arch": "cifar_resnet8", "student.derived.lr_scale": 0.5})
    assert resolve_init(given, teacher)[0].student.derived.lr_scale == 0.5
    with pytest.raises(Exception, match="lr_scale"):
        load_recipe(None, {"student.derived.lr_scale": 0})


@pytest.mark.parametrize("form,init,logits,want", [("zoo_teacher_fused", "auto", "recompute", FOLDED_DEPTH_FEATURES),
                                                   ("zoo_teacher_fused", "depth", "cached", 0.0),
                                                   ("zoo_teacher_fused", "prune", "recompute", 0.0),
                                                   ("zoo_teacher_legacy", "depth", "recompute", 0.0)])
def test_auto_features_match_stages_for_a_depth_student_of_a_folded_teacher(request, form, init, logits, want):
    """distillation.features: auto resolves against the teacher: feature matching is on for a
    depth student of a BN-folded teacher (and the run says so), off otherwise; a number given is kept."""
    import yaml

    from dfkd_deploy.distill.trainer import feature_weight
    from dfkd_deploy.students.build import resolve_init

    teacher = request.getfixturevalue(form)
    r = load_recipe(None, {"student.init": init, "student.arch": "cifar_resnet8",
                           "distillation.teacher_logits": logits})
    assert feature_weight(r) == 0.0   # unresolved auto trains without the term
    resolved, why = resolve_init(r, teacher)
    assert resolved.distillation.features == want and feature_weight(resolved) == want
    assert yaml.safe_load(resolved.resolved_yaml())["distillation"]["features"] == want
    assert ("features auto ->" in (why or "")) == (want > 0)
    given = load_recipe(None, {"student.init": init, "student.arch": "cifar_resnet8", "distillation.features": 0.5})
    assert resolve_init(given, teacher)[0].distillation.features == 0.5
    with pytest.raises(Exception, match="features"):
        load_recipe(None, {"distillation.features": -1})


@pytest.mark.parametrize("form,init,budget,want", [("zoo_teacher_fused", "auto", "30m", FOLDED_DEPTH_SHARE),
                                                   ("zoo_teacher_fused", "depth", None, FOLDED_DEPTH_SHARE),
                                                   ("zoo_teacher_fused", "prune", "30m", SYNTHESIS_SHARE),
                                                   ("zoo_teacher_legacy", "depth", "30m", SYNTHESIS_SHARE)])
def test_auto_synthesis_share_favours_kd_for_a_depth_student_of_a_folded_teacher(request, form, init, budget, want):
    """distillation.synthesis_share: auto resolves against the teacher: a depth student of a
    BN-folded teacher gives KD the larger share (said in the run output when there is a budget),
    any other student keeps the default split; a number given is kept, and the planner reads the
    resolved share (an unresolved auto plans with the default)."""
    import yaml

    from dfkd_deploy.budget.planner import synthesis_share
    from dfkd_deploy.students.build import resolve_init

    teacher = request.getfixturevalue(form)
    r = load_recipe(None, {"student.init": init, "student.arch": "cifar_resnet8", "budget": budget})
    assert r.distillation.synthesis_share == "auto" and synthesis_share(r) == SYNTHESIS_SHARE
    resolved, why = resolve_init(r, teacher)
    assert resolved.distillation.synthesis_share == want and synthesis_share(resolved) == want
    assert yaml.safe_load(resolved.resolved_yaml())["distillation"]["synthesis_share"] == want
    assert ("synthesis_share auto ->" in (why or "")) == (want == FOLDED_DEPTH_SHARE and budget is not None)
    given = load_recipe(None, {"student.init": init, "student.arch": "cifar_resnet8",
                               "distillation.synthesis_share": 0.6})
    assert resolve_init(given, teacher)[0].distillation.synthesis_share == 0.6
    for bad in (0, 1, 1.5):
        with pytest.raises(Exception, match="synthesis_share"):
            load_recipe(None, {"distillation.synthesis_share": bad})


@pytest.mark.parametrize("form,init,budget,want", [("zoo_teacher_fused", "auto", "30m", FOLDED_DEPTH_SYNTH_BATCH),
                                                   ("zoo_teacher_fused", "depth", None, SYNTHESIS_BATCH),
                                                   ("zoo_teacher_fused", "prune", "30m", SYNTHESIS_BATCH),
                                                   ("zoo_teacher_legacy", "depth", "30m", SYNTHESIS_BATCH)])
def test_auto_synthesis_batch_is_smaller_for_a_budgeted_depth_student_of_a_folded_teacher(request, form, init,
                                                                                            budget, want):
    """synthesis.batch_size: auto resolves against the teacher: a budgeted depth student of a
    BN-folded teacher synthesizes in rounds of FOLDED_DEPTH_SYNTH_BATCH (said in the run output),
    any other run in rounds of SYNTHESIS_BATCH, which is also what an unresolved auto reads as (a
    teacher-only synthesis, the memory check); a number given is kept; below 2 is refused."""
    import yaml

    from dfkd_deploy.recipe import synthesis_batch
    from dfkd_deploy.students.build import resolve_init

    teacher = request.getfixturevalue(form)
    r = load_recipe(None, {"student.init": init, "student.arch": "cifar_resnet8", "budget": budget})
    assert r.synthesis.batch_size == "auto" and synthesis_batch(r.synthesis) == SYNTHESIS_BATCH
    resolved, why = resolve_init(r, teacher)
    assert resolved.synthesis.batch_size == want and synthesis_batch(resolved.synthesis) == want
    assert yaml.safe_load(resolved.resolved_yaml())["synthesis"]["batch_size"] == want
    assert ("synthesis.batch_size auto -> 64" in (why or "")) == (want == FOLDED_DEPTH_SYNTH_BATCH)
    given = load_recipe(None, {"student.init": init, "student.arch": "cifar_resnet8", "budget": budget,
                               "synthesis.batch_size": 32})
    assert resolve_init(given, teacher)[0].synthesis.batch_size == 32
    for bad in (0, 1):
        with pytest.raises(Exception, match="batch_size"):
            load_recipe(None, {"synthesis.batch_size": bad})
