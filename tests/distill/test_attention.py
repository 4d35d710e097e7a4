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
    assert ends == {(32, 32): (net.layer1, 0), (16, 16): (net.layer2, 0), (8, 8): (net.layer3, 0)}


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
    assert _stage_ends(net, x) == {(8, 8): (net.relu, 1)}
    at = AttentionTransfer(net, copy.deepcopy(net), x)
    with at.capture():
        net(x)
    assert torch.equal(at._t.out[(8, 8)], net.second)


def test_loss_is_zero_for_the_same_net_and_trains_only_the_student():
    torch.manual_seed(0)
    teacher = build_model("cifar_resnet20", num_classes=10).eval()
    student = build_model("cifar_resnet8", num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    at = AttentionTransfer(teacher, student, x[:2])
    assert at.resolutions == [(32, 32), (16, 16), (8, 8)]
    with at.capture():
        with torch.no_grad():
            teacher(x)
        student(x)
    loss = at.loss()
    assert loss.item() > 0 and loss.requires_grad
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    twin = copy.deepcopy(teacher)
    at2 = AttentionTransfer(teacher, twin, x[:2])
    with at2.capture():
        with torch.no_grad():
            teacher(x)
            twin(x)
    assert at2.loss().item() == pytest.approx(0.0, abs=1e-12)


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
