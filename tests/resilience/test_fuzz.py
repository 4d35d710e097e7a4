"""Bad input never crashes unhandled: property-based tests (hypothesis) on the recipe loader and
the teacher loader. Every case either loads or ends in a DfkdError; through the CLI, exit code 2
and one ``error:`` line, never a traceback or the exit 1 of an internal error.

Examples are derandomized (the same in every CI run) and few, so the file takes seconds; for a
longer hunt: ``HYPOTHESIS_PROFILE=fuzz pytest tests/resilience/test_fuzz.py`` (random, 500 each).
"""
from __future__ import annotations

import io
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dfkd_deploy.cli import cli
from dfkd_deploy.core.errors import DfkdError, RecipeError
from dfkd_deploy.recipe import load_recipe
from dfkd_deploy.teachers import load_teacher

from ..conftest import quick_recipe

settings.register_profile("ci", max_examples=25, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("fuzz", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _scratch(suffix: str, data: bytes) -> Path:
    fd, name = tempfile.mkstemp(suffix=suffix, prefix="fuzz-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return Path(name)


def _assert_clean_exit_2(result) -> None:
    """Exit 2, no traceback; a DfkdError is exactly one ``error:`` line on stderr."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output and "internal error" not in result.output, result.output
    lines = result.stderr.strip().splitlines()
    assert lines, result.output
    if lines[0].startswith("error:"):
        assert len(lines) == 1, result.stderr
    else:                                   # click's own usage error: "Usage: ...", "Error: ..."
        assert any(ln.startswith("Error:") for ln in lines), result.stderr


# -- recipes -----------------------------------------------------------------------------------

VALID = quick_recipe().model_dump(mode="json")
LEAVES = [f"{sec}.{key}" for sec, body in VALID.items() if isinstance(body, dict) for key in body] + ["seed"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
dotted_keys = st.sampled_from(LEAVES) | st.lists(st.text(min_size=0, max_size=8), min_size=1, max_size=3).map(".".join)


@st.composite
def mutated_recipes(draw) -> dict:
    """The valid quick recipe with a few keys replaced by anything, added, or removed."""
    data = yaml.safe_load(yaml.safe_dump(VALID))
    for _ in range(draw(st.integers(1, 4))):
        key = draw(dotted_keys)
        node, *parts = data, *key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            if draw(st.booleans()) and parts[-1] in node:
                del node[parts[-1]]
            else:
                node[parts[-1]] = draw(json_values)
    return data


recipe_files = (st.binary(max_size=400)
                | st.text(max_size=400).map(lambda t: t.encode("utf-8"))
                | mutated_recipes().map(lambda d: yaml.safe_dump(d, allow_unicode=True).encode("utf-8"))
                | st.lists(st.sampled_from(["a:", " b", "- c", ": d", "[", "{", "&x", "*x", "!!python/object:os.system",
                                            "'", '"', "\t", "%YAML 1.1", "---", "...", "\x00"]),
                           max_size=12).map(lambda parts: "\n".join(parts).encode("utf-8")))


@PROFILE
@given(content=recipe_files, overrides=st.dictionaries(dotted_keys, json_values, max_size=3))
def test_recipe_loader_loads_or_raises_a_recipe_error(content, overrides):
    path = _scratch(".yaml", content)
    try:
        load_recipe(path, overrides)
    except RecipeError:
        pass
    finally:
        path.unlink()


@PROFILE
@given(content=recipe_files, sets=st.lists(st.text(max_size=30), max_size=3))
def test_compress_with_a_bad_recipe_or_set_exits_2_in_one_line(content, sets):
    path = _scratch(".yaml", content)
    try:
        args = ["compress", "no-such-teacher.onnx", "--recipe", str(path), "--dry-run"]
        for s in sets:
            args += ["--set", s]
        _assert_clean_exit_2(CliRunner().invoke(cli, args))   # a recipe error, or then: teacher not found
    finally:
        path.unlink()


# -- teachers ----------------------------------------------------------------------------------

@st.composite
def mutated_onnx(draw, original: bytes) -> bytes:
    data = bytearray(original)
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "splice"]))
    n = len(data)
    if kind == "truncate":
        return bytes(data[:draw(st.integers(0, n - 1))])
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, n - 1))
            data[i] ^= draw(st.integers(1, 255))
        return bytes(data)
    if kind == "insert":
        i = draw(st.integers(0, n))
        return bytes(data[:i] + draw(st.binary(min_size=1, max_size=32)) + data[i:])
    if kind == "delete":
        i = draw(st.integers(0, n - 1))
        return bytes(data[:i] + data[i + draw(st.integers(1, 64)):])
    i, j = sorted(draw(st.lists(st.integers(0, n), min_size=2, max_size=2)))
    return bytes(data[:i] + data[j:] + data[i:j])


def _onnx_model(input_dims, elem_type, classes, declared_out) -> bytes:
    """A small classifier graph with whatever input shape, element type and output declaration."""
    from onnx import TensorProto, helper, numpy_helper

    in_ch = input_dims[1] if len(input_dims) > 1 and isinstance(input_dims[1], int) and input_dims[1] > 0 else 3
    w = numpy_helper.from_array(np.ones((classes, in_ch), np.float32), "w")
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("GlobalAveragePool", ["xf"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem_type, input_dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, declared_out)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


dims = st.one_of(st.integers(0, 40), st.just("N"), st.just(None))
shaped_onnx = st.builds(
    _onnx_model,
    input_dims=st.lists(dims, min_size=0, max_size=5),
    elem_type=st.sampled_from([1, 10, 11, 7, 2]),              # float, float16, double, int64, uint8
    classes=st.integers(1, 12),
    declared_out=st.lists(dims, min_size=0, max_size=3))

EXTENSIONS = [".onnx", ".pt", ".pth", ".pt2", ".ts", ".th", ".ckpt", ".bin", ".tar", ".txt", "", ".ONNX", ".onnx.gz"]


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _zip_bytes(names) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for n in names:
            zf.writestr(n, b"\x80\x02}q\x00.")
    return buf.getvalue()


torch_like = (st.dictionaries(st.text(max_size=6), st.integers() | st.text(max_size=5), max_size=4).map(_torch_bytes)
              | st.lists(st.integers(), max_size=4).map(_torch_bytes)
              | st.just({"state_dict": {"conv.weight": torch.zeros(4, 3, 3, 3)}}).map(_torch_bytes)
              | st.lists(st.sampled_from(["archive/data.pkl", "archive/constants.pkl", "archive/code/x.py",
                                          "archive/models/m.json", "archive_format", "x/version", "a.txt"]),
                         max_size=4).map(_zip_bytes)
              | st.binary(max_size=64).map(lambda b: pickle.PROTO + bytes([2]) + b))


def _teacher_case_strategy(original: bytes):
    return st.one_of(
        st.tuples(st.sampled_from(EXTENSIONS), mutated_onnx(original)),
        st.tuples(st.just(".onnx"), shaped_onnx),
        st.tuples(st.sampled_from(EXTENSIONS), st.binary(max_size=200)),
        st.tuples(st.sampled_from(EXTENSIONS), torch_like),
        st.tuples(st.sampled_from(EXTENSIONS), st.just(original)),   # right bytes, maybe the wrong name
    )


@pytest.fixture(scope="module")
def onnx_bytes(digits_teacher_onnx) -> bytes:
    return Path(digits_teacher_onnx).read_bytes()


def test_teacher_loader_loads_or_raises_a_dfkd_error(onnx_bytes):
    @PROFILE
    @given(case=_teacher_case_strategy(onnx_bytes))
    def check(case):
        ext, data = case
        path = _scratch(ext, data)
        try:
            load_teacher(path)
        except DfkdError:
            pass
        finally:
            path.unlink()

    check()


def test_inspect_on_bad_teacher_files_exits_2_in_one_line(onnx_bytes):
    bad = st.one_of(
        st.tuples(st.sampled_from(EXTENSIONS), st.just(b"")),                           # empty file
        st.tuples(st.sampled_from([".txt", "", ".onnx.gz", ".jpg"]), st.just(onnx_bytes)),   # wrong extension
        st.tuples(st.sampled_from([".onnx", ".pt", ".pt2"]),
                  st.integers(1, len(onnx_bytes) // 2).map(lambda n: onnx_bytes[:n])),  # truncated
        st.tuples(st.sampled_from(EXTENSIONS), st.binary(min_size=1, max_size=200)),    # noise
        st.tuples(st.just(".onnx"), shaped_onnx.filter(lambda b: True)),                # odd shapes (or fine)
    )

    @PROFILE
    @given(case=bad)
    def check(case):
        ext, data = case
        path = _scratch(ext, data)
        try:
            result = CliRunner().invoke(cli, ["inspect", str(path)])
            if result.exit_code == 0:       # only an odd-shaped but valid model may load
                assert ext == ".onnx" and data[:1] == b"\x08" and len(data) > 100, result.output
            else:
                _assert_clean_exit_2(result)
        finally:
            path.unlink()

    check()


# -- eval data (issue 14.11) -------------------------------------------------------------------


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _npy_bytes(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


eval_files = st.one_of(
    st.binary(max_size=300),                                                             # random bytes
    st.binary(max_size=200).map(lambda b: b"\x80\x04" + b),                              # pickle-looking
    st.just(_npy_bytes(np.zeros((2, 8, 8), np.uint8))),                                  # .npy renamed
    st.just(_npz_bytes(images=np.array([None, 1], dtype=object), labels=np.arange(2))),  # object arrays
    st.just(_npz_bytes(images=np.zeros((2, 8, 8), np.uint8), labels=np.array(["a", "b"], dtype=object))),
    st.just(_npz_bytes(images=np.zeros((3, 0, 0), np.uint8), labels=np.arange(3))),    # 0x0 images
    st.just(_npz_bytes(images=np.zeros((2, 8, 8), np.uint8))),                          # no labels
    st.binary(min_size=1, max_size=200).map(
        lambda b: _npz_bytes(images=np.zeros((2, 8, 8), np.uint8), labels=np.arange(2))[: 30 + len(b)]),  # truncated
)


@PROFILE
@given(data=eval_files)
def test_eval_data_loads_or_raises_a_data_error_that_never_blames_pickles(data):
    from dfkd_deploy.core.errors import DataError
    from dfkd_deploy.validate.data import check_eval_data, load_eval_data

    path = _scratch(".npz", data)
    try:
        for read in (check_eval_data, lambda p: load_eval_data(p, input_shape=(1, 8, 8))):
            try:
                read(path)
            except DataError as exc:
                assert "\n" not in str(exc)
                assert "pickled data" not in str(exc) and "allow_pickle" not in str(exc), str(exc)
    finally:
        path.unlink()
