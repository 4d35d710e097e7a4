"""The input contract an exported student carries in its ONNX ``metadata_props``.

A student ONNX is a drop-in replacement for its teacher, so whoever runs it must feed it what the
teacher took: layout, colour order, pixel range, mean/std. :func:`write_contract` records that
(with the class count and names when known, the teacher file's sha256 and the dfkd-deploy version)
under ``dfkd_deploy.*`` keys, values as JSON; :func:`read_contract` reads it back, and
:func:`contract_differences` says in words where a teacher's resolved conventions differ from it.

Depends only on ``onnx`` and :mod:`dfkd_deploy.core` (see the package docstring).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional

from dfkd_deploy.core.errors import DataError
from dfkd_deploy.core.io import atomic_path

PREFIX = "dfkd_deploy."
_COMPARED = ("layout", "channel_order", "value_range", "mean", "std", "num_classes")


@dataclass
class StudentContract:
    layout: str                                   # NCHW | NHWC, the file's input layout
    channel_order: str = "RGB"                    # RGB | BGR
    value_range: float = 1.0                      # pixel maximum before mean/std
    mean: Optional[list[float]] = None            # per channel, on [0, value_range]; None: 0
    std: Optional[list[float]] = None             # None: 1
    input_shape: Optional[list[int]] = None       # C, H, W
    num_classes: Optional[int] = None
    class_names: Optional[list[str]] = None
    teacher_sha256: Optional[str] = None
    version: Optional[str] = None                 # dfkd-deploy version that wrote the file

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], **extra) -> "StudentContract":
        """From a ``TeacherSpec.to_dict()`` (a plain dict: exporters do not import teachers/)."""
        return cls(layout=spec.get("layout", "NCHW"), channel_order=spec.get("channel_order", "RGB"),
                   value_range=float(spec.get("value_range") or 1.0),
                   mean=_floats(spec.get("mean")), std=_floats(spec.get("std")),
                   input_shape=[int(v) for v in spec["input_shape"]] if spec.get("input_shape") else None,
                   num_classes=spec.get("num_classes") or None, **extra)

    def describe(self) -> str:
        return (f"layout {self.layout}, {self.channel_order}, pixels in [0, {self.value_range:g}], "
                f"mean {self.mean or 'none'}, std {self.std or 'none'}")


def _floats(v) -> Optional[list[float]]:
    return None if v is None else [float(x) for x in v]


def write_contract(onnx_path: str | Path, contract: StudentContract) -> dict[str, str]:
    """Add the contract to the file's metadata_props (replacing earlier ``dfkd_deploy.*`` keys),
    written atomically; returns the keys and values written."""
    import onnx

    path = Path(onnx_path)
    model = onnx.load(str(path), load_external_data=False)
    props = {PREFIX + f.name: json.dumps(getattr(contract, f.name)) for f in fields(contract)
             if getattr(contract, f.name) is not None}
    kept = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    for key, value in kept + sorted(props.items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    return props


def read_contract(onnx_path: str | Path) -> Optional[StudentContract]:
    """The contract recorded in the file, or None when it has none (e.g. exported elsewhere)."""
    import onnx

    path = Path(onnx_path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - DecodeError and friends all mean "not an ONNX file"
        raise DataError(f"cannot read {path.name} as ONNX: {type(exc).__name__}") from None
    values = {}
    for p in model.metadata_props:
        if p.key.startswith(PREFIX):
            try:
                values[p.key[len(PREFIX):]] = json.loads(p.value)
            except ValueError:
                continue   # somebody else's plain-string key under our prefix: not part of the contract
    known = {f.name for f in fields(StudentContract)}
    values = {k: v for k, v in values.items() if k in known}
    if "layout" not in values:
        return None
    return StudentContract(**values)


def contract_differences(recorded: StudentContract, resolved: StudentContract) -> list[str]:
    """Where ``resolved`` (e.g. the teacher as loaded now) differs from ``recorded`` (the student's),
    as "what: student X, teacher Y" phrases; mean/std compared to 1e-4, none meaning 0/1."""
    out = []
    channels = (recorded.input_shape or resolved.input_shape or [len(recorded.mean or resolved.mean or [0])])[0]
    for name in _COMPARED:
        a, b = getattr(recorded, name), getattr(resolved, name)
        if name in ("mean", "std"):
            fill = 0.0 if name == "mean" else 1.0
            va, vb = a or [fill] * channels, b or [fill] * channels
            same = len(va) == len(vb) and all(abs(x - y) <= 1e-4 for x, y in zip(va, vb))
        elif name == "num_classes" and (a is None or b is None):
            same = True
        else:
            same = a == b
        if not same:
            out.append(f"{name}: student {a if a is not None else 'none'}, teacher {b if b is not None else 'none'}")
    return out
