"""ONNX teachers: check the file, convert it with onnx2torch, and prove the conversion right.

Files come from many producers (torch's legacy and dynamo exporters, tf2onnx, the ONNX model
zoo). Reading one takes four steps:

1. *Read*: the protobuf, plus its external-data file (the dynamo exporter's ``.onnx.data``),
   whose absence or truncation is refused by name before anything else is tried.
2. *Refuse what is not an image classifier*: one float (or uint8) 4-D input, one output.
3. *Convert*: a copy of the graph is prepared for onnx2torch (``converters.prepare``), nodes
   no converter handles are refused naming op, node and opset, then onnx2torch converts it with
   the extra converters of :mod:`.converters` registered.
4. *Prove*: the converted module and onnxruntime (on the original file) run on the same seeded
   random inputs in the file's own layout; above the recipe's tolerance the teacher is refused
   rather than silently distilled from a different function.

Input conventions (layout, value range, normalisation, output kind) are read where the graph
shows them (:mod:`.conventions`), from this project's metadata where present, and recorded in
``Detected.sources`` with where each came from, for ``inspect`` to print.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dfkd_deploy._compat import import_onnx2torch
from dfkd_deploy.core.errors import ConversionError, TeacherError, one_line as _short
from dfkd_deploy.recipe import TeacherOptions
from dfkd_deploy.teachers import conventions, converters, quantized
from dfkd_deploy.teachers.detect import Detected, guess_layout, resolve_shape

_PARITY_SEED = 0
_PARITY_ROUNDS = 3
_TWO_GB = 2 ** 31

# onnx TensorProto element types
_UINT8 = 2
_FLOAT = 1
_TYPE_WORDS = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool", 10: "float16",
               11: "float64", 16: "bfloat16"}

# Why an op nobody converts is there, and what to do about it.
_CONTROL_OPS = {"If", "Loop", "Scan"}
_SEQUENCE_OPS = {"SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert",
                 "SequenceLength", "SplitToSequence", "ConcatFromSequence", "LSTM", "GRU", "RNN"}


def load_onnx(path: Path, options: TeacherOptions) -> Detected:
    model = read_model(path)
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]  # old exporters list weights as inputs
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise TeacherError(f"{path.name}: the model has {len(inputs)} inputs ({names}); a teacher takes one image batch")
    inp = inputs[0]
    elem_type = _check_input(inp, path)
    if len(graph.output) != 1:
        names = ", ".join(o.name for o in graph.output)
        raise TeacherError(f"{path.name}: the model has {len(graph.output)} outputs ({names}); a teacher is an image "
                           "classifier with one output of shape (batch, classes)")
    out_dims = _dims(graph.output[0])
    _check_output(out_dims, graph.output[0], path)

    dims = _dims(inp)
    summary = None
    source = model
    if quantized.is_quantized(model):
        source, summary = quantized.dequantize(model, options.int8_activations, path.name)
    prepared, notes = converters.prepare(source, fixed_batch=dims[0])
    if summary is not None:
        notes.insert(0, summary.describe())
    file_batch, file_shape = dims[0], tuple(dims[1:])
    sources: dict[str, str] = {}
    layout = guess_layout(file_shape, options, notes, sources)
    if elem_type == _UINT8:
        _float_input(prepared, inp.name, path)
        notes.append("the input is uint8: the converted teacher takes the same pixel values as float")
    module = _convert(prepared, path)

    output, why = conventions.output_kind(graph)
    sources["output"] = f"detected: {why}"
    det = Detected(model=module, format="onnx", file_shape=file_shape, file_batch=file_batch, layout=layout,
                   num_classes=out_dims[1] if len(out_dims) >= 2 else None, output=output, notes=notes,
                   sources=sources)
    if output == "probabilities":
        notes.append("output is probabilities (the graph ends in Softmax): the teacher returns log-probabilities")
    if len(out_dims) == 4:
        notes.append(f"the file outputs {['N' if d is None else d for d in out_dims]}: flattened to (batch, classes)")
    if file_batch is None:
        notes.append("dynamic batch dimension")
    _normalisation(model, prepared, inp.name, layout, file_shape, elem_type, det)
    bn_nodes = sum(1 for n in graph.node if n.op_type == "BatchNormalization")
    if bn_nodes == 0:
        det.bn_reason = ("the file has no BatchNormalization nodes (folded into the convolutions by the exporter, "
                         "or a BN-free architecture)")

    chw = resolve_shape(det, layout, options, notes)
    file_dims = (chw[1], chw[2], chw[0]) if layout == "NHWC" else tuple(chw)
    if summary is not None:
        det.sources["quantization"] = f"detected: {summary.format}, activations {summary.activations}"
        det.activation_ranges = summary.activation_ranges
        det.int8 = {"format": summary.format, "per_channel": summary.per_channel, "ops": dict(summary.ops),
                    "activations": summary.activations}
        _check_int8_parity(module, model, inp, file_batch or 8, file_dims, layout == "NCHW", options, det, path)
        return det
    det.converter_max_abs_diff = _parity(module, model, inp, file_batch or 2, file_dims)
    if not det.converter_max_abs_diff <= options.parity_tolerance:  # "not <=" also catches NaN
        raise ConversionError(f"{path.name}: the converted teacher differs from onnxruntime by "
                              f"{det.converter_max_abs_diff:.3g} (max abs), above the tolerance "
                              f"{options.parity_tolerance:g} (teacher.parity_tolerance)")
    return det


# --------------------------------------------------------------------------- reading the file


def read_model(path: Path):
    """The model with its external data loaded; one-line refusals for every way that fails."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - DecodeError and friends: all mean "bad file"
        raise TeacherError(f"{path.name}: not a valid ONNX model ({_short(exc)}); is it truncated or corrupt?") from None
    external = _external_data(model)
    for location, needed in external.items():
        target = path.parent / location
        if Path(location).is_absolute() or ".." in Path(location).parts:
            raise TeacherError(f"{path.name}: its weights point outside its directory ({location!r}); "
                               "refusing to read them")
        _refuse_links(path, location)
        if not target.is_file():
            raise TeacherError(f"{path.name}: its weights are stored in a separate file, {location}, which is missing; "
                               f"put it next to {path.name} (expected at {target})")
        if target.stat().st_size < needed:
            raise TeacherError(f"{path.name}: its external weights file {location} is truncated "
                               f"({target.stat().st_size} bytes, the model needs {needed})")
    if external:
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:  # noqa: BLE001
            raise TeacherError(f"{path.name}: cannot read its external weights: {_short(exc)}") from None
    if model.ByteSize() >= _TWO_GB:
        raise TeacherError(f"{path.name}: the model is larger than 2 GB, which the converter cannot handle")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - ValidationError, ...
        raise TeacherError(f"{path.name}: not a valid ONNX model ({_short(exc)}); is it truncated or corrupt?") from None
    return model


def _refuse_links(path: Path, location: str) -> None:
    """External weights must be a plain file in the model's own directory: a symbolic link (on the
    file or a folder on the way) or a hard link could make the model read any file the user can.
    Checked here, not left to the installed onnx (releases before 1.16 followed links)."""
    base = path.parent
    node = base
    for part in Path(location).parts:
        node = node / part
        if node.is_symlink():
            raise TeacherError(f"{path.name}: its weights file {location} goes through a symbolic link "
                               f"({node.relative_to(base)}); refusing to read it")
    if node.is_file() and node.stat().st_nlink > 1:
        raise TeacherError(f"{path.name}: its weights file {location} is a hard link (another name of a file "
                           "elsewhere); refusing to read it: copy the file instead")


def _external_data(model) -> dict[str, int]:
    """location -> bytes the file must hold, over every tensor stored outside the model."""
    import onnx

    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
    needed: dict[str, int] = {}
    for t in tensors:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
        loc = info.get("location", "")
        needed[loc] = max(needed.get(loc, 0), end)
    return needed


def _check_input(inp, path: Path) -> int:
    kind = inp.type.WhichOneof("value")
    if kind != "tensor_type":
        words = {"sequence_type": "a sequence", "map_type": "a map", "optional_type": "optional",
                 "sparse_tensor_type": "a sparse tensor"}.get(kind, kind)
        raise TeacherError(f"{path.name}: the input {inp.name!r} is {words}, not an image tensor; "
                           "a teacher is an image classifier")
    dims = _dims(inp)
    if len(dims) != 4:
        shown = ["?" if d is None else d for d in dims]
        raise TeacherError(f"{path.name}: the input has rank {len(dims)} ({shown}); expected an image batch "
                           "(rank 4: N,C,H,W or N,H,W,C)")
    elem = inp.type.tensor_type.elem_type
    if elem not in (_FLOAT, _UINT8):
        raise TeacherError(f"{path.name}: the input is {_TYPE_WORDS.get(elem, f'type {elem}')}; a teacher must take "
                           "float32 (or uint8) images: re-export it with a float32 input")
    return elem


def _check_output(out_dims, output, path: Path) -> None:
    kind = output.type.WhichOneof("value")
    if kind != "tensor_type":
        raise TeacherError(f"{path.name}: the output {output.name!r} is not a tensor; a teacher is an image classifier "
                           "with one output of shape (batch, classes)")
    if not out_dims:
        return   # rank not declared: the forward pass after loading checks it
    spatial = out_dims[2:]
    if len(out_dims) == 2 or (len(out_dims) == 4 and all(d == 1 for d in spatial)):
        return
    shown = ["N" if d is None else d for d in out_dims]
    raise TeacherError(f"{path.name}: the output has shape {shown}; a teacher is an image classifier with an "
                       "output of shape (batch, classes)")


def _float_input(model, name: str, path: Path) -> None:
    """Retype a uint8 input as float, when all it feeds is a Cast to float (then nothing changes)."""
    users = [n for n in model.graph.node if name in n.input]
    if not users or any(n.op_type != "Cast" or not any(a.name == "to" and a.i == _FLOAT for a in n.attribute)
                        for n in users):
        raise TeacherError(f"{path.name}: the uint8 input does not go straight into a Cast to float; a teacher must "
                           "take float images: re-export it with a float32 input")
    for inp in model.graph.input:
        if inp.name == name:
            inp.type.tensor_type.elem_type = _FLOAT


def _dims(value_info) -> list[Optional[int]]:
    """Static dims as ints, symbolic or unknown ones as None."""
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in shape.dim]


# --------------------------------------------------------------------------- conventions


# Written by exporters.onnx_export.export_teacher_onnx: the normalisation the graph expects
# before its input, so a converted teacher keeps it without the user restating it.
META_KEYS = {"dfkd_deploy.mean": "mean", "dfkd_deploy.std": "std", "dfkd_deploy.value_range": "value_range"}


def _normalisation(model, prepared, input_name, layout, file_shape, elem_type, det: Detected) -> None:
    """mean/std/value_range: this project's metadata, else the graph's own normalisation, else
    nothing (pixels in [0,1] assumed); where each came from goes to ``det.sources``."""
    found = _read_input_metadata(model, det)
    channels = file_shape[2] if layout == "NHWC" else file_shape[0]
    norm = conventions.input_normalisation(prepared, input_name, layout, channels)
    if found:
        det.sources["normalisation"] = "file metadata (dfkd_deploy.mean/std)" if (
            det.mean is not None or det.std is not None) else "file metadata: none"
        det.sources["value_range"] = "file metadata" if det.value_range is not None else "default: 1"
        if norm is not None:
            det.notes.append(norm.describe() + "; the file's metadata takes precedence")
        return
    if elem_type == _UINT8:
        det.value_range = 255.0
        det.sources["value_range"] = "detected: the input is uint8, pixels in [0,255]"
    if norm is not None and norm.value_range is not None and (elem_type != _UINT8 or norm.value_range == 255.0):
        det.value_range = norm.value_range
        det.mean = det.std = None
        det.graph_normalisation = norm
        det.sources["normalisation"] = f"detected: {norm.describe()}; no mean/std applied outside it"
        det.sources["value_range"] = (f"detected: the in-graph normalisation expects raw pixels in "
                                      f"[0, {norm.value_range:g}]")
        det.notes.append(f"{norm.describe()}: the teacher takes raw pixels in [0, {norm.value_range:g}]")
        return
    if norm is not None:
        det.notes.append(f"{norm.describe()}, but its pixel range is unclear: set teacher.value_range")
    elif elem_type != _UINT8:
        _quantizer_normalisation(model, input_name, channels, det)
    det.sources.setdefault("normalisation", "default: no normalisation in the graph or its metadata, none applied "
                                            "(set teacher.mean/std if the model was trained with one)")
    det.sources.setdefault("value_range", "default: pixels in [0, 1] (set teacher.value_range: 255 if wrong)")


def _quantizer_normalisation(model, input_name, channels, det: Detected) -> None:
    """An int8 file's input QuantizeLinear was calibrated on what the model takes: a range reaching
    well below 0 means normalised input; a known normalisation's range is applied as detected."""
    span = quantized.input_range(model, input_name)
    if span is None or span[0] > -0.1 * (span[1] - span[0]):
        return
    lo, hi = span
    found = quantized.match_normalisation(lo, hi, channels)
    if found is None:
        det.notes.append(f"the input QuantizeLinear covers [{lo:.3g}, {hi:.3g}]: the model takes normalised "
                         "input, by a mean/std this tool does not recognise: set teacher.mean/std")
        return
    name, det.mean, det.std = found
    det.sources["normalisation"] = (f"detected: the input QuantizeLinear covers [{lo:.3g}, {hi:.3g}], the range of "
                                    f"[0,1] pixels under the {name} mean/std")


def _read_input_metadata(model, det: Detected) -> bool:
    found = False
    for prop in model.metadata_props:
        attr = META_KEYS.get(prop.key)
        if attr is None:
            continue
        found = True
        try:
            value = json.loads(prop.value)
            value = tuple(float(v) for v in value) if isinstance(value, list) else float(value)
        except (ValueError, TypeError):
            det.notes.append(f"ignored unreadable metadata {prop.key}={prop.value!r}")
            continue
        setattr(det, attr, value)
        det.notes.append(f"{attr} {value} from the file's metadata")
    return found


def _ends_in_softmax(graph) -> bool:
    return conventions.output_kind(graph)[0] == "probabilities"


# --------------------------------------------------------------------------- conversion


def _convert(model, path: Path) -> torch.nn.Module:
    converters.register()
    missing = converters.unsupported_nodes(model)
    missing.sort(key=lambda m: m.op in quantized.HANDLED)   # name a quantized op nothing dequantizes first
    if missing:
        more = f"; also unsupported: {', '.join(m.describe() for m in missing[1:4])}" if len(missing) > 1 else ""
        raise TeacherError(f"{path.name}: onnx2torch cannot convert the {missing[0].describe()}{more}; "
                           f"{_advice(missing[0])}")
    try:
        return import_onnx2torch().convert(model)
    except NotImplementedError as exc:
        failing = converters.failing_node(model)
        if failing:
            op, node, reason = failing
            raise TeacherError(f"{path.name}: onnx2torch cannot convert the {op} op (node '{node}'): {reason}; "
                               "re-export the model without it") from None
        raise TeacherError(f"{path.name}: onnx2torch cannot convert the model: {_short(exc)}") from None
    except Exception as exc:  # noqa: BLE001
        raise TeacherError(f"{path.name}: onnx2torch failed to convert the model: {_short(exc)}") from None


def _advice(node: converters.UnsupportedNode) -> str:
    if node.op in quantized.KNOWN_QUANTIZED:
        return (f"this quantized op is not one dfkd_deploy dequantizes ({', '.join(sorted(quantized.HANDLED))}): "
                "give the float model it was quantized from, or quantize it to those ops")
    if node.op in _CONTROL_OPS:
        return "control flow is not supported: re-export with it traced out (fixed shapes, no data-dependent branches)"
    if node.op in _SEQUENCE_OPS:
        return "sequence ops: this does not look like an image classifier"
    if node.domain not in ("", "ai.onnx"):
        return (f"ops of the {node.domain} domain come from runtime-specific graph optimisation: give the model as "
                "exported, before such optimisation")
    return "re-export the model without it (or at another opset), or add a converter (see docs/teachers.md)"


def _session(model):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise TeacherError(f"onnxruntime cannot load the model: {_short(exc)}") from None


def _parity(module: torch.nn.Module, model, input_info, batch: int, file_dims) -> float:
    """Max abs difference between the converted module and onnxruntime on seeded random inputs."""
    session = _session(model)
    uint8 = input_info.type.tensor_type.elem_type == _UINT8
    gen = torch.Generator().manual_seed(_PARITY_SEED)
    worst = 0.0
    module.eval()
    for _ in range(_PARITY_ROUNDS):
        if uint8:
            x = torch.randint(0, 256, (batch, *file_dims), generator=gen).numpy().astype(np.uint8)
        else:
            x = torch.randn(batch, *file_dims, generator=gen).numpy().astype(np.float32)
        try:
            ref = session.run(None, {input_info.name: x})[0]
            with torch.no_grad():
                got = module(torch.from_numpy(x.astype(np.float32)))
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


# --------------------------------------------------------------------------- int8 parity

INT8_PROBES = 64        # images per kind of input (random probes, smooth "real-looking" images)


def _check_int8_parity(module, model, inp, batch: int, file_dims, nchw: bool, options: TeacherOptions,
                       det: Detected, path: Path) -> None:
    """An int8 file is not matched to 1e-3 by any float surrogate (onnxruntime requantizes with
    fixed-point multipliers): the preset compares top-1 predictions instead, on seeded Gaussian
    probes and on smooth random images normalised as the recipe says, and records the max abs
    logit difference beside it."""
    figures = int8_parity(module, model, inp, batch, file_dims, nchw, options.mean, options.std)
    det.converter_max_abs_diff = figures["max_abs_diff"]
    det.int8.update(figures)          # (load_onnx put the file's format there)
    det.notes.append(f"int8 parity against onnxruntime running the int8 file: top-1 agreement "
                     f"{figures['agreement_probes']:.1%} on {figures['images']} random probes "
                     f"({figures['classes_probes']} classes predicted), {figures['agreement_smooth']:.1%} on "
                     f"{figures['images']} smooth images ({figures['classes_smooth']} classes); max abs logit "
                     f"difference {figures['max_abs_diff']:.3g} (teacher.int8_min_agreement "
                     f"{options.int8_min_agreement:g})")
    det.sources["parity"] = "int8 preset: top-1 agreement with onnxruntime on the int8 file"
    worst = min(figures["agreement_probes"], figures["agreement_smooth"])
    if not worst >= options.int8_min_agreement:
        raise ConversionError(f"{path.name}: the dequantized teacher agrees with onnxruntime on the int8 file on "
                              f"only {worst:.1%} of top-1 predictions, below teacher.int8_min_agreement "
                              f"{options.int8_min_agreement:g}")


def _smooth_images(n: int, dims, layout_nchw: bool, gen: torch.Generator, mean, std) -> torch.Tensor:
    """Pixels in [0,1] with image-like spatial correlation (upsampled coarse noise plus a little
    fine noise), normalised with the recipe's mean/std when given."""
    c, h, w = dims if layout_nchw else (dims[2], dims[0], dims[1])
    coarse = torch.rand(n, c, max(2, h // 8), max(2, w // 8), generator=gen)
    x = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    x = (x + 0.05 * torch.randn(n, c, h, w, generator=gen)).clamp(0, 1)
    if mean is not None:
        x = x - torch.tensor(mean, dtype=x.dtype).reshape(1, -1, 1, 1)
    if std is not None:
        x = x / torch.tensor(std, dtype=x.dtype).reshape(1, -1, 1, 1)
    return x if layout_nchw else x.permute(0, 2, 3, 1)


def int8_parity(module, model, inp, batch: int, file_dims, nchw: bool = True, mean=None, std=None,
                images: int = INT8_PROBES) -> dict:
    """Top-1 agreement and max abs logit difference between ``module`` and onnxruntime on ``model``."""
    session = _session(model)
    gen = torch.Generator().manual_seed(_PARITY_SEED)
    kinds = {"probes": torch.randn(images, *file_dims, generator=gen),
             "smooth": _smooth_images(images, file_dims, nchw, gen, mean, std)}
    figures: dict = {"images": images, "max_abs_diff": 0.0}
    module.eval()
    for kind, x in kinds.items():
        agree, classes = 0, set()
        for start in range(0, images, batch):
            chunk = x[start:start + batch]
            if chunk.shape[0] < batch and start:          # fixed-batch files: pad the last chunk
                chunk = torch.cat([chunk, x[: batch - chunk.shape[0]]])
            ref = session.run(None, {inp.name: chunk.numpy().astype(np.float32)})[0]
            with torch.no_grad():
                got = module(chunk)
            got = (got[0] if isinstance(got, (tuple, list)) else got).numpy().reshape(ref.shape)
            keep = min(batch, images - start)
            agree += int((got[:keep].argmax(-1) == ref[:keep].argmax(-1)).sum())
            classes.update(ref[:keep].reshape(keep, -1).argmax(-1).tolist())
            figures["max_abs_diff"] = max(figures["max_abs_diff"], float(np.abs(got - ref).max()))
        figures[f"agreement_{kind}"] = agree / images
        figures[f"classes_{kind}"] = len(classes)     # agreement on inputs that all get one class means little
    return figures
