"""The coverage matrix (tools/onnx_coverage.py): the zoo exported through every producer,
tf2onnx-pattern graphs, the onnx package's light models, and the refusals; plus the table in
docs/teachers.md that the full matrix writes."""
from __future__ import annotations

import re
from pathlib import Path

import onnx
import pytest

from dfkd_deploy.teachers import converters
from tools import onnx_coverage as coverage

DOC = Path(__file__).resolve().parents[2] / "docs" / "teachers.md"


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    cases = coverage.zoo_cases(quick=True) + coverage.extra_cases(quick=True)
    return [coverage.run_case(c, tmp_path_factory.mktemp("case")) for c in cases]


def pick(rows, model_part, producer_part, opset=None):
    found = [r for r in rows if model_part in r.model and producer_part in r.producer
             and (opset is None or r.opset == opset)]
    assert found, (model_part, producer_part, opset)
    return found


def test_every_file_converts_or_is_refused_as_expected(rows):
    unexpected = [(r.model, r.producer, r.opset, r.message) for r in rows if not r.as_expected]
    assert unexpected == []
    for r in rows:
        if r.converted:
            assert r.max_abs_diff is not None and r.max_abs_diff < 1e-4, (r.model, r.producer, r.max_abs_diff)
    assert not any(r.not_written for r in rows)


def test_dynamo_exports_have_bn_folded_and_load_bn_free(rows):
    for r in pick(rows, "cifar_resnet8", "dynamo"):
        assert r.converted and r.bn_nodes == 0 and r.bn_layers == 0 and r.opset >= 18
    legacy = pick(rows, "cifar_resnet8", "BN kept", opset=17)[0]
    assert legacy.bn_nodes == 7 and legacy.bn_layers == 7
    folded = pick(rows, "cifar_resnet8", "legacy, constant folding", opset=17)[0]
    assert folded.bn_nodes == 0 and folded.bn_layers == 0


def test_nhwc_softmax_and_tf2onnx_conventions_detected(rows):
    nhwc = pick(rows, "cifar_resnet8", "NHWC")[0]
    assert (nhwc.layout, nhwc.output, nhwc.input_shape) == ("NHWC", "probabilities", (3, 32, 32))
    for r in pick(rows, "Keras-style", "tf2onnx pattern"):
        # Rescaling(1/255) in the graph: raw pixels in [0, 255]; grey, non-square, NHWC.
        assert (r.layout, r.value_range, r.output, r.input_shape) == ("NHWC", 255.0, "probabilities", (1, 28, 36))


def test_refusals_name_op_node_and_opset_in_one_line(rows):
    expected = {"quantized": ("ConvInteger", "conv_integer", "not one dfkd_deploy dequantizes"),
                "Shrink": ("Shrink", "shrink_0", "re-export"), "If": ("If", "branch", "control flow")}
    for key, (op, node, advice) in expected.items():
        r = pick(rows, key, "onnx.helper")[0]
        assert not r.converted and r.expect_refusal
        assert f"cannot convert the {op} op (node '{node}', opset 17)" in r.message and advice in r.message
        assert "\n" not in r.message


def test_light_model_converts_with_parity(tmp_path):
    """A real caffe2-zoo graph (224x224, fixed batch 1, weights made by ConstantOfShape nodes)
    with seeded random weights; the other eight are in the docs table (the full matrix)."""
    row = coverage.run_case(coverage.light_cases(("light_squeezenet",))[0], tmp_path)
    assert row.converted, row.message
    assert row.max_abs_diff < 1e-4 and row.output == "probabilities" and row.input_shape == (3, 224, 224)


@pytest.mark.parametrize("name", coverage.LIGHT)
def test_every_light_model_has_a_converter_for_every_node(name):
    model = onnx.load(str(coverage.light_dir() / f"{name}.onnx"))
    assert converters.unsupported_nodes(model) == []


def test_docs_table_covers_every_producer_and_light_model():
    text = DOC.read_text()
    assert coverage.TABLE_BEGIN in text and coverage.TABLE_END in text
    table = text.split(coverage.TABLE_BEGIN, 1)[1].split(coverage.TABLE_END, 1)[0]
    lines = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| model")]
    for name in coverage.LIGHT:
        row = next(ln for ln in lines if ln.startswith(f"| {name.replace('light_', '')} |"))
        assert "| converted |" in row
        diff = float(row.split("|")[7])
        assert diff < 1e-4
    for producer in ("dynamo, as torch.onnx.export writes it", "legacy, BN kept", "legacy, constant folding",
                     "NHWC input + Softmax head", "tf2onnx pattern"):
        assert any(producer in ln and "| converted |" in ln for ln in lines), producer
    assert not any("**refused**" in ln for ln in lines)
    footer = re.search(r"(\d+) unexpected results", table)
    assert footer and footer.group(1) == "0"


def test_int8_rows_record_format_weights_and_agreement(tmp_path):
    """onnxruntime's own quantizer, QOperator per channel and QDQ per tensor: the rows say what
    the loader found and the int8 parity (top-1 agreement with the int8 session)."""
    rows = [coverage.run_case(c, tmp_path / str(i)) for i, c in enumerate(coverage.int8_cases(quick=True))]
    assert [(r.int8["format"], r.int8["per_channel"]) for r in rows] == [("QOperator", True), ("QDQ", False)]
    for r in rows:
        assert r.converted, r.message
        assert r.int8["agreement_probes"] >= 0.95 and r.int8["agreement_smooth"] >= 0.95
        assert r.int8["images"] > 0 and r.max_abs_diff is not None
        assert r.int8["classes_probes"] >= 3 and r.int8["classes_smooth"] >= 1   # agreement that means something
    table = coverage.int8_table(rows)
    assert table.count("| converted | QOperator | per channel |") == 1 and "| converted | QDQ | per tensor |" in table


def test_docs_int8_table_is_generated_and_covers_both_formats_and_the_shared_files():
    text = DOC.read_text()
    assert coverage.INT8_BEGIN in text and coverage.INT8_END in text
    table = text.split(coverage.INT8_BEGIN, 1)[1].split(coverage.INT8_END, 1)[0]
    lines = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| file")]
    for fmt in ("QOperator", "QDQ"):
        for weights in ("per tensor", "per channel"):
            assert any(f"| converted | {fmt} | {weights} |" in ln for ln in lines), (fmt, weights)
    for name in coverage.SHARED_INT8:
        assert any(ln.startswith(f"| `{name}` |") and "| converted |" in ln for ln in lines), name
    footer = re.search(r"(\d+) unexpected results", table)
    assert footer and footer.group(1) == "0"
