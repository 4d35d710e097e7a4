"""Attention transfer in KD (distillation.attention): where the maps are taken, the loss, the
trainer's use of it."""
import copy
import math

import pytest
import torch
from torch import nn

from dfkd_deploy.distill.attention import AttentionTransfer, _stage_ends, attention_map
from dfkd_deploy.models import build_model
from dfkd_deploy.recipe import load_recipe

from ..conftest import quick_recipe
from .test_trainer import _distiller


def test_stage_ends_of_a_cifar_resnet_are_its_three_stages():
    net = build_model("cifar_resnet20", num_classes=10)
    ends = _stage_ends(net, torch.randn(2, 3, 32, 32))
    assert ends == {(32, 32): (net.layer1, 0, 16), (16, 16): (net.layer2, 0, 32), (8, 8): (net.layer3, 0, 64)}


class _SharedRelu(nn.Module):
    """One ReLU module called twice at the same resolution: the second call ends the stage."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        self.first = self.relu(self.a(x))
        self.second = self.relu(self.b(self.first))
        return self.head(self.second.mean((2, 3)))


def test_a_module_called_twice_is_keyed_by_its_call():
    net = _SharedRelu()
    x = torch.randn(3, 3, 8, 8)
    assert _stage_ends(net, x) == {(8, 8): (net.relu, 1, 4)}
    at = AttentionTransfer(net, copy.deepcopy(net), x)
    with at.capture():
        net(x)
    assert torch.equal(at._t.out[(8, 8)], net.second)


def _forward(at, teacher, student, x):
    with at.capture():
        with torch.no_grad():
            teacher(x)
        student(x)


@pytest.mark.parametrize("term", ["loss", "feature_loss"])
def test_a_stage_term_is_zero_for_the_same_net_and_trains_only_the_student(term):
    torch.manual_seed(0)
    teacher = build_model("cifar_resnet20", num_classes=10).eval()
    student = build_model("cifar_resnet8", num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    at = AttentionTransfer(teacher, student, x[:2])
    assert at.resolutions == [(32, 32), (16, 16), (8, 8)]
    _forward(at, teacher, student, x)
    loss = getattr(at, term)()
    assert loss.item() > 0 and loss.requires_grad
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    twin = copy.deepcopy(teacher)
    at2 = AttentionTransfer(teacher, twin, x[:2])
    with torch.no_grad():
        _forward(at2, teacher, twin, x)
    assert getattr(at2, term)().item() == pytest.approx(0.0, abs=1e-12)


def test_attention_map_is_unit_norm_channel_mean_of_squares():
    f = torch.randn(2, 5, 4, 4)
    a = attention_map(f)
    assert a.shape == (2, 16)
    assert torch.allclose(a.norm(dim=1), torch.ones(2))
    want = f.pow(2).mean(1).flatten(1)
    assert torch.allclose(a, want / want.norm(dim=1, keepdim=True))


def test_an_mlp_and_a_cnn_share_no_resolution():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    at = AttentionTransfer(mlp, build_model("cifar_resnet8", num_classes=10), torch.randn(2, 3, 32, 32))
    assert not at.available and at.resolutions == []


def test_attention_needs_recomputed_teacher_logits():
    with pytest.raises(Exception, match="attention needs teacher_logits: recompute"):
        load_recipe(None, {"distillation.attention": 1000, "distillation.teacher_logits": "cached"})


def test_kd_with_attention_records_the_term(digits_teacher, tmp_path, capsys):
    recipe = quick_recipe(**{"distillation.attention": 1000.0, "distillation.epochs": 3})
    d = _distiller(digits_teacher, recipe, tmp_path)
    result = d.run()
    # said once; the digits CNN and tiny_cnn share both resolutions
    assert capsys.readouterr().out.count("attention transfer at 8x8, 4x4\n") == 1
    rows = [r for r in result.history if "kd_loss" in r]
    assert rows and all(math.isfinite(r["kd_loss"]) and r["kd_attention"] > 0 for r in rows)


def test_the_student_leaves_kd_without_attention_hooks(digits_teacher, tmp_path):
    recipe = quick_recipe(**{"distillation.attention": 1000.0, "distillation.epochs": 2})
    d = _distiller(digits_teacher, recipe, tmp_path)
    def hooks():   # (the teacher keeps the synthesizer's own BN hooks)
        return [sum(len(m._forward_hooks) for m in net.modules()) for net in (d.student, digits_teacher.module)]

    before = hooks()
    d.run()
    assert d.history[-1]["kd_attention"] > 0 and hooks() == before


# -- feature matching (distillation.features) ----------------------------------------------------

def test_feature_matching_only_where_the_shapes_are_equal():
    teacher = build_model("cifar_resnet20", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    same_widths = AttentionTransfer(teacher, build_model("cifar_resnet8", num_classes=10), x)
    assert same_widths.feature_resolutions == [(32, 32), (16, 16), (8, 8)]

    class _Narrow(nn.Module):   # 32x32 with 16 channels like the teacher, 16x16 with 8 (the teacher has 32)
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 3, stride=2, padding=1)
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            return self.head(self.b(torch.relu(self.a(x))).mean((2, 3)))

    narrow = AttentionTransfer(teacher, _Narrow(), x)
    assert narrow.resolutions == [(32, 32), (16, 16)] and narrow.feature_resolutions == [(32, 32)]


def test_feature_loss_is_the_squared_error_relative_to_the_teachers_mean_square():
    torch.manual_seed(0)
    teacher = build_model("cifar_resnet20", num_classes=10).eval()
    student = build_model("cifar_resnet8", num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    at = AttentionTransfer(teacher, student, x[:2])
    _forward(at, teacher, student, x)
    t, s = at._t.out, at._s.out
    want = sum(((s[r] - t[r]).pow(2).mean() / t[r].pow(2).mean()).item() for r in at.feature_resolutions)
    assert at.feature_loss().item() == pytest.approx(want, rel=1e-5)


def test_features_need_recomputed_teacher_logits():
    with pytest.raises(Exception, match="features needs teacher_logits: recompute"):
        load_recipe(None, {"distillation.features": 1, "distillation.teacher_logits": "cached"})


def test_feature_matching_with_no_stage_of_equal_shape_is_said_and_off(digits_teacher, tmp_path, capsys):
    recipe = quick_recipe(**{"distillation.features": 1.0, "distillation.epochs": 2})
    d = _distiller(digits_teacher, recipe, tmp_path)   # tiny_cnn is narrower than the digits teacher
    result = d.run()
    out = capsys.readouterr().out
    assert out.count("feature matching off: no stage end where teacher and student have the same shape\n") == 1
    assert all("kd_features" not in r and "kd_attention" not in r for r in result.history)


def test_kd_with_feature_matching_records_the_term_and_leaves_no_hooks(digits_teacher, digits_teacher_onnx,
                                                                      tmp_path, capsys):
    from dfkd_deploy.distill.trainer import Distiller
    from dfkd_deploy.run import make_synthesizer
    from dfkd_deploy.synthesis.pool import ImagePool
    from dfkd_deploy.teachers import load_teacher

    recipe = quick_recipe(**{"distillation.features": 1.0, "distillation.epochs": 3})
    student = load_teacher(digits_teacher_onnx).module.train()   # a second copy: every stage has the teacher's shape
    with torch.no_grad():
        for p in student.parameters():
            p.requires_grad_(True)
            p.add_(0.1 * torch.randn_like(p))
    d = Distiller(digits_teacher.module, digits_teacher.normalizer(), student,
                  make_synthesizer(digits_teacher, recipe, "cpu"), ImagePool(tmp_path / "pool"), recipe, tmp_path,
                  "cpu", show_progress=False)

    def hooks():   # (the teacher keeps the synthesizer's own BN hooks)
        return [sum(len(m._forward_hooks) for m in net.modules()) for net in (student, digits_teacher.module)]

    before = hooks()
    result = d.run()
    assert capsys.readouterr().out.count("feature matching at 8x8, 4x4\n") == 1
    rows = [r for r in result.history if "kd_loss" in r]
    assert rows and all(math.isfinite(r["kd_loss"]) and r["kd_features"] > 0 for r in rows)
    assert "kd_attention" not in rows[-1]
    assert hooks() == before
