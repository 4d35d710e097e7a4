"""Tiny teachers for the derived-student tests: a zoo CIFAR ResNet-14 (random weights, BN
statistics randomised so BN matters) as a state_dict, and the digits teacher as ONNX with BN
kept and with BN fused by the dynamo exporter, and the ResNet-14 as ONNX both ways."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def zoo_teacher(tmp_path_factory):
    from dfkd_deploy.models import build_model
    from dfkd_deploy.recipe import TeacherOptions
    from dfkd_deploy.teachers import load_teacher
    from tests.teachers.onnx_fixtures import randomise_bn

    torch.manual_seed(0)
    model = build_model("cifar_resnet14", num_classes=10, in_channels=3, input_size=(16, 16))
    randomise_bn(model)
    path = tmp_path_factory.mktemp("zoo") / "resnet14.pt"
    torch.save(model.state_dict(), path)
    return load_teacher(path, TeacherOptions(arch="cifar_resnet14", input_shape=(3, 16, 16)))


@pytest.fixture(scope="session")
def digits_teacher_fused(tmp_path_factory, digits_teacher_onnx):
    """The digits teacher exported again by the dynamo exporter (BN folded into the convs)."""
    from dfkd_deploy import stages
    from dfkd_deploy.recipe import load_recipe
    from dfkd_deploy.teachers import load_teacher

    out = tmp_path_factory.mktemp("fused") / "digits-dynamo.onnx"
    stages.export_teacher(digits_teacher_onnx, load_recipe(None), out, exporter="dynamo")
    teacher = load_teacher(out)
    assert teacher.spec.bn_layers == 0
    return teacher


def export_zoo_teacher(tmp_path_factory, zoo_teacher, exporter: str):
    """The zoo ResNet-14 teacher written to ONNX by ``exporter`` and loaded back."""
    from dfkd_deploy import stages
    from dfkd_deploy.recipe import load_recipe
    from dfkd_deploy.teachers import load_teacher

    src = tmp_path_factory.mktemp(f"zoo-{exporter}") / "resnet14.pt"
    torch.save(zoo_teacher.module.model.state_dict(), src)
    out = src.with_name(f"resnet14-{exporter}.onnx")
    stages.export_teacher(src, load_recipe(None, {"teacher.arch": "cifar_resnet14", "teacher.input_shape": [3, 16, 16]}),
                          out, exporter=exporter)
    return load_teacher(out)


@pytest.fixture(scope="session")
def zoo_teacher_fused(tmp_path_factory, zoo_teacher):
    """The zoo CIFAR ResNet-14 exported by the dynamo exporter: BN folded into the convs, its
    option-A shortcuts (stride-2 slicing, zero channel padding) as ONNX Slice/Pad nodes."""
    teacher = export_zoo_teacher(tmp_path_factory, zoo_teacher, "dynamo")
    assert teacher.spec.bn_layers == 0
    return teacher


@pytest.fixture(scope="session")
def zoo_teacher_legacy(tmp_path_factory, zoo_teacher):
    """The zoo ResNet-14 exported by the legacy exporter: BN kept, as its own ONNX nodes."""
    teacher = export_zoo_teacher(tmp_path_factory, zoo_teacher, "legacy")
    assert teacher.spec.bn_layers > 0
    return teacher
