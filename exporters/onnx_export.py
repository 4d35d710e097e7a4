"""Export a trained student to ONNX and prove the file computes what the student computes.

The exported file is meant to replace the teacher file as it is: same layout (an NHWC teacher
gets an NHWC student), same model-space input, logits out, any batch size. Everything is
checked before the file lands: the ONNX checker, BatchNorm folding, parity with the torch
student on probes and a run at batch sizes 1 and 7. The checks run on the temporary file of
:func:`dfkd_deploy.core.io.atomic_path`, so a failed export never replaces a previous good file.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dfkd_deploy.core.errors import ExportError, one_line
from dfkd_deploy.core.io import atomic_path
from dfkd_deploy.runtime.onnxruntime import OrtRunner
from dfkd_deploy.runtime.torch import TorchRunner, cpu_eval

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
LAYOUTS = ("NCHW", "NHWC")
_DYNAMIC_BATCHES = (1, 7)   # 1: the deployment case; 7: odd, so nothing may assume the export batch

# Conv type -> the BatchNorm type that can be folded into it.
_CONV_BN = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


@dataclass
class OnnxExportResult:
    path: Path
    opset: int
    input_name: str
    output_name: str
    max_abs_diff: float          # ONNX Runtime vs torch student, over the probes
    top1_agreement: float        # fraction of probes where both pick the same class
    bn_nodes_remaining: int      # BatchNormalization nodes left in the graph (0 when all folded)
    layout: str = "NCHW"
    probes: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "path": str(self.path), "opset": self.opset, "input_name": self.input_name,
            "output_name": self.output_name, "layout": self.layout,
            "max_abs_diff": self.max_abs_diff, "top1_agreement": self.top1_agreement,
            "bn_nodes_remaining": self.bn_nodes_remaining, "probes": self.probes,
            "notes": list(self.notes),
        }


class NHWCInput(nn.Module):
    """Takes NHWC input and hands NCHW to the wrapped model: the permute ends up in the graph."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.permute(0, 3, 1, 2))


def export_student_onnx(student: nn.Module, path: str | Path, *, input_shape: tuple[int, int, int],
                        layout: str = "NCHW", opset: int = 17, probes: torch.Tensor | None = None,
                        tolerance: float = 1e-3) -> OnnxExportResult:
    """Export ``student`` (model-space NCHW -> logits) to ``path`` and check it; see module doc."""
    layout = layout.upper()
    if layout not in LAYOUTS:
        raise ExportError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    c, h, w = (int(v) for v in input_shape)
    probes = _probes(probes, (c, h, w))

    # A copy, so the caller's student keeps its device, mode and BatchNorm layers.
    model = copy.deepcopy(student).cpu().eval()
    reference = TorchRunner(model)
    expected = reference.predict(probes.numpy())
    extra_inputs = [torch.randn((n, c, h, w), generator=torch.Generator().manual_seed(n)).numpy()
                    for n in _DYNAMIC_BATCHES]
    extra_expected = [reference.predict(x) for x in extra_inputs]

    path = Path(path)
    notes: list[str] = []
    with atomic_path(path) as tmp:
        _export(model, tmp, (c, h, w), layout, opset)
        graph = _load_checked(tmp)
        bn_total, bn_foldable = _count_batchnorm(graph)
        if bn_foldable:
            # torch folds BN into the preceding Conv during constant folding; when it did not
            # (an unusual graph), fold the pairs in torch ourselves and export again.
            folded, n = fold_conv_bn(model)
            if n:
                notes.append(f"folded {n} Conv+BatchNorm pair(s) in torch before export")
                _export(folded, tmp, (c, h, w), layout, opset)
                graph = _load_checked(tmp)
                bn_total, bn_foldable = _count_batchnorm(graph)
        if bn_total:
            notes.append(f"{bn_total} BatchNormalization node(s) left ({bn_foldable} after a Conv)")

        runner = OrtRunner(tmp, layout=layout)   # one session for every check
        got = runner.predict(probes.numpy())
        max_diff, agreement = _compare(got, expected)
        allowed = _allowed(tolerance, expected)
        if not np.isfinite(max_diff) or max_diff > allowed:
            raise ExportError(
                f"ONNX export disagrees with the torch student: max abs diff {max_diff:.3g} > tolerance "
                f"{allowed:.3g} over {len(probes)} probes (top-1 agreement {agreement:.4f})")
        if allowed > tolerance:
            notes.append(f"the student's logits reach {np.abs(expected).max():.3g}: the parity tolerance "
                         f"{tolerance:g} was scaled to {allowed:.3g} (float32 rounding grows with them); logits "
                         "this large usually mean an unstable student")
        for x, want in zip(extra_inputs, extra_expected):
            out = runner.predict(x)
            if out.shape != tuple(want.shape):
                raise ExportError(f"ONNX export does not take a dynamic batch: batch {len(x)} gave "
                                  f"output shape {out.shape}, expected {want.shape}")
            diff = _compare(out, want)[0]
            if not np.isfinite(diff) or diff > _allowed(tolerance, want):
                raise ExportError(f"ONNX export disagrees with the torch student at batch {len(x)}: "
                                  f"max abs diff {diff:.3g} > tolerance {tolerance:.3g}")

    return OnnxExportResult(path=path, opset=opset, input_name=INPUT_NAME, output_name=OUTPUT_NAME,
                            max_abs_diff=max_diff, top1_agreement=agreement, bn_nodes_remaining=bn_total,
                            layout=layout, probes=len(probes), notes=notes)


def fold_conv_bn(model: nn.Module) -> tuple[nn.Module, int]:
    """Fold every eval-mode BatchNorm that directly follows a Conv into that Conv.

    Returns the rewritten module (a ``torch.fx.GraphModule``, or ``model`` itself when it cannot
    be traced) and the number of pairs folded. Only safe pairs are folded: the Conv module is
    called once and its output feeds nothing but the BatchNorm. ``model`` itself is not changed.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - data-dependent control flow etc.: leave the BN in place
        return model, 0
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not node.args:
            continue
        bn, prev = modules[node.target], node.args[0]
        if not isinstance(prev, torch.fx.Node) or prev.op != "call_module":
            continue
        conv = modules[prev.target]
        if _CONV_BN.get(type(conv)) is not type(bn) or bn.running_mean is None:
            continue
        if calls[prev.target] != 1 or len(prev.users) != 1:
            continue
        _set_submodule(gm, prev.target, fuse_conv_bn_eval(conv.eval(), bn.eval()))
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        folded += 1
    if folded:
        gm.graph.lint()
        gm.delete_all_unused_submodules()   # the folded BN modules, so nothing can call them again
        gm.recompile()
    return gm.eval(), folded


# --- internals ---------------------------------------------------------------------------------

def _probes(probes: torch.Tensor | None, chw: tuple[int, int, int]) -> torch.Tensor:
    if probes is None:
        return torch.randn((16, *chw), generator=torch.Generator().manual_seed(0))
    probes = torch.as_tensor(probes).detach().float().cpu()
    if probes.ndim != 4 or tuple(probes.shape[1:]) != chw or len(probes) == 0:
        raise ExportError(f"probes must be model-space NCHW of shape (N, {chw[0]}, {chw[1]}, {chw[2]}), "
                          f"got {tuple(probes.shape)}")
    return probes


TEACHER_EXPORTERS = ("legacy", "dynamo")
_TEACHER_DEFAULT_OPSET = {"legacy": 17, "dynamo": 18}


def export_teacher_onnx(model: nn.Module, path: str | Path, *, input_shape: tuple[int, int, int],
                        layout: str = "NCHW", opset: int | None = None, mean=None, std=None,
                        value_range: float | None = None, exporter: str = "legacy", fold: bool = False,
                        external_data: bool | None = None, dynamic_batch: bool = True,
                        tolerance: float = 1e-3) -> Path:
    """Export a *teacher* to ONNX the way a given torch exporter writes it, and check the file.

    - ``exporter="legacy"`` (default; opset 17 unless given): torch's TorchScript-based
      exporter. With ``fold=False`` the BatchNorm layers stay as nodes, so synthesis can match
      their running statistics; ``fold=True`` is the exporter's own default (constant folding,
      which folds BN into the convolutions).
    - ``exporter="dynamo"`` (opset 18 unless given): the ``torch.export``-based exporter, torch's
      default. Its optimiser folds BatchNorm into the convolutions, so the file carries no BN
      statistics (a BN-free teacher), and weights go to an external ``<name>.data`` file beside
      it unless ``external_data=False``.

    The input normalisation, which lives outside the graph, is recorded in the file's metadata
    (``dfkd_deploy.mean``/``std``/``value_range``), where the ONNX teacher loader finds it. The
    file is checked (ONNX checker, onnxruntime vs torch on random inputs, a batch other than the
    export's when ``dynamic_batch``) before it replaces ``path``; for the dynamo exporter the
    data file is moved in place first, then the model.
    """
    if exporter not in TEACHER_EXPORTERS:
        raise ExportError(f"unknown teacher exporter {exporter!r}; expected one of {', '.join(TEACHER_EXPORTERS)}")
    layout = layout.upper()
    if layout not in LAYOUTS:
        raise ExportError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    opset = opset or _TEACHER_DEFAULT_OPSET[exporter]
    external = exporter == "dynamo" if external_data is None else bool(external_data)
    if external and exporter != "dynamo":
        raise ExportError("external weight files are written by the dynamo exporter only (--exporter dynamo)")
    chw = tuple(int(v) for v in input_shape)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    # The teacher itself (no copy: a teacher with synthesis hooks cannot be deep-copied), on CPU
    # for the export and given back its device and mode afterwards.
    try:
        with cpu_eval(model):
            target = work / path.name
            if exporter == "dynamo":
                _export_teacher_dynamo(model, target, chw, layout, opset, dynamic_batch)
            else:
                _export_teacher_legacy(model, target, chw, layout, opset, fold, dynamic_batch)
            _add_teacher_metadata(target, mean=mean, std=std, value_range=value_range, external=external)
            _load_checked(target)
            _check_teacher_parity(model, target, chw, layout, dynamic_batch, tolerance)
            data = work / f"{path.name}.data"
            if external and data.is_file():
                data.chmod(target.stat().st_mode & 0o777)   # onnx writes it 0600; give it the model's mode
                os.replace(data, path.parent / data.name)
            os.replace(target, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path


def describe_teacher_onnx(path: str | Path) -> dict:
    """What a teacher file holds, in a few words for the CLI: opset, producer, BN nodes, data file."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    locations = sorted({e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"})
    return {"opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
            "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
            "batchnorm_nodes": sum(1 for n in proto.graph.node if n.op_type == "BatchNormalization"),
            "external_data": locations}


def _teacher_wrapped(model: nn.Module, chw: tuple[int, int, int], layout: str, batch: int):
    c, h, w = chw
    if layout == "NHWC":
        return NHWCInput(model).eval(), torch.zeros(batch, h, w, c)
    return model, torch.zeros(batch, c, h, w)


def _export_teacher_legacy(model, target: Path, chw, layout, opset, fold, dynamic_batch) -> None:
    wrapped, dummy = _teacher_wrapped(model, chw, layout, 1)
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.no_grad():
                torch.onnx.export(wrapped, (dummy,), str(target), dynamo=False, opset_version=opset,
                                  do_constant_folding=fold, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                  dynamic_axes=axes)
    except Exception as exc:  # noqa: BLE001 - torch raises many types; the user needs one line
        raise ExportError(f"ONNX export of the teacher failed (legacy exporter, opset {opset}): "
                          f"{type(exc).__name__}: {one_line(exc)}") from None


def _export_teacher_dynamo(model, target: Path, chw, layout, opset, dynamic_batch) -> None:
    import contextlib
    import io as _io

    wrapped, dummy = _teacher_wrapped(model, chw, layout, 2)   # batch 2: a batch of 1 would be specialised
    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    chatter = _io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapped, (dummy,), str(target), dynamo=True, opset_version=opset, external_data=True,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=shapes,
                              verbose=False)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"ONNX export of the teacher failed (dynamo exporter, opset {opset}): "
                          f"{type(exc).__name__}: {one_line(exc)}") from None


def _add_teacher_metadata(target: Path, *, mean, std, value_range, external: bool) -> None:
    import json

    import onnx

    proto = onnx.load(str(target))            # external data, if any, is read into memory here
    for key, value in (("mean", mean), ("std", std), ("value_range", value_range)):
        if value is not None:
            prop = proto.metadata_props.add()
            prop.key, prop.value = f"dfkd_deploy.{key}", json.dumps(list(value) if key != "value_range" else value)
    for leftover in target.parent.glob(f"{target.name}*.data"):
        leftover.unlink()                     # onnx.save appends to an existing data file
    if external:
        onnx.save(proto, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=f"{target.name}.data", size_threshold=1024)
    else:
        onnx.save(proto, str(target))


def _check_teacher_parity(model, target: Path, chw, layout, dynamic_batch, tolerance) -> None:
    batch = 3 if dynamic_batch else 2
    x = torch.randn((batch, *chw), generator=torch.Generator().manual_seed(0)).numpy()
    want = TorchRunner(model).predict(x)
    try:
        got = OrtRunner(target, layout=layout).predict(x)
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. a batch the file does not accept
        raise ExportError(f"the exported teacher does not run in onnxruntime at batch {batch}: {one_line(exc)}") from None
    if got.shape != want.shape:
        raise ExportError(f"the exported teacher outputs shape {got.shape}, the torch teacher {want.shape}")
    scale = max(1.0, float(np.abs(want).max()))
    diff = float(np.abs(got.astype(np.float64) - want).max())
    if not diff <= tolerance * scale:
        raise ExportError(f"the exported teacher differs from the torch teacher by {diff:.3g} (max abs), above "
                          f"{tolerance:g} x {scale:.3g}")


def _export(model: nn.Module, path: Path, chw: tuple[int, int, int], layout: str, opset: int,
            fold: bool = True) -> None:
    c, h, w = chw
    if layout == "NHWC":
        model, dummy = NHWCInput(model).eval(), torch.zeros(1, h, w, c)
    else:
        dummy = torch.zeros(1, c, h, w)
    try:
        with warnings.catch_warnings():
            # The legacy exporter is deprecated and chatty (constant-folding notes on Slice etc.);
            # it is still the one that folds BatchNorm, and its warnings are no news to the user.
            warnings.simplefilter("ignore")
            with torch.no_grad():
                torch.onnx.export(
                    model, (dummy,), str(path), dynamo=False, opset_version=opset,
                    do_constant_folding=fold, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    except Exception as exc:  # noqa: BLE001 - torch raises many types; the user needs one line
        raise ExportError(f"ONNX export of the student failed: {type(exc).__name__}: {one_line(exc)}") from None


def _load_checked(path: Path):
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"exported ONNX file fails the ONNX checker: {one_line(exc)}") from None
    return onnx.load(str(path)).graph


def _count_batchnorm(graph) -> tuple[int, int]:
    """(all BatchNormalization nodes, those whose input is produced by a Conv node)."""
    producer = {out: node.op_type for node in graph.node for out in node.output}
    bns = [n for n in graph.node if n.op_type == "BatchNormalization"]
    after_conv = sum(1 for n in bns if producer.get(n.input[0]) == "Conv")
    return len(bns), after_conv


def _allowed(tolerance: float, want: np.ndarray) -> float:
    """The parity tolerance, relative once the logits exceed 1 in magnitude: float32 rounding in a
    differently fused graph grows with the values (a student whose logits reach 3e7 differed by 18,
    6e-7 of them, with top-1 agreement 1.0)."""
    scale = float(np.abs(want).max()) if want.size else 0.0
    return tolerance * max(1.0, scale) if np.isfinite(scale) else tolerance


def _compare(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    if got.shape != want.shape:
        raise ExportError(f"ONNX output shape {got.shape} differs from the torch student's {want.shape}")
    max_diff = float(np.abs(got.astype(np.float64) - want).max()) if got.size else 0.0
    agreement = float((got.argmax(1) == want.argmax(1)).mean()) if len(got) else 1.0
    return max_diff, agreement


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


