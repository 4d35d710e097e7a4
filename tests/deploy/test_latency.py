"""Latency and size: teacher (its ONNX file, or exported here) vs the student files, on ORT CPU."""
import numpy as np
import pytest
import torch

from dfkd_deploy.deploy.latency import latency_and_size
from dfkd_deploy.report.deploy_md import latency_markdown
from dfkd_deploy.runtime.onnxruntime import OrtRunner
from dfkd_deploy.teachers.spec import Teacher, TeacherModule, TeacherSpec
from exporters.onnx_export import export_student_onnx


def test_run_report_latency_and_size(deploy_run):
    r = deploy_run.report
    lat, size = r["latency"], r["size"]
    for who in ("teacher", "student", "student_int8"):
        assert lat[who]["batch_1_ms"] > 0 and lat[who]["batch_32_ms"] > 0
    assert lat["teacher_source"] == "file" and lat["speedup_batch_1"] is not None
    assert set(lat) == {"provider", "warmup", "repeats", "batches", "teacher", "student", "student_int8",
                        "teacher_source", "teacher_reason", "backends", "speedup_batch_1", "speedup_batch_32"}
    assert size["student_params"] < size["teacher_params"] and size["student_bytes"] > 0
    assert isinstance(lat["backends"], list)   # edge runtimes (tests/deploy/test_edge.py checks their rows)
    assert size["param_ratio"] == round(size["teacher_params"] / size["student_params"], 3)


class _Hooked(torch.nn.Module):
    """A teacher as synthesis leaves it: a forward hook holding a graph tensor, which makes the
    module impossible to deep-copy (copy.deepcopy raises RuntimeError)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        self.held = None
        self.net[1].register_forward_hook(self._hold)

    def _hold(self, module, inputs, output):
        self.held = output * 2   # not a graph leaf

    def forward(self, x):
        return self.net(x)


def _teacher(net):
    return Teacher(TeacherModule(net), TeacherSpec("state_dict", "t.pt", (1, 4, 4), num_classes=3))


def test_latency_exports_torch_teacher(tmp_path):
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    student = OrtRunner(export_student_onnx(net, tmp_path / "s.onnx", input_shape=(1, 4, 4)).path)
    out = latency_and_size(_teacher(net), student, student_params=51, teacher_params=51, repeats=1, warmup=0)
    lat = out.latency.to_dict()
    assert lat["teacher_source"] == "exported" and lat["teacher"]["batch_32_ms"] > 0
    assert out.size.to_dict()["teacher_bytes"] > 0
    assert "exported to a temporary ONNX file" in latency_markdown(lat, out.size.to_dict())


def test_latency_of_a_teacher_that_cannot_be_deep_copied(tmp_path):
    hooked = _Hooked().train()
    hooked(torch.zeros(1, 1, 4, 4, requires_grad=True))   # the hook now holds a non-leaf tensor
    teacher = _teacher(hooked)
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    student = OrtRunner(export_student_onnx(plain, tmp_path / "s.onnx", input_shape=(1, 4, 4)).path)
    out = latency_and_size(teacher, student, student_params=51, teacher_params=51, repeats=1, warmup=0)
    lat = out.latency.to_dict()
    assert lat["teacher_reason"] is None, lat["teacher_reason"]
    assert lat["teacher_source"] == "exported" and lat["teacher"]["batch_1_ms"] > 0
    assert hooked.training   # the caller's teacher keeps its mode


def test_teacher_that_fails_to_export_is_reported_not_fatal(tmp_path):
    class Unexportable(torch.nn.Module):
        def forward(self, x):
            return torch.from_numpy(np.zeros((len(x), 3), np.float32))   # leaves the graph

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    student = OrtRunner(export_student_onnx(net, tmp_path / "s.onnx", input_shape=(1, 4, 4)).path)
    out = latency_and_size(_teacher(Unexportable()), student, student_params=51, teacher_params=0,
                           repeats=1, warmup=0)
    lat = out.latency.to_dict()
    assert lat["teacher"] is None and lat["teacher_source"] is None and lat["teacher_reason"]
    assert lat["speedup_batch_1"] is None and "Teacher not timed" in latency_markdown(lat, out.size.to_dict())


def _save_teacher(kind: str, model: torch.nn.Module, path):
    x = torch.randn(2, 1, 8, 8)
    if kind == "state_dict":
        torch.save(model.state_dict(), path)
    elif kind == "pickle":
        torch.save(model, path)
    elif kind == "torchscript":
        torch.jit.save(torch.jit.trace(model, x), str(path))
    else:   # a torch.export program with a dynamic batch
        torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)), str(path))
    return path


@pytest.mark.parametrize("kind", ["state_dict", "pickle", "torchscript", "exported"])
def test_every_torch_teacher_kind_is_timed(kind, tmp_path):
    """Each torch format the loader takes is exported for timing, with synthesis-style hooks on it."""
    from dfkd_deploy.models import build_model
    from dfkd_deploy.recipe import TeacherOptions
    from dfkd_deploy.teachers import load_teacher

    torch.manual_seed(0)
    model = build_model("tiny_cnn", num_classes=4, in_channels=1, input_size=(8, 8)).eval()
    path = _save_teacher(kind, model, tmp_path / f"teacher.{'pt2' if kind == 'exported' else 'pt'}")
    teacher = load_teacher(path, TeacherOptions(arch="tiny_cnn", input_shape=(1, 8, 8), num_classes=4),
                           trust_pickle=kind in ("pickle", "torchscript"))
    held = []
    for m in teacher.module.modules():   # hooks holding graph tensors, as the BN-statistics loss leaves them
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda mod, i, o: held.append(o * 1))
    teacher.module(torch.zeros(1, 1, 8, 8, requires_grad=True))
    student = OrtRunner(export_student_onnx(build_model("tiny_cnn", num_classes=4, in_channels=1, input_size=(8, 8)),
                                            tmp_path / "s.onnx", input_shape=(1, 8, 8)).path)
    lat = latency_and_size(teacher, student, student_params=1, teacher_params=1, repeats=1, warmup=0).latency
    assert lat.teacher_reason is None, lat.teacher_reason
    assert lat.teacher_source == "exported" and lat.teacher["batch_32_ms"] > 0
