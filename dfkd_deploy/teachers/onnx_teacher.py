"""ONNX teachers: check the file, convert it with onnx2torch, and prove the conversion right.

The converted torch module is what synthesis differentiates through, so it must compute what
the file computes. Right after conversion both run on the same seeded random inputs (in the
file's own layout) and the largest difference is recorded; above the recipe's tolerance the
teacher is refused rather than silently distilled from a different function.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .._compat import import_onnx2torch
from ..errors import ConversionError, TeacherError, one_line as _short
from ..recipe import TeacherOptions
from .loaders import Detected, guess_layout, resolve_shape

# Ops that only reshape or rename: a Softmax before them still makes the output probabilities.
_PASS_THROUGH = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast"}
_PARITY_SEED = 0
_PARITY_ROUNDS = 3


def load_onnx(path: Path, options: TeacherOptions) -> Detected:
    import onnx

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - DecodeError, ValidationError, ...: all mean "bad file"
        raise TeacherError(f"{path.name}: not a valid ONNX model ({_short(exc)}); is it truncated or corrupt?") from None

    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]  # old exporters list weights as inputs
    if len(inputs) != 1:
        raise TeacherError(f"{path.name}: the model has {len(inputs)} inputs; a teacher takes one image batch")
    dims = _dims(inputs[0])
    if len(dims) != 4:
        raise TeacherError(f"{path.name}: the input has rank {len(dims)}; expected an image batch (rank 4)")

    module = _convert(model, path)

    notes: list[str] = []
    file_batch, file_shape = dims[0], tuple(dims[1:])
    layout = guess_layout(file_shape, options, notes)
    out_dims = _dims(graph.output[0])
    det = Detected(model=module, format="onnx", file_shape=file_shape, file_batch=file_batch, layout=layout,
                   num_classes=out_dims[-1] if out_dims else None,
                   output="probabilities" if _ends_in_softmax(graph) else "logits", notes=notes)
    _read_input_metadata(model, det)
    if det.output == "probabilities":
        notes.append("output is probabilities (the graph ends in Softmax): the teacher returns log-probabilities")
    if file_batch is None:
        notes.append("dynamic batch dimension")

    chw = resolve_shape(det, layout, options, notes)
    file_dims = (chw[1], chw[2], chw[0]) if layout == "NHWC" else tuple(chw)
    det.converter_max_abs_diff = _parity(module, model, inputs[0], file_batch or 2, file_dims)
    if not det.converter_max_abs_diff <= options.parity_tolerance:  # "not <=" also catches NaN
        raise ConversionError(f"{path.name}: the converted teacher differs from onnxruntime by "
                              f"{det.converter_max_abs_diff:.3g} (max abs), above the tolerance "
                              f"{options.parity_tolerance:g} (teacher.parity_tolerance)")
    return det


# Written by exporters.onnx_export.export_teacher_onnx: the normalisation the graph expects
# before its input, so a converted teacher keeps it without the user restating it.
META_KEYS = {"dfkd_deploy.mean": "mean", "dfkd_deploy.std": "std", "dfkd_deploy.value_range": "value_range"}


def _read_input_metadata(model, det: Detected) -> None:
    import json

    for prop in model.metadata_props:
        attr = META_KEYS.get(prop.key)
        if attr is None:
            continue
        try:
            value = json.loads(prop.value)
            value = tuple(float(v) for v in value) if isinstance(value, list) else float(value)
        except (ValueError, TypeError):
            det.notes.append(f"ignored unreadable metadata {prop.key}={prop.value!r}")
            continue
        setattr(det, attr, value)
        det.notes.append(f"{attr} {value} from the file's metadata")


def _dims(value_info) -> list[Optional[int]]:
    """Static dims as ints, symbolic or unknown ones as None."""
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in shape.dim]


def _ends_in_softmax(graph) -> bool:
    producers = {out: node for node in graph.node for out in node.output}
    node = producers.get(graph.output[0].name)
    while node is not None and node.op_type in _PASS_THROUGH and node.input:
        node = producers.get(node.input[0])
    return node is not None and node.op_type == "Softmax"


def _convert(model, path: Path) -> torch.nn.Module:
    try:
        return import_onnx2torch().convert(model)
    except NotImplementedError as exc:
        # onnx2torch: "Converter is not implemented (OperationDescription(domain=..., operation_type=X, version=N))"
        found = re.search(r"operation_type='?([\w.]+)'?.*?version=(\d+)", str(exc))
        if found:
            raise TeacherError(f"{path.name}: onnx2torch cannot convert the {found.group(1)} op (opset "
                               f"{found.group(2)}); re-export the model without it") from None
        raise TeacherError(f"{path.name}: onnx2torch cannot convert the model: {_short(exc)}") from None
    except Exception as exc:  # noqa: BLE001
        raise TeacherError(f"{path.name}: onnx2torch failed to convert the model: {_short(exc)}") from None


def _parity(module: torch.nn.Module, model, input_info, batch: int, file_dims) -> float:
    """Max abs difference between the converted module and onnxruntime on seeded random inputs."""
    import onnx
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise TeacherError(f"onnxruntime cannot load the model: {_short(exc)}") from None
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(input_info.type.tensor_type.elem_type)
    gen = torch.Generator().manual_seed(_PARITY_SEED)
    worst = 0.0
    module.eval()
    for _ in range(_PARITY_ROUNDS):
        x = torch.randn(batch, *file_dims, generator=gen).numpy().astype(np_dtype)
        try:
            ref = session.run(None, {input_info.name: x})[0]
            with torch.no_grad():
                got = module(torch.from_numpy(x))
        except Exception as exc:  # noqa: BLE001
            raise TeacherError(f"running the teacher on input {list(x.shape)} failed: {_short(exc)}") from None
        got = got[0] if isinstance(got, (tuple, list)) else got
        if tuple(got.shape) != tuple(ref.shape):
            raise ConversionError(f"the converted teacher outputs shape {tuple(got.shape)}, onnxruntime {tuple(ref.shape)}")
        diff = np.abs(got.numpy().astype(np.float64) - ref.astype(np.float64)).max()
        worst = max(worst, float(diff)) if not np.isnan(diff) else float("nan")
        if np.isnan(worst):
            break
    return worst

