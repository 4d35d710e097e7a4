"""``student.init: depth``: the chosen teacher blocks are copied exactly, block 0 always kept."""
from __future__ import annotations

import pytest
import torch

from dfkd_deploy.students import build
from dfkd_deploy.students.depth import block_map, choose_blocks, recalibrate_bn, shallower
from dfkd_deploy.recipe import load_recipe


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
