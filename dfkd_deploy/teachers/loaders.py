"""Loading a teacher file, whatever it is, into a :class:`Teacher`.

The format is chosen from the file's content (ONNX protobuf, TorchScript zip, ``torch.export``
zip, ``torch.save`` pickle) and checked against its extension, so a mislabelled file gets a
one-line error instead of a deep traceback from the wrong loader. Each format reports what it
could read (:class:`Detected`); :func:`finish` then applies the recipe's overrides, refuses
contradictions, and checks with one forward pass that the resolved input shape really works.
"""
from __future__ import annotations

import collections
import io
import json
import logging
import operator
import os
import pickle
import re
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from dfkd_deploy.core.errors import one_line, TeacherError, UsageError
from dfkd_deploy.models import build_model, get_entry, model_names
from dfkd_deploy.recipe import TeacherOptions
from dfkd_deploy.teachers import conventions
from dfkd_deploy.teachers.batchnorm import count_batchnorms
from dfkd_deploy.teachers.detect import Detected, guess_layout, resolve_shape
from dfkd_deploy.teachers.spec import Teacher, TeacherModule, TeacherSpec, freeze

# Which content kinds each extension may hold. ``.pt``-style names are used for every torch
# format in the wild (TorchScript included), so those accept all three torch kinds.
_TORCH_KINDS = ("torchscript", "exported", "torch_pickle")
EXTENSIONS: dict[str, tuple[str, ...]] = {
    ".onnx": ("onnx",),
    ".pt2": ("exported",),
    ".ts": ("torchscript",), ".torchscript": ("torchscript",), ".jit": ("torchscript",),
    ".pt": _TORCH_KINDS, ".pth": _TORCH_KINDS, ".th": _TORCH_KINDS, ".ckpt": _TORCH_KINDS,
    ".bin": _TORCH_KINDS, ".tar": _TORCH_KINDS,
}
_KIND_WORDS = {"onnx": "an ONNX model", "torchscript": "a TorchScript archive",
               "exported": "a torch.export program (.pt2)", "torch_pickle": "a torch.save checkpoint"}
_KIND_EXT = {"onnx": ".onnx", "torchscript": ".pt", "exported": ".pt2", "torch_pickle": ".pth"}

# --------------------------------------------------------------------------- entry point


def load_teacher(path, options: TeacherOptions | None = None, *, trust_pickle: bool = False) -> Teacher:
    """Load ``path`` as a frozen teacher: model-space NCHW in, logits (or log-probs) out."""
    options = options or TeacherOptions()
    p = Path(path)
    if not p.exists():
        raise TeacherError(f"teacher file not found: {p}")
    if not p.is_file():
        raise TeacherError(f"teacher path is not a file: {p}")
    if p.stat().st_size == 0:
        raise TeacherError(f"teacher file is empty: {p}")
    ext = p.suffix.lower()
    if ext not in EXTENSIONS:
        raise TeacherError(f"{p.name}: unknown teacher extension {ext or '(none)'!r}; "
                           f"expected one of {', '.join(sorted(EXTENSIONS))}")
    # ONNX has no magic number: a .onnx file that is neither zip nor pickle goes to the ONNX
    # parser, which says clearly whether it is a model.
    kind = sniff(p) or ("onnx" if ext == ".onnx" else None)
    if kind is None:
        raise TeacherError(f"{p.name}: not a recognised model file (neither ONNX nor a PyTorch archive); "
                           "is it truncated or corrupt?")
    if kind not in EXTENSIONS[ext]:
        raise TeacherError(f"{p.name}: the extension says {ext} but the content is {_KIND_WORDS[kind]}; "
                           f"rename it to {_KIND_EXT[kind]}")
    if kind == "onnx":
        from dfkd_deploy.teachers.onnx_teacher import load_onnx  # onnx/onnx2torch are heavy: import on demand
        detected = load_onnx(p, options)
    elif kind == "torchscript":
        detected = _load_torchscript(p, trust_pickle)
    elif kind == "exported":
        detected = _load_exported(p, trust_pickle)
    else:
        detected = _load_torch_pickle(p, options, trust_pickle)
    return finish(detected, p, options)


def sniff(path: Path) -> Optional[str]:
    """Classify by content: torch formats are zips (told apart by their members), legacy
    ``torch.save`` files are raw pickles, ONNX protobufs usually start with ir_version.
    None: none of these (the caller still tries ONNX for a ``.onnx`` name)."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError):
            return None
        tails = {n.split("/", 1)[-1] for n in names}
        if "archive_format" in tails or any(t.startswith("models/") and t.endswith(".json") for t in tails):
            return "exported"
        if "constants.pkl" in tails or any(t.startswith("code/") for t in tails):
            return "torchscript"
        if "data.pkl" in tails:
            return "torch_pickle"
        return None
    with open(path, "rb") as fh:
        head = fh.read(2)
    if head[:1] == b"\x80":          # pickle protocol marker: legacy (non-zip) torch.save
        return "torch_pickle"
    if head[:1] == b"\x08":          # ModelProto field 1 (ir_version, varint): how ONNX files usually start
        return "onnx"
    return None


# --------------------------------------------------------------------------- resolving options


def finish(det: Detected, path: Path, options: TeacherOptions) -> Teacher:
    """Apply recipe overrides to what was detected, wrap, freeze and sanity-check one forward pass.

    Every input convention ends up in ``spec.sources`` with where its value came from (recipe,
    file metadata, detected in the graph, architecture default, or a default assumption)."""
    notes = list(det.notes)
    sources = dict(det.sources)
    layout = det.layout or guess_layout(det.file_shape, options, notes, sources)  # ONNX decides it earlier
    shape = resolve_shape(det, layout, options, notes)
    sources["input_shape"] = _shape_source(det, options, notes)

    output = det.output
    if options.output and options.output != output:
        notes.append(f"output {options.output} from the recipe (detected {output})")
        sources["output"] = f"recipe (teacher.output; the file suggested {output})"
        output = options.output
    elif options.output:
        sources["output"] = "recipe (teacher.output)"
    sources.setdefault("output", "default: logits (the file does not say)")

    mean, std = det.mean, det.std
    if options.mean is not None:
        mean = tuple(options.mean)
    if options.std is not None:
        std = tuple(options.std)
    for name, v in (("mean", mean), ("std", std)):
        if v is not None and len(v) not in (1, shape[0]):
            raise TeacherError(f"teacher.{name} has {len(v)} entries but the teacher takes {shape[0]} channels")
    # A single value means "the same for every channel" (common for grayscale recipes).
    mean = tuple(mean) * shape[0] if mean is not None and len(mean) == 1 else mean
    std = tuple(std) * shape[0] if std is not None and len(std) == 1 else std
    if options.mean is not None or options.std is not None:
        sources["normalisation"] = "recipe (teacher.mean/std)"
        if det.graph_normalisation is not None:
            notes.append("the graph already normalises its input; teacher.mean/std from the recipe are applied "
                         "before it as well: check that this is intended")
    elif det.arch and det.mean is not None:
        sources["normalisation"] = f"architecture default ({det.arch})"
    sources.setdefault("normalisation", "default: none found in the file, none applied (set teacher.mean/std if "
                                        "the model was trained with one)")
    if options.value_range:
        sources["value_range"] = "recipe (teacher.value_range)"
    sources.setdefault("value_range", "default: pixels in [0, 1] (set teacher.value_range: 255 if wrong)")
    value_range = float(options.value_range or det.value_range or 1.0)
    mean_01 = [m / value_range for m in mean] if mean is not None else None   # mean is on [0, value_range]
    channel_order, sources["channel_order"] = conventions.resolve_channel_order(
        options.channel_order, det.graph_normalisation, mean_01, shape[0], notes)

    model = det.model
    if det.file_batch is not None:
        model = _batch_adapter(model, det.file_batch, shape, layout, notes)
    chunked = isinstance(model, _FixedBatch)
    module = freeze(TeacherModule(model, layout=layout, output=output))
    num_classes = _check_forward(module, shape, det.num_classes, path)
    if options.num_classes is not None and options.num_classes != num_classes:
        raise TeacherError(f"teacher.num_classes={options.num_classes} contradicts the file: it outputs "
                           f"{num_classes} classes")

    bn = det.bn_layers if det.bn_layers is not None else count_batchnorms(module)
    reason = det.bn_reason
    if chunked and bn:
        # Hooks would fire once per chunk with that chunk's statistics, not the batch's.
        notes.append(f"{bn} BatchNorm layers not offered for hooks (bn_layers=0): the batch runs in chunks")
        reason = f"{bn} BatchNorm layers, but the file fixes the batch size and batches run in chunks"
        bn = 0
    sources["bn_statistics"] = _bn_source(bn, reason, det.format)
    if bn == 0:
        notes.append("no usable BatchNorm statistics: synthesis uses the BN-free priors instead of BN-statistics "
                     "matching")
    spec = TeacherSpec(format=det.format, source=str(path), input_shape=tuple(int(d) for d in shape),
                       layout=layout, num_classes=num_classes, output=output, mean=mean, std=std,
                       value_range=value_range, channel_order=channel_order,
                       bn_layers=bn, activation_ranges=det.activation_ranges, arch=det.arch,
                       converter_max_abs_diff=det.converter_max_abs_diff, int8=det.int8, notes=notes,
                       sources=sources)
    return Teacher(module=module, spec=spec)


def _shape_source(det: Detected, options: TeacherOptions, notes: list[str]) -> str:
    if options.input_shape:
        return "recipe (teacher.input_shape)"
    if det.file_shape is not None and all(d is not None for d in det.file_shape):
        return "file: the input's declared shape"
    guessed = next((n for n in notes if "guessed" in n or "assumed; set teacher.input_shape" in n), None)
    return f"default: {guessed}" if guessed else "file"


def _bn_source(bn: int, reason: Optional[str], fmt: str) -> str:
    if bn:
        return f"{bn} BatchNorm layers with running statistics: synthesis matches them (BN-statistics loss)"
    why = reason or "no BatchNorm layers found in the model"
    if fmt == "torchscript" and reason is None:
        why = "TorchScript modules do not accept the forward hooks that read BatchNorm inputs"
    return f"none usable: {why}; synthesis uses the BN-free priors instead"


def _check_forward(module: TeacherModule, shape, detected_classes, path: Path) -> int:
    """One forward pass at the resolved shape: catches a wrong input_shape override early, with
    the shape in the message, and reads num_classes where the file does not state it."""
    try:
        with torch.no_grad():
            out = module(torch.zeros(2, *shape))
    except Exception as exc:  # noqa: BLE001 - the user's model: any failure is reported in one line
        raise TeacherError(f"{path.name}: a forward pass with input shape {list(shape)} (NCHW) failed: "
                           f"{one_line(exc)}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TeacherError(f"{path.name}: expected a classifier output of shape (batch, classes), got {got}")
    classes = int(out.shape[1])
    if detected_classes is not None and detected_classes != classes:
        raise TeacherError(f"{path.name}: declared output size {detected_classes} but produced {classes}")
    return classes


class _FixedBatch(nn.Module):
    """Runs a model whose batch size is baked in (B) on any batch: chunks of B, last one padded."""

    def __init__(self, model: nn.Module, batch: int):
        super().__init__()
        self.model = model
        self.batch = batch

    def forward(self, x):
        n = x.shape[0]
        pad = (-n) % self.batch
        if pad:
            x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
        outs = [self.model(chunk) for chunk in x.split(self.batch)]
        outs = [o[0] if isinstance(o, (tuple, list)) else o for o in outs]
        return torch.cat(outs)[:n]


def _batch_adapter(model, batch, shape, layout, notes):
    """Keep the model as is when it computes, on a batch other than the file's, the same as
    running the samples in chunks of the file's batch (random, distinct samples, so a graph
    that mixes samples is caught); chunk otherwise."""
    x = torch.randn(batch + 1, *shape, generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            whole = TeacherModule(model, layout)(x)
            chunked = TeacherModule(_FixedBatch(model, batch), layout)(x)
        same = whole.shape == chunked.shape and bool(torch.allclose(
            whole, chunked, rtol=1e-4, atol=1e-5 * max(1.0, float(chunked.abs().max()))))
    except Exception:  # noqa: BLE001 - e.g. a Reshape that hard-codes the batch
        same = False
    if same:
        return model
    notes.append(f"the file fixes the batch size to {batch}: inputs are run in chunks of {batch}")
    return _FixedBatch(model, batch)


# --------------------------------------------------------------------------- TorchScript


def _load_torchscript(path: Path, trust_pickle: bool) -> Detected:
    # A TorchScript archive is a program (its code/ and its pickled constants), and torch.jit.load
    # has no restricted mode: PyTorch's security policy says to treat one like an executable from
    # its source. Reading the traced input shape below is safe; loading the program is not.
    if not trust_pickle:
        raise TeacherError(f"{path.name} is a TorchScript archive: torch.jit.load unpickles it and the "
                           "teacher then runs its code, with no safe mode; pass --trust-pickle only if you "
                           "trust it, or give the teacher as ONNX or a state_dict")
    try:
        model = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001
        raise TeacherError(f"{path.name}: cannot load the TorchScript archive: {one_line(exc)}") from None
    notes = []
    # Script modules refuse forward hooks, so their BN layers cannot feed the BN-statistics loss.
    n_bn = sum(1 for m in model.modules() if getattr(m, "original_name", "").startswith("BatchNorm"))
    if n_bn:
        notes.append(f"{n_bn} BatchNorm layers found, but TorchScript modules do not accept forward hooks: "
                     "bn_layers=0, the BN-statistics loss is unavailable (use ONNX or a state_dict + arch)")
    traced = _traced_input_shape(path)
    file_shape = tuple(traced[1:]) if traced and len(traced) == 4 else None
    if file_shape:
        notes.append(f"input shape read from the trace's example input {list(traced)}")
    return Detected(model=model, format="torchscript", file_shape=file_shape, bn_layers=0,
                    in_channels=_first_conv_channels(model.named_parameters()), notes=notes,
                    bn_reason=(f"{n_bn} BatchNorm layers, but TorchScript modules do not accept forward hooks"
                               if n_bn else None))


class _ShapeOnlyUnpickler(pickle.Unpickler):
    """Reads ``traced_inputs.pkl`` without running anything: tensors become their sizes and only
    the few globals such a file uses are resolved (to harmless stand-ins)."""

    _ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): lambda storage, offset, size, *rest: tuple(size),
        ("torch.jit._pickle", "restore_type_tag"): lambda value, _type: value,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name.endswith("Storage"):
            return name
        raise pickle.UnpicklingError(f"{module}.{name} not allowed")

    def persistent_load(self, pid):
        return None


def _traced_input_shape(path: Path) -> Optional[tuple[int, ...]]:
    """``torch.jit.trace`` stores its example inputs; their shape is the model's input shape."""
    try:
        with zipfile.ZipFile(path) as zf:
            name = next((n for n in zf.namelist() if n.endswith("/traced_inputs.pkl")), None)
            if name is None:
                return None
            data = _ShapeOnlyUnpickler(zf.open(name)).load()
        first = data["forward"][0]
        return first if isinstance(first, tuple) and all(isinstance(d, int) for d in first) else None
    except Exception:  # noqa: BLE001 - an unreadable record only means falling back to probing
        return None


def _first_conv_channels(named_tensors) -> Optional[int]:
    for _name, t in named_tensors:
        if t.dim() == 4:
            return int(t.shape[1])
    return None


# --------------------------------------------------------------------------- torch.export


# torch.export archives keep the program as JSON and the weights as raw bytes, but torch 2.13's
# torch.export.load also unpickles: tensors marked use_pickle and the sample inputs with an
# unrestricted torch.load as a fallback, "custom_obj" constants with the TorchScript
# unpickler and "opaque_obj" constants with pickle.loads. Without --trust-pickle the object
# constants are refused by name (from the archive's own config) and every torch.load inside is
# forced to weights_only=True, so nothing but tensors and plain containers is ever unpickled.
_OBJECT_CONSTANT_PREFIXES = ("custom_obj", "opaque_obj")
_PICKLE_REFUSAL = "unpickling runs code from the file: pass --trust-pickle only if you trust it"


def _refuse_pickled_objects(data: bytes, path: Path) -> None:
    """Refuse an archive with pickled Python objects, before torch reads anything of it."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for name in zf.namelist():
            if name.endswith("_constants_config.json"):
                try:
                    entries = json.loads(zf.read(name)).get("config", {})
                    objects = [k for k, v in entries.items()
                               if str(v.get("path_name", "")).startswith(_OBJECT_CONSTANT_PREFIXES)]
                except (ValueError, AttributeError):
                    raise TeacherError(f"{path.name}: the torch.export archive's {name} is malformed") from None
                if objects:
                    raise TeacherError(f"{path.name} holds pickled Python objects (constant {objects[0]}); "
                                       f"{_PICKLE_REFUSAL}")
            elif _looks_pickled(zf, name):
                try:
                    torch.load(io.BytesIO(zf.read(name)), map_location="cpu", weights_only=True)
                except Exception as exc:  # noqa: BLE001 - whatever weights_only refuses or cannot read
                    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
                    what = f" references {found.group(1)}" if found else " is not plain tensors"
                    raise TeacherError(f"{path.name} holds pickled Python objects ({name}{what}); "
                                       f"{_PICKLE_REFUSAL}") from None


def _looks_pickled(zf: zipfile.ZipFile, name: str) -> bool:
    with zf.open(name) as fh:
        head = fh.read(4)
    return head[:1] == b"\x80" or head == b"PK\x03\x04"   # a raw pickle, or a torch.save zip


@contextmanager
def _torch_unpickles_weights_only(enabled: bool):
    """Every torch.load in the block runs with weights_only=True (torch's own override switch)."""
    if not enabled:
        yield
        return
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


@contextmanager
def _quiet_logging():
    """torch.export.load logs tracebacks of its fallbacks; the user gets our one line instead."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(previous)


def _read_exported(path: Path, trust_pickle: bool):
    data = path.read_bytes()   # one read: what is checked is what is loaded
    if not trust_pickle:
        _refuse_pickled_objects(data, path)
    with _quiet_logging(), _torch_unpickles_weights_only(not trust_pickle):
        return torch.export.load(io.BytesIO(data))


def _load_exported(path: Path, trust_pickle: bool = False) -> Detected:
    try:
        program = _read_exported(path, trust_pickle)
        model = program.module()
    except TeacherError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise TeacherError(f"{path.name}: cannot load the torch.export program: {one_line(exc)}") from None
    # .module() blocks train()/eval() because the mode was baked in at export time; freeze()
    # needs eval() to walk the tree, which is harmless here, so restore nn.Module's methods.
    for name in ("train", "eval"):
        model.__dict__.pop(name, None)
    notes = []
    user = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in program.graph_signature.user_inputs]
    if len(user) != 1:
        raise TeacherError(f"{path.name}: the program takes {len(user)} inputs; a teacher takes one image batch")
    val = user[0].meta.get("val")
    dims = [d if isinstance(d, int) else None for d in val.shape] if val is not None else None
    if dims is not None and len(dims) != 4:
        raise TeacherError(f"{path.name}: the program's input has rank {len(dims)}; expected an image batch (rank 4)")
    out_node = next(n for n in program.graph.nodes if n.op == "output")
    outs = out_node.args[0]
    out_val = (outs[0] if isinstance(outs, (tuple, list)) else outs).meta.get("val")
    num_classes = out_val.shape[-1] if out_val is not None and isinstance(out_val.shape[-1], int) else None

    file_batch = dims[0] if dims else None
    if file_batch is not None:
        # A fixed batch means running big batches in chunks (see finish), and per-chunk BN
        # statistics would mislead the BN-statistics loss: leave the BN calls functional.
        notes.append(f"exported with a fixed batch size of {file_batch}: BatchNorm layers are not exposed; "
                     "re-export with dynamic_shapes (batch Dim.DYNAMIC) to use the BN-statistics loss")
        recovered, left = 0, 0
    else:
        recovered, left = recover_batchnorms(model)
    if recovered:
        notes.append(f"{recovered} functional batch_norm calls turned back into nn.BatchNorm2d modules")
    if left:
        notes.append(f"{left} batch_norm calls stay functional (no hooks): the BN-statistics loss skips them")
    return Detected(model=model, format="exported", file_shape=tuple(dims[1:]) if dims else None,
                    file_batch=file_batch, num_classes=num_classes, notes=notes,
                    bn_reason=("exported with a fixed batch size: its batch_norm calls are not exposed as layers"
                               if file_batch is not None else None))


class _EvalBatchNorm2d(nn.BatchNorm2d):
    """A BN recovered from an exported graph: the graph used running statistics, so this one
    always does, whatever train()/eval() says."""

    def train(self, mode: bool = True):
        return super().train(False)


_BN_TARGETS = ("aten.batch_norm.default", "aten._native_batch_norm_legit_no_training.default")


def recover_batchnorms(gm: torch.fx.GraphModule) -> tuple[int, int]:
    """Replace inference-mode ``batch_norm`` calls on 4-D tensors by ``nn.BatchNorm2d`` submodules
    sharing the same tensors, so that forward hooks (the BN-statistics loss) can see them.

    Only the clear case is rewritten: eval-mode calls whose parameters are module attributes.
    Everything else is left as it is; returns (rewritten, left functional).
    """
    attrs = dict(gm.named_parameters()) | dict(gm.named_buffers())
    done = left = 0
    for node in list(gm.graph.nodes):
        target = str(node.target)
        if node.op != "call_function" or target not in _BN_TARGETS:
            continue
        legit = target.startswith("aten._native")
        x, weight, bias, mean, var = node.args[:5]
        training = False if legit else node.args[5]
        eps = node.args[6] if legit else node.args[7]
        getters = [a for a in (weight, bias, mean, var) if a is not None]
        val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        users_ok = not legit or all(u.target is operator.getitem and u.args[1] == 0 for u in node.users)
        if (training or val is None or val.dim() != 4 or mean is None or var is None or not users_ok
                or any(getattr(a, "op", None) != "get_attr" or a.target not in attrs for a in getters)):
            left += 1
            continue
        bn = _EvalBatchNorm2d(val.shape[1], eps=eps, affine=weight is not None)
        if weight is not None:
            bn.weight, bn.bias = _as_param(attrs[weight.target]), _as_param(attrs[bias.target])
        bn.running_mean, bn.running_var = attrs[mean.target], attrs[var.target]
        name = f"recovered_bn{done}"
        gm.add_submodule(name, bn)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (x,))
        for user in list(node.users) if legit else [node]:
            user.replace_all_uses_with(new)
            gm.graph.erase_node(user)
        if legit:
            gm.graph.erase_node(node)
        done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
    return done, left


def _as_param(t: torch.Tensor) -> nn.Parameter:
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)


# --------------------------------------------------------------------------- torch.save files


def _load_torch_pickle(path: Path, options: TeacherOptions, trust_pickle: bool) -> Detected:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses anything but tensors and containers: here, a pickled module/class.
        obj = _unpickle_if_trusted(path, trust_pickle, refused=exc)
    except Exception as exc:  # noqa: BLE001
        raise TeacherError(f"{path.name}: cannot read the checkpoint: {one_line(exc)}") from None

    if isinstance(obj, nn.Module):
        return _from_module(obj)
    state = _find_state_dict(obj)
    if state is None:
        raise TeacherError(f"{path.name}: holds {type(obj).__name__} with no state_dict of tensors "
                           "(looked at the top level and under state_dict / model / model_state_dict)")
    return _from_state_dict(state, path, options)


def _unpickle_if_trusted(path: Path, trust_pickle: bool, refused: Exception):
    """The one place a torch.save file is unpickled with its Python objects (which runs code from
    the file): only when the user passed --trust-pickle; otherwise a TeacherError that says so and
    names the class the file references (from weights_only's refusal)."""
    if not trust_pickle:
        found = re.search(r"GLOBAL ([\w.]+)", str(refused))
        what = f" (it references {found.group(1)})" if found else ""
        raise TeacherError(f"{path.name} is a pickled Python object, not plain weights{what}; unpickling "
                           "runs code from the file: pass --trust-pickle only if you trust it") from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:  # noqa: BLE001 - e.g. the class it needs cannot be imported
        raise TeacherError(f"{path.name}: cannot unpickle: {one_line(exc)}") from None


def _from_module(model: nn.Module) -> Detected:
    # A whole module records nothing about its input: channels from the first conv, size by probing.
    return Detected(model=model, format="pickle", in_channels=_first_conv_channels(model.state_dict().items()))


def _find_state_dict(obj) -> Optional[dict]:
    if isinstance(obj, nn.Module):
        return None
    if isinstance(obj, dict):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        for key in ("state_dict", "model_state_dict", "model", "net", "ema"):
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                inner = inner.state_dict()
            found = _find_state_dict(inner) if inner is not None else None
            if found is not None:
                return found
    return None


def _strip_prefix(state: dict) -> dict:
    """DataParallel / DDP / torch.compile wrap keys as ``module.`` / ``_orig_mod.``."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _from_state_dict(state: dict, path: Path, options: TeacherOptions) -> Detected:
    if not options.arch:
        raise TeacherError(f"{path.name} holds only weights: name its architecture with --teacher-arch NAME "
                           f"(one of: {', '.join(model_names())})")
    try:
        entry = get_entry(options.arch)
    except UsageError as exc:
        raise TeacherError(str(exc)) from None
    state = _strip_prefix(state)
    notes = []
    # The classifier is the last 2-D weight; the stem is the first 4-D weight (dict order = module order).
    linear = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    # The recipe's num_classes is only a fallback here: finish() refuses it if it contradicts.
    num_classes = int(linear[-1].shape[0]) if linear else options.num_classes
    if num_classes is None:
        raise TeacherError(f"{path.name}: no Linear weight to read the number of classes from; set teacher.num_classes")
    in_channels = _first_conv_channels(state.items()) or 3
    if options.input_shape:
        size = tuple(options.input_shape[1:])
    else:
        side = 32 if options.arch.startswith("cifar_") else 224
        size = (side, side)
    try:
        model = build_model(options.arch, num_classes=num_classes, in_channels=in_channels, input_size=size)
        missing, unexpected = _load_strict(model, state)
    except Exception as exc:  # noqa: BLE001 - e.g. a shape mismatch inside load_state_dict
        raise TeacherError(f"{path.name}: weights do not fit --teacher-arch {options.arch}: {one_line(exc)}") from None
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}")
        raise TeacherError(f"{path.name}: weights do not fit --teacher-arch {options.arch}: {'; '.join(parts)}")
    if options.mean is None and entry.default_mean:
        notes.append(f"mean/std: the {options.arch} defaults")
    return Detected(model=model, format="state_dict", arch=options.arch, num_classes=num_classes,
                    mean=entry.default_mean, std=entry.default_std, default_size=size[0],
                    in_channels=in_channels, notes=notes)


def _load_strict(model: nn.Module, state: dict):
    """Strict load, but returning the missing/unexpected keys so the error can list them.

    ``num_batches_tracked`` is the one key allowed to be missing: old checkpoints predate it and
    it has no effect in eval mode. Shape mismatches still raise (the caller reports them).
    """
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    return missing, list(result.unexpected_keys)
