"""load_teacher on every supported format, with small zoo models written to tmp_path."""
from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from dfkd_deploy.core.errors import ConversionError, TeacherError
from dfkd_deploy.models import build_model
from dfkd_deploy.recipe import TeacherOptions
from dfkd_deploy.teachers import load_teacher
from dfkd_deploy.teachers import onnx_teacher
from tests.teachers.onnx_fixtures import randomise_bn as coverage_randomise_bn

SHARED = Path(__file__).resolve().parents[2].parent / "shared"


# --------------------------------------------------------------------------- helpers


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fresh BN layers are the identity in eval mode; random running stats make them matter."""
    return coverage_randomise_bn(model, seed, mean_scale=0.5)


def n_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def export_onnx(model: nn.Module, path: Path, shape=(3, 32, 32), dynamic_batch: bool = True) -> Path:
    """Keeps the BatchNormalization nodes: constant folding would fold them into the convs.

    The exporter restores the wrapper's training flag recursively afterwards, so wrappers must
    be in eval mode already or the wrapped fixture model ends up in train mode.
    """
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, *shape),), str(path), dynamo=False, opset_version=17,
                          do_constant_folding=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}} if dynamic_batch else None)
    return path


def assert_same_outputs(teacher, model: nn.Module, shape=(3, 32, 32)):
    assert not model.training
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(teacher.module(x), model(x), atol=1e-4, rtol=1e-4)


def assert_frozen_with_input_grads(teacher):
    assert not teacher.module.training
    assert all(not p.requires_grad for p in teacher.module.parameters())
    x = torch.randn(2, *teacher.spec.input_shape, requires_grad=True)
    teacher.module(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


class Softmaxed(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return torch.softmax(self.model(x), dim=1)


class NHWC(nn.Module):
    """A deployed model that takes NHWC images and permutes them itself."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x.permute(0, 3, 1, 2))


@pytest.fixture(scope="module")
def resnet8() -> nn.Module:
    torch.manual_seed(0)
    return randomise_bn(build_model("cifar_resnet8", num_classes=10))


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(1)
    return randomise_bn(build_model("tiny_cnn", num_classes=7))


@pytest.fixture(scope="module")
def resnet8_onnx(resnet8, tmp_path_factory) -> Path:
    return export_onnx(resnet8, tmp_path_factory.mktemp("onnx") / "resnet8.onnx")


# --------------------------------------------------------------------------- ONNX


def test_onnx_keeps_bn_and_matches_original(resnet8, resnet8_onnx):
    ops = [n.op_type for n in onnx.load(str(resnet8_onnx)).graph.node]
    assert ops.count("BatchNormalization") == n_bn(resnet8) == 7

    teacher = load_teacher(resnet8_onnx)
    spec = teacher.spec
    assert spec.format == "onnx"
    assert spec.input_shape == (3, 32, 32) and spec.layout == "NCHW"
    assert spec.num_classes == 10 and spec.output == "logits"
    assert spec.bn_layers == 7
    assert spec.converter_max_abs_diff is not None and spec.converter_max_abs_diff < 1e-4
    assert_same_outputs(teacher, resnet8)
    assert_frozen_with_input_grads(teacher)
    assert spec.to_dict()["input_shape"] == [3, 32, 32]


def test_onnx_parity_failure_is_refused(resnet8_onnx, monkeypatch):
    real = onnx_teacher._convert

    def broken(model, path):  # a converter bug: one weight comes out wrong
        module = real(model, path)
        with torch.no_grad():
            next(module.parameters()).add_(0.5)
        return module

    monkeypatch.setattr(onnx_teacher, "_convert", broken)
    with pytest.raises(ConversionError, match=r"differs from onnxruntime by .* above the tolerance 0.001"):
        load_teacher(resnet8_onnx)


def test_onnx_parity_tolerance_from_options(resnet8_onnx):
    diff = load_teacher(resnet8_onnx).spec.converter_max_abs_diff
    if diff == 0:
        pytest.skip("conversion is bit-exact here; nothing can exceed a tolerance")
    with pytest.raises(ConversionError, match="parity_tolerance"):
        load_teacher(resnet8_onnx, TeacherOptions(parity_tolerance=diff / 2))


def test_onnx_softmax_output_gives_log_probabilities(tiny, tmp_path):
    path = export_onnx(Softmaxed(tiny), tmp_path / "probs.onnx")
    teacher = load_teacher(path)
    assert teacher.spec.output == "probabilities"
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = teacher.module(x)
        torch.testing.assert_close(out, torch.log_softmax(tiny(x), 1), atol=1e-4, rtol=1e-4)
    assert torch.allclose(out.exp().sum(1), torch.ones(3), atol=1e-4)


def test_onnx_nhwc_detected(tiny, tmp_path):
    path = export_onnx(NHWC(tiny), tmp_path / "nhwc.onnx", shape=(32, 32, 3))
    teacher = load_teacher(path)
    assert teacher.spec.layout == "NHWC"
    assert teacher.spec.input_shape == (3, 32, 32)  # always the NCHW view
    assert any("NHWC" in n for n in teacher.spec.notes)
    assert_same_outputs(teacher, tiny)              # the module takes NCHW and permutes inside
    assert_frozen_with_input_grads(teacher)


def test_onnx_ambiguous_layout_overridden_by_recipe(tmp_path):
    # 3x32x3: both ends look like channels, so detection says NCHW; the recipe says otherwise.
    model = randomise_bn(build_model("tiny_cnn", num_classes=5))
    path = export_onnx(NHWC(model), tmp_path / "ambiguous.onnx", shape=(3, 32, 3))
    assert load_teacher(path).spec.layout == "NCHW"
    teacher = load_teacher(path, TeacherOptions(layout="NHWC"))
    assert teacher.spec.layout == "NHWC" and teacher.spec.input_shape == (3, 3, 32)
    assert "layout NHWC from the recipe" in teacher.spec.notes
    assert_same_outputs(teacher, model, shape=(3, 3, 32))


def test_onnx_static_batch_still_takes_any_batch(tiny, tmp_path):
    path = export_onnx(tiny, tmp_path / "static.onnx", dynamic_batch=False)
    teacher = load_teacher(path)
    assert_same_outputs(teacher, tiny)  # 4 images through a file exported with batch 2


def test_onnx_dynamic_spatial_dims_need_input_shape(tiny, tmp_path):
    path = tmp_path / "dyn_hw.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(tiny, (torch.randn(2, 3, 32, 32),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
    with pytest.raises(TeacherError, match="set teacher.input_shape"):
        load_teacher(path)
    assert load_teacher(path, TeacherOptions(input_shape=(3, 40, 40))).spec.input_shape == (3, 40, 40)


def test_onnx_option_contradictions(resnet8_onnx):
    with pytest.raises(TeacherError, match="num_classes=100 contradicts"):
        load_teacher(resnet8_onnx, TeacherOptions(num_classes=100))
    with pytest.raises(TeacherError, match="input_shape .* contradicts"):
        load_teacher(resnet8_onnx, TeacherOptions(input_shape=(3, 64, 64)))


def test_options_override_detection(resnet8_onnx):
    opts = TeacherOptions(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], value_range=255, output="probabilities")
    spec = load_teacher(resnet8_onnx, opts).spec
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.25, 0.25, 0.25)
    assert spec.value_range == 255.0 and spec.output == "probabilities"
    with pytest.raises(TeacherError, match="mean has 2 entries"):
        load_teacher(resnet8_onnx, TeacherOptions(mean=[0.5, 0.5]))


def test_onnx_unsupported_op_is_named(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    graph = helper.make_graph([helper.make_node("Shrink", ["x"], ["s"], name="odd_one"),
                               helper.make_node("GlobalAveragePool", ["s"], ["p"]),
                               helper.make_node("Flatten", ["p"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "shrink.onnx"))
    with pytest.raises(TeacherError, match=r"cannot convert the Shrink op \(node 'odd_one', opset 17\)"):
        load_teacher(tmp_path / "shrink.onnx")


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_onnx(resnet8_onnx, tmp_path, cut):
    data = resnet8_onnx.read_bytes()
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(TeacherError) as info:
        load_teacher(bad)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- torch formats


def test_torchscript_needs_trust(tiny, tmp_path):
    """A TorchScript archive is a program that torch.jit.load has no safe mode for: refused in one
    line that says so, by the library and by the CLI, unless --trust-pickle is given."""
    from click.testing import CliRunner

    from dfkd_deploy.cli import cli

    path = tmp_path / "traced.pt"
    torch.jit.save(torch.jit.trace(tiny, torch.randn(2, 3, 32, 32)), str(path))
    with pytest.raises(TeacherError, match=r"TorchScript archive.*no safe mode.*--trust-pickle"):
        load_teacher(path)
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    assert result.exit_code == 2 and "--trust-pickle" in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    result = CliRunner().invoke(cli, ["inspect", str(path), "--trust-pickle"])
    assert result.exit_code == 0, result.output


def test_torchscript_traced(tiny, tmp_path):
    path = tmp_path / "traced.pt"
    torch.jit.save(torch.jit.trace(tiny, torch.randn(2, 3, 32, 32)), str(path))
    teacher = load_teacher(path, trust_pickle=True)
    spec = teacher.spec
    assert spec.format == "torchscript" and spec.input_shape == (3, 32, 32) and spec.num_classes == 7
    assert spec.bn_layers == 0 and any("forward hooks" in n for n in spec.notes)
    assert any("trace's example input" in n for n in spec.notes)
    assert_same_outputs(teacher, tiny)
    assert_frozen_with_input_grads(teacher)


def test_torchscript_scripted_probes_shape_and_records_it(tmp_path):
    model = randomise_bn(build_model("tiny_cnn", num_classes=4, in_channels=1))
    path = tmp_path / "scripted.ts"
    torch.jit.save(torch.jit.script(model), str(path))
    spec = load_teacher(path, trust_pickle=True).spec
    assert spec.input_shape == (1, 32, 32)
    assert any("guessed" in n for n in spec.notes)
    spec = load_teacher(path, TeacherOptions(input_shape=(1, 28, 28)), trust_pickle=True).spec
    assert spec.input_shape == (1, 28, 28) and not any("guessed" in n for n in spec.notes)


@pytest.mark.parametrize("dynamic", [True, False])
def test_exported_program(resnet8, tmp_path, dynamic):
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    program = torch.export.export(resnet8, (torch.randn(2 if dynamic else 1, 3, 32, 32),), dynamic_shapes=shapes)
    path = tmp_path / "model.pt2"
    torch.export.save(program, str(path))
    teacher = load_teacher(path)
    spec = teacher.spec
    assert spec.format == "exported" and spec.input_shape == (3, 32, 32) and spec.num_classes == 10
    # BN comes back as hookable modules only when batches run whole (a dynamic batch dim).
    assert spec.bn_layers == (7 if dynamic else 0)
    assert_same_outputs(teacher, resnet8)
    assert_frozen_with_input_grads(teacher)


def test_exported_decomposed_bn_recovered(resnet8, tmp_path):
    program = torch.export.export(resnet8, (torch.randn(2, 3, 32, 32),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},)).run_decompositions()
    path = tmp_path / "decomposed.pt2"
    torch.export.save(program, str(path))
    teacher = load_teacher(path)
    assert teacher.spec.bn_layers == 7
    assert_same_outputs(teacher, resnet8)
    teacher.module.train()               # recovered BN must keep the exported (running-stats) semantics
    assert_same_outputs(teacher, resnet8)


def test_state_dict_with_module_prefix(resnet8, tmp_path):
    path = tmp_path / "weights.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in resnet8.state_dict().items()}, "epoch": 3}, path)
    teacher = load_teacher(path, TeacherOptions(arch="cifar_resnet8"))
    spec = teacher.spec
    assert spec.format == "state_dict" and spec.arch == "cifar_resnet8"
    assert spec.num_classes == 10 and spec.input_shape == (3, 32, 32) and spec.bn_layers == 7
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)
    assert_same_outputs(teacher, resnet8)
    assert_frozen_with_input_grads(teacher)


def test_state_dict_needs_arch(resnet8, tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(resnet8.state_dict(), path)
    with pytest.raises(TeacherError, match=r"--teacher-arch NAME .*cifar_resnet8"):
        load_teacher(path)
    with pytest.raises(TeacherError, match="unknown architecture"):
        load_teacher(path, TeacherOptions(arch="no_such_net"))


def test_state_dict_wrong_arch_lists_keys(resnet8, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(resnet8.state_dict(), path)
    with pytest.raises(TeacherError, match="do not fit --teacher-arch cifar_resnet20: missing layer1.1"):
        load_teacher(path, TeacherOptions(arch="cifar_resnet20"))


def test_pickled_module_needs_trust(tiny, tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(tiny, path)
    with pytest.raises(TeacherError, match="pickled .*--trust-pickle"):
        load_teacher(path)
    teacher = load_teacher(path, TeacherOptions(input_shape=(3, 32, 32)), trust_pickle=True)
    assert teacher.spec.format == "pickle" and teacher.spec.bn_layers == 3 and teacher.spec.num_classes == 7
    assert_same_outputs(teacher, tiny)
    assert_frozen_with_input_grads(teacher)


# --------------------------------------------------------------------------- bad input


def test_bad_files_give_one_line_errors(resnet8_onnx, tmp_path):
    cases = {}
    (tmp_path / "empty.onnx").write_bytes(b"")
    cases["empty.onnx"] = "is empty"
    (tmp_path / "garbage.onnx").write_bytes(b"\x08\x07garbage" * 10)
    cases["garbage.onnx"] = "not a valid ONNX model"
    (tmp_path / "noise.pt").write_bytes(b"hello, world")
    cases["noise.pt"] = "not a recognised model file"
    (tmp_path / "model.txt").write_bytes(b"x")
    cases["model.txt"] = "unknown teacher extension"
    (tmp_path / "mislabelled.pt").write_bytes(resnet8_onnx.read_bytes())
    cases["mislabelled.pt"] = "content is an ONNX model; rename it to .onnx"
    cases["missing.onnx"] = "not found"
    (tmp_path / "zeros.onnx").write_bytes(bytes(64))
    cases["zeros.onnx"] = "not a valid ONNX model"
    whole = tmp_path / "whole.pt"
    torch.save({"w": torch.zeros(100)}, whole)
    (tmp_path / "cut.pt").write_bytes(whole.read_bytes()[:300])
    cases["cut.pt"] = "not a recognised model file"
    for name, message in cases.items():
        with pytest.raises(TeacherError, match=message) as info:
            load_teacher(tmp_path / name)
        assert "\n" not in str(info.value), name


def test_torch_file_with_onnx_extension(tiny, tmp_path):
    path = tmp_path / "actually_torch.onnx"
    torch.save(tiny.state_dict(), path)
    with pytest.raises(TeacherError, match=r"extension says \.onnx but the content is a torch.save checkpoint"):
        load_teacher(path)


# --------------------------------------------------------------------------- the real teacher


@pytest.mark.shared
def test_shared_resnet56_teacher():
    path = SHARED / "teachers" / "cifar10-resnet56.th"
    if not path.is_file():
        pytest.skip(f"shared teacher not available at {path}")
    teacher = load_teacher(path, TeacherOptions(arch="cifar_resnet56"))
    spec = teacher.spec
    assert spec.bn_layers == 55  # conv1's BN + 27 blocks x 2
    assert spec.num_classes == 10 and spec.input_shape == (3, 32, 32)
    assert spec.mean == (0.485, 0.456, 0.406)
    assert_frozen_with_input_grads(teacher)


# --------------------------------------------------------------------------- .pt2 and pickles


class _WritesMarker:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def _plain_pt2(path: Path) -> Path:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)).eval()
    torch.export.save(torch.export.export(model, (torch.zeros(2, 1, 8, 8),)), path)
    return path


def _rewrite_zip(src: Path, dst: Path, replace) -> Path:
    """Copy the archive, ``replace(name, data)`` giving each member's new bytes (None: unchanged)."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            new = replace(info.filename, data)
            zout.writestr(info, data if new is None else new)
    return dst


def _evil_sample_inputs(name, data, marker):
    import io

    if name.endswith("sample_inputs/model.pt"):   # torch.load(weights_only=False) is torch's fallback here
        buf = io.BytesIO()
        torch.save(_WritesMarker(marker), buf)
        return buf.getvalue()
    return None


def _evil_pickled_weight(name, data, marker):
    """A weight marked use_pickle whose bytes are a protocol-0 pickle (no b'\\x80' header)."""
    import json
    import pickle

    if name.endswith("model_weights_config.json"):
        cfg = json.loads(data)
        cfg["config"]["0.bias"]["use_pickle"] = True
        return json.dumps(cfg).encode()
    if name.endswith("weights/weight_1"):
        return pickle.dumps(_WritesMarker(marker), protocol=0)
    return None


def _evil_opaque_constant(name, data, marker):
    """A constant stored as an 'opaque object': torch unpickles it with plain pickle.loads."""
    import json

    if name.endswith("model_constants_config.json"):
        return json.dumps({"config": {"c": {"path_name": "opaque_obj_0", "is_param": False,
                                            "use_pickle": True, "tensor_meta": None}}}).encode()
    return None


@pytest.mark.parametrize("attack", [_evil_sample_inputs, _evil_pickled_weight, _evil_opaque_constant])
@pytest.mark.parametrize("suffix", [".pt2", ".pt"])
def test_pt2_with_pickled_code_is_refused_without_trust(tmp_path, attack, suffix):
    """Issue 14.1: a .pt2 (or a .pt holding one) runs no code from the file without --trust-pickle;
    `inspect` says so in one line with exit 2 and no torch logging."""
    from click.testing import CliRunner

    from dfkd_deploy.cli import cli

    marker = tmp_path / "payload-ran"
    plain = _plain_pt2(tmp_path / "plain.pt2")
    evil = _rewrite_zip(plain, tmp_path / f"evil{suffix}", lambda n, d: attack(n, d, marker))
    with pytest.raises(TeacherError):
        load_teacher(evil)
    assert not marker.exists()
    result = CliRunner().invoke(cli, ["inspect", str(evil)])
    assert not marker.exists()
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and result.stderr.startswith("error: ")
    assert "Traceback" not in result.output
    assert load_teacher(plain).spec.format == "exported"   # a plain archive still loads


def test_pt2_pickles_run_only_with_trust(tmp_path):
    marker = tmp_path / "payload-ran"
    evil = _rewrite_zip(_plain_pt2(tmp_path / "plain.pt2"), tmp_path / "evil.pt2",
                        lambda n, d: _evil_sample_inputs(n, d, marker))
    with pytest.raises(TeacherError, match="--trust-pickle"):
        load_teacher(evil)
    with pytest.raises(TeacherError):    # trusted: torch unpickles (and the program then fails)
        load_teacher(evil, trust_pickle=True)
    assert marker.exists()



class _Payload:
    """Unpickling this runs code: it writes a marker file (os.system is not needed to show it)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_torch_save_with_code_runs_nothing_without_trust(tmp_path):
    """A legacy torch.save file whose pickle runs code: without --trust-pickle it is refused, by
    name, before anything of it runs (library and CLI); with the flag, and only then, it runs."""
    from click.testing import CliRunner

    from dfkd_deploy.cli import cli

    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": _Payload(marker)}, evil)
    with pytest.raises(TeacherError, match=r"pickled Python object.*\(it references \w.*--trust-pickle"):
        load_teacher(evil)
    assert not marker.exists()
    result = CliRunner().invoke(cli, ["inspect", str(evil)])
    assert result.exit_code == 2, result.output
    assert "--trust-pickle" in result.stderr and "Traceback" not in result.output
    assert not marker.exists()
    with pytest.raises(TeacherError):    # trusted: unpickled (the payload runs), then no weights in it
        load_teacher(evil, trust_pickle=True)
    assert marker.exists()

# --------------------------------------------------------------------------- ONNX external data links


def _external_data_teacher(tmp_path: Path, tiny) -> Path:
    """``tiny`` saved with its weights in ``weights.bin`` beside the model."""
    path = export_onnx(tiny, tmp_path / "src.onnx")
    model = onnx.load(str(path))
    out = tmp_path / "ext" / "model.onnx"
    out.parent.mkdir()
    onnx.save_model(model, str(out), save_as_external_data=True, location="weights.bin", size_threshold=0)
    return out


@pytest.mark.parametrize("link", ["symlink", "hardlink", "symlinked_folder"])
def test_onnx_external_data_links_are_refused_by_our_check(tiny, tmp_path, monkeypatch, link):
    """Issue 14.5: a symbolic or hard link as external weights is refused by dfkd-deploy itself,
    before onnx reads anything (older onnx releases followed links)."""
    path = _external_data_teacher(tmp_path, tiny)
    assert load_teacher(path).spec.num_classes > 0          # the plain layout loads
    secret = tmp_path / "secret.bin"
    weights = path.parent / "weights.bin"
    secret.write_bytes(weights.read_bytes())
    weights.unlink()
    if link == "symlink":
        weights.symlink_to(secret)
        location = "weights.bin"
    elif link == "hardlink":
        weights.hardlink_to(secret)
        location = "weights.bin"
    else:
        (path.parent / "sub").symlink_to(tmp_path, target_is_directory=True)
        model = onnx.load(str(path), load_external_data=False)
        for t in model.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = "sub/secret.bin"
        onnx.save_model(model, str(path))
        location = "sub/secret.bin"

    def onnx_must_not_read(*args, **kwargs):
        raise AssertionError("onnx was asked to read linked external data")

    monkeypatch.setattr(onnx, "load_external_data_for_model", onnx_must_not_read)
    with pytest.raises(TeacherError, match="link") as err:
        load_teacher(path)
    assert location in str(err.value) and "\n" not in str(err.value)
