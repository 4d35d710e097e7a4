"""``student.init: prune`` on a zoo teacher (CIFAR ResNet, option-A shortcuts: inner mode) and on
onnx2torch teachers with BN kept and BN fused: the params target is met and the graph still runs."""
from __future__ import annotations

import pytest
import torch

from dfkd_deploy.students import build
from dfkd_deploy.students.prune import PruneError, check_forward
from dfkd_deploy.students.targets import count_params
from dfkd_deploy.recipe import load_recipe


def _prune_recipe(target="params=0.3", **derived):
    return load_recipe(None, {"student.init": "prune", "student.target": target,
                              **{f"student.derived.{k}": v for k, v in derived.items()}})


def _check(built, teacher, fraction):
    spec = teacher.spec
    assert count_params(built.module) <= fraction * count_params(teacher.module)
    assert built.info["target_met"] is True
    x = torch.rand(3, *spec.input_shape)
    with torch.no_grad():
        out = built.module.eval()(x)
    assert out.shape == (3, spec.num_classes) and torch.isfinite(out).all()
    assert built.description["layers"], "a pruned student records its thinner layers"


def test_prune_zoo_resnet_inside_blocks(zoo_teacher):
    built = build(_prune_recipe(), zoo_teacher, measure_latency=False)
    _check(built, zoo_teacher, 0.3)
    assert built.info["prune"]["mode"] == "inner" and built.arch == "cifar_resnet14-pruned"
    # the residual stream keeps its width: only the blocks' conv1 outputs (= conv2 inputs) shrink
    teacher_convs = dict(zoo_teacher.module.model.named_modules())
    for name, m in built.module.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            t = teacher_convs[name]
            if name.endswith("conv1") and name.startswith("layer"):
                assert m.out_channels < t.out_channels
            else:
                assert m.out_channels == t.out_channels


@pytest.mark.parametrize("importance", ["magnitude", "bn_scale", "taylor"])
def test_prune_onnx_teacher_bn_kept(digits_teacher, importance):
    images = lambda n: torch.randn(n, *digits_teacher.spec.input_shape)  # noqa: E731 - stand-in synthesized batch
    built = build(_prune_recipe(prune_importance=importance, images=16), digits_teacher, images=images,
                  measure_latency=False)
    _check(built, digits_teacher, 0.3)
    assert built.info["prune"]["importance"] == importance and built.info["prune"]["mode"] == "all"


def test_prune_onnx_teacher_bn_fused(digits_teacher_fused):
    built = build(_prune_recipe("params=0.4"), digits_teacher_fused, measure_latency=False)
    _check(built, digits_teacher_fused, 0.4)


def test_prune_to_a_macs_target(digits_teacher):
    built = build(_prune_recipe("macs=0.5"), digits_teacher, measure_latency=False)
    r = built.info["size"]["ratio"]
    assert r["macs"] <= 0.5 and built.info["target_met"] is True


def test_a_graph_that_no_longer_runs_names_the_layer_and_suggests_scratch():
    class Fixed(torch.nn.Module):      # a hard-coded flatten size, as a fixed Reshape would
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
            self.reshape = Reshape()
            self.linear = torch.nn.Linear(4 * 8 * 8, 10)

        def forward(self, x):
            return self.linear(self.reshape(self.conv(x)))

    class Reshape(torch.nn.Module):
        def forward(self, x):
            return x.reshape(x.shape[0], 4 * 8 * 8)

    model = Fixed()
    model.conv = torch.nn.Conv2d(1, 3, 3, padding=1)   # what a pruner unaware of the reshape leaves
    with pytest.raises(PruneError, match=r"at layer 'reshape'.*student.init: scratch"):
        check_forward(model, torch.zeros(1, 1, 8, 8), 10)


def test_prune_refuses_an_arch(digits_teacher):
    from dfkd_deploy.core.errors import UsageError

    r = load_recipe(None, {"student.init": "prune", "student.arch": "tiny_cnn"})
    with pytest.raises(UsageError, match="leave student.arch unset"):
        build(r, digits_teacher, measure_latency=False)


def test_prune_round_to_keeps_multiples_of_eight_and_meets_the_target(zoo_teacher):
    """round_to rounds each pruned layer's kept channels *up* to a multiple (Torch-Pruning's own
    rounds down, which at high ratios leaves thin layers unpruned): the target is still met."""
    built = build(_prune_recipe("params=0.5", round_to=8), zoo_teacher, measure_latency=False)
    _check(built, zoo_teacher, 0.5)
    assert built.info["prune"]["round_to"] == 8
    teacher_convs = dict(zoo_teacher.module.model.named_modules())
    pruned = [(n, m.out_channels) for n, m in built.module.named_modules()
              if isinstance(m, torch.nn.Conv2d) and n.startswith("layer") and n.endswith("conv1")]
    assert pruned and all(c % 8 == 0 and 8 <= c < teacher_convs[n].out_channels for n, c in pruned), pruned


def test_prune_a_bn_fused_resnet_export_inside_its_blocks(zoo_teacher_fused):
    """Torch-Pruning's dependency graph cannot follow the residual stream of a converted CIFAR
    ResNet (its channel-padding shortcuts; an IndexError inside the pruner on the real ResNet-56
    export), so the prune falls back to the convs inside the blocks, found in the fx graph."""
    from dfkd_deploy.students.build import _prune_source
    from dfkd_deploy.students.prune import graph_inner_layers

    source, _, _ = _prune_source(zoo_teacher_fused)
    assert len(graph_inner_layers(source)) == 6           # ResNet-14: 3 stages x 2 blocks, conv1 of each
    built = build(_prune_recipe("params=0.5"), zoo_teacher_fused, measure_latency=False)
    _check(built, zoo_teacher_fused, 0.5)
    assert built.info["prune"]["mode"] == "inner"
