"""The student's input contract: written into student.onnx, read by validate and bundle verify;
channel order as a teacher convention (detected, recorded, applied to real images)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from dfkd_deploy import __version__
from dfkd_deploy.cli import cli
from dfkd_deploy.core.io import sha256_file
from dfkd_deploy.recipe import TeacherOptions
from dfkd_deploy.stages import check_contract
from dfkd_deploy.teachers import load_teacher
from dfkd_deploy.teachers.conventions import order_from_mean, resolve_channel_order
from dfkd_deploy.validate.data import load_eval_data
from exporters.metadata import PREFIX, StudentContract, contract_differences, read_contract, write_contract

CAFFE_MEAN_255 = [103.939, 116.779, 123.68]   # BGR


def test_student_onnx_carries_the_teachers_contract(report_run, digits_teacher_onnx):
    contract = read_contract(report_run.run_dir / "student.onnx")
    t = report_run.report["teacher"]
    assert contract.layout == t["layout"] and contract.channel_order == t["channel_order"]
    assert contract.value_range == t["value_range"] and contract.mean == t["mean"] and contract.std == t["std"]
    assert contract.input_shape == t["input_shape"] and contract.num_classes == t["num_classes"]
    assert contract.teacher_sha256 == sha256_file(digits_teacher_onnx)
    assert contract.version == __version__
    # the bundle's copy is the same file, so it carries it too
    assert read_contract(report_run.run_dir / "bundle" / "student.onnx") == contract
    assert "carries this contract" in (report_run.run_dir / "bundle" / "README.md").read_text()


def test_write_contract_keeps_other_metadata_and_replaces_its_own(tmp_path):
    path = tmp_path / "m.onnx"
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    model = helper.make_model(graph)
    onnx.helper.set_model_props(model, {"author": "someone", PREFIX + "mean": "[9]"})
    onnx.save(model, path)
    write_contract(path, StudentContract(layout="NHWC", channel_order="BGR", mean=[1.0, 2.0, 3.0]))
    props = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert props["author"] == "someone" and json.loads(props[PREFIX + "mean"]) == [1.0, 2.0, 3.0]
    assert read_contract(path) == StudentContract(layout="NHWC", channel_order="BGR", mean=[1.0, 2.0, 3.0])
    assert PREFIX + "std" not in props   # unknown values are left out, not written as null


def test_contract_differences_treat_none_as_identity():
    a = StudentContract(layout="NCHW", input_shape=[3, 8, 8], mean=None, std=[1.0, 1.0, 1.0])
    assert contract_differences(a, StudentContract(layout="NCHW", mean=[0.0, 0.0, 0.0])) == []
    diffs = contract_differences(a, StudentContract(layout="NHWC", mean=[0.5, 0.5, 0.5], channel_order="BGR"))
    assert [d.split(":")[0] for d in diffs] == ["layout", "channel_order", "mean"]


def test_validate_warns_in_one_line_when_the_teacher_resolves_differently(report_run, digits_teacher, capsys):
    student = report_run.run_dir / "student.onnx"
    assert check_contract(student, digits_teacher.spec) == []
    assert capsys.readouterr().err == ""
    # as `validate student.onnx --teacher ...` would resolve a teacher given other overrides
    other = dataclasses.replace(digits_teacher.spec, mean=(0.1307,), std=(0.3081,))
    diffs = check_contract(student, other)
    err = capsys.readouterr().err
    assert [d.split(":")[0] for d in diffs] == ["mean", "std"]
    assert err.count("\n") == 1 and err.startswith("warning: student.onnx was made for")
    assert "--set teacher.mean=null --set teacher.std=null" in err
    # student.pt records its teacher spec: the same check
    assert check_contract(report_run.run_dir / "student.pt", other) == diffs


def test_bundle_verify_on_a_run_directory_points_to_its_bundle(report_run):
    r = CliRunner().invoke(cli, ["bundle", "verify", str(report_run.run_dir)])
    assert r.exit_code == 2
    assert str(report_run.run_dir / "bundle") in r.output and "KeyError" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    ok = CliRunner().invoke(cli, ["bundle", "verify", str(report_run.run_dir / "bundle")])
    assert ok.exit_code == 0 and "matches the manifest" in ok.output, ok.output
    manifest = json.loads((report_run.run_dir / "bundle" / "manifest.json").read_text())
    assert manifest["normalisation"]["channel_order"] == "RGB"


# --- channel order ------------------------------------------------------------------------------

def test_order_from_mean():
    assert order_from_mean([v / 255 for v in CAFFE_MEAN_255])[0] == "BGR"
    assert order_from_mean([0.485, 0.456, 0.406])[0] == "RGB"
    assert order_from_mean([0.5, 0.5, 0.5]) is None and order_from_mean([0.13]) is None


def test_recipe_channel_order_wins_with_a_note():
    notes: list[str] = []
    order, source = resolve_channel_order("RGB", None, [v / 255 for v in CAFFE_MEAN_255], 3, notes)
    assert (order, source) == ("RGB", "recipe (teacher.channel_order)") and "BGR" in notes[0]
    order, source = resolve_channel_order(None, None, None, 3, [])
    assert order == "RGB" and source.startswith("default")


def _caffe_teacher(path):
    """3x8x8 NCHW float input, a caffe-style BGR mean subtracted in the graph, then a linear classifier."""
    rng = np.random.default_rng(0)
    mean = numpy_helper.from_array(np.asarray(CAFFE_MEAN_255, np.float32).reshape(1, 3, 1, 1), "mean")
    w = numpy_helper.from_array(rng.normal(size=(192, 4)).astype(np.float32) / 100, "w")
    b = numpy_helper.from_array(np.zeros(4, np.float32), "b")
    nodes = [helper.make_node("Sub", ["input", "mean"], ["centred"]),
             helper.make_node("Flatten", ["centred"], ["flat"]),
             helper.make_node("Gemm", ["flat", "w", "b"], ["logits"])]
    graph = helper.make_graph(nodes, "caffe", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], [mean, w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8   # one every onnxruntime the project supports reads
    onnx.save(model, path)
    return path


def test_bgr_mean_in_the_graph_makes_a_bgr_teacher(tmp_path):
    spec = load_teacher(_caffe_teacher(tmp_path / "caffe.onnx")).spec
    assert spec.channel_order == "BGR" and spec.sources["channel_order"].startswith("detected")
    assert any("BGR" in n for n in spec.notes)
    forced = load_teacher(tmp_path / "caffe.onnx", TeacherOptions(channel_order="RGB")).spec
    assert forced.channel_order == "RGB" and forced.sources["channel_order"].startswith("recipe")


def test_eval_images_are_flipped_to_a_bgr_teachers_order(tmp_path):
    images = np.zeros((2, 4, 4, 3), np.uint8)
    images[..., 0] = 200   # red
    np.savez(tmp_path / "e.npz", images=images, labels=np.array([0, 1]))
    rgb = load_eval_data(tmp_path / "e.npz", input_shape=(3, 4, 4))
    bgr = load_eval_data(tmp_path / "e.npz", input_shape=(3, 4, 4), channel_order="BGR")
    assert rgb.images[:, 0].min() == 200 and bgr.images[:, 2].min() == 200 and bgr.images[:, 0].max() == 0
    grey = load_eval_data(tmp_path / "e.npz", input_shape=(1, 4, 4), channel_order="BGR")
    assert grey.images.shape == (2, 1, 4, 4)


def test_validate_command_warns_when_the_overrides_are_missing(report_run, digits_teacher_onnx):
    """The issue's case the other way round: a student made without normalisation, validated with a
    teacher resolved with one; the figures still come, after a one-line warning."""
    r = CliRunner().invoke(cli, ["validate", str(report_run.run_dir / "student.onnx"), "--teacher",
                                 str(digits_teacher_onnx), "--probes", "16", "--set", "teacher.mean=[0.5]",
                                 "--set", "teacher.std=[0.25]"])
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "mean: student none, teacher [0.5]" in warnings[0]
    assert "probe_agreement" in r.output
