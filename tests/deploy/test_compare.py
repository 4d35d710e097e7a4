import numpy as np

from dfkd_deploy.deploy.compare import (TOLERANCES, Backend, Dataset, all_passed, compare_backends,
                                          comparison_markdown)

W = np.random.default_rng(0).standard_normal((12, 5)).astype(np.float32)


def _ref(x):
    return x.reshape(len(x), -1) @ W


def test_presets_and_table():
    x = np.random.default_rng(1).standard_normal((40, 3, 2, 2)).astype(np.float32)
    labels = _ref(x).argmax(1)

    def flip_half(x):   # an int8 back end that gets half the decisions wrong
        out = _ref(x)
        out[::2] = -out[::2]
        return out

    others = [Backend("same", "fp32", _ref),
              Backend("noisy", "fp32", lambda x: _ref(x) + 1e-3),
              Backend("fp16ish", "fp16", lambda x: _ref(x) * (1 + 1e-3)),
              Backend("int8ok", "int8", lambda x: _ref(x) + 0.05),
              Backend("int8bad", "int8", flip_half),
              Backend("broken", "fp32", lambda x: 1 / 0)]
    rows = compare_backends(Backend("torch", "fp32", _ref), others, [Dataset("probes", x, labels)])
    got = {r.backend: r.passed for r in rows}
    assert got == {"torch": None, "same": True, "noisy": False, "fp16ish": True, "int8ok": True,
                   "int8bad": False, "broken": False}
    assert rows[0].accuracy == 1.0 and not all_passed(rows)
    table = comparison_markdown(rows).splitlines()
    assert len(table) == 2 + len(rows)
    assert all(line.count("|") == 10 for line in table)   # no stray pipes break the table
    assert "FAIL" in table[-1] and "ZeroDivisionError" in table[-1]
    assert TOLERANCES["int8"].min_agreement == 0.9


def test_run_report_comparison(deploy_run):
    comp = deploy_run.report["comparison"]
    names = {(r["backend"], r["precision"], r["data"].split(" (")[0]) for r in comp["rows"]}
    assert ("onnxruntime", "fp32", "synthetic probes") in names and ("onnxruntime", "int8", "eval data") in names
    fp32 = [r for r in comp["rows"] if r["backend"] == "onnxruntime" and r["precision"] == "fp32"]
    assert all(r["passed"] for r in fp32)
    md = (deploy_run.run_dir / "report.md").read_text()
    assert "## Back-end comparison" in md and "## Latency and size" in md


def test_run_report_latency_and_size(deploy_run):
    r = deploy_run.report
    lat, size = r["latency"], r["size"]
    for who in ("teacher", "student", "student_int8"):
        assert lat[who]["batch_1_ms"] > 0 and lat[who]["batch_32_ms"] > 0
    assert lat["teacher_source"] == "file" and lat["speedup_batch_1"] is not None
    assert size["student_params"] < size["teacher_params"] and size["student_bytes"] > 0


def test_latency_exports_torch_teacher(tmp_path):
    import torch

    from dfkd_deploy.teachers.spec import Teacher, TeacherModule, TeacherSpec
    from dfkd_deploy.deploy.latency import latency_and_size
    from exporters.onnx_export import export_student_onnx

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    teacher = Teacher(TeacherModule(net), TeacherSpec("state_dict", "t.pt", (1, 4, 4), num_classes=3))
    student = export_student_onnx(net, tmp_path / "s.onnx", input_shape=(1, 4, 4)).path
    out = latency_and_size(teacher, student, student_params=51, teacher_params=51, repeats=1, warmup=0)
    assert out["latency"]["teacher_source"] == "exported" and out["latency"]["teacher"]["batch_32_ms"] > 0
    assert out["size"]["teacher_bytes"] > 0
