"""Edge runtimes of the hand-off bundle: OpenVINO IR (fp32, fp16, int8 by NNCF) and ExecuTorch
programs (XNNPACK fp32 and int8), each built where its package is installed, run through the
same :class:`~dfkd_deploy.runtime.base.Runner` interface, and rechecked by ``bundle verify``.

A runtime that is not installed is skipped with one line (the ONNX hand-off never depends on
it); a precision that fails to build is recorded with its reason and the others go ahead.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from torch import nn

from exporters import executorch as et_export
from exporters import openvino as ov_export

from dfkd_deploy.core.errors import DfkdError, ExportError
from dfkd_deploy.runtime.base import Runner
from dfkd_deploy.runtime.executorch import MISSING_RUNTIME as ET_MISSING, ExecuTorchRunner, executorch_runtime
from dfkd_deploy.runtime.openvino import OpenVinoRunner, openvino_module

RUNTIMES = ("openvino", "executorch")
AGREEMENT_SLACK = 0.02      # verify: int8/fp16 kernels differ a little across CPUs
FP32_ATOL = 1e-3            # verify: another fp32 runtime vs ORT's recorded logits (other kernels)
RUNTIME_OF = {"openvino": "OpenVINO (CPU/GPU/NPU plugins)", "executorch": "ExecuTorch (XNNPACK delegate)"}


@dataclass
class EdgeFile:
    runtime: str
    precision: str
    file: str                               # the model file a runtime loads (.xml or .pte)
    extra_files: list[str] = field(default_factory=list)   # weights beside it (.bin)
    probe_agreement_vs_fp32: Optional[float] = None        # vs ORT fp32 on the bundled probes
    probe_max_abs_diff_vs_fp32: Optional[float] = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class EdgeBuild:
    """What was built per runtime (manifest ``runtimes``), the runners, and what was skipped."""

    files: list[EdgeFile] = field(default_factory=list)
    runners: list[Runner] = field(default_factory=list)
    versions: dict[str, Optional[str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)     # runtime -> one line
    errors: dict[str, str] = field(default_factory=dict)      # "runtime precision" -> one line
    details: dict[str, dict] = field(default_factory=dict)    # runtime -> exporter result

    def bundle_files(self) -> list[str]:
        return [n for f in self.files for n in (f.file, *f.extra_files)]

    def to_dict(self) -> dict:
        return {"files": [f.to_dict() for f in self.files], "versions": dict(self.versions),
                "skipped": dict(self.skipped), "errors": dict(self.errors), "details": dict(self.details)}


def build_edge(bundle_dir: str | Path, *, student: nn.Module, student_onnx: str | Path, calibration: np.ndarray,
               probes: np.ndarray, probe_logits_fp32: np.ndarray, spec,
               runtimes: Sequence[str] = RUNTIMES) -> EdgeBuild:
    """Build every installed runtime's files into ``bundle_dir`` and check them on the probes.

    ``calibration`` and ``probes`` are model-space NCHW float32 (synthetic only);
    ``probe_logits_fp32`` ORT fp32's logits on the probes (what verify compares with).
    """
    out, build = Path(bundle_dir), EdgeBuild()
    for runtime in runtimes:
        try:
            if runtime == "openvino":
                _openvino(build, out, student_onnx, calibration, spec.layout)
            elif runtime == "executorch":
                _executorch(build, out, student, calibration, spec.input_shape)
            else:
                build.skipped[runtime] = f"unknown edge runtime {runtime!r}"
        except DfkdError as exc:   # not installed (or the conversion failed as a whole)
            build.skipped[runtime] = str(exc)
    for f, runner in zip(build.files, build.runners):
        agree, diff = probe_check(runner, probes, probe_logits_fp32)
        f.probe_agreement_vs_fp32, f.probe_max_abs_diff_vs_fp32 = agree, diff
    return build


def make_runner(bundle_dir: str | Path, f: Mapping[str, Any], layout: str) -> Runner:
    """A runner for one manifest ``runtimes.files`` entry (ExportError when its runtime is absent)."""
    path = Path(bundle_dir) / f["file"]
    if f["runtime"] == "openvino":
        return OpenVinoRunner(path, layout=layout, precision=f["precision"])
    return ExecuTorchRunner(path, precision=f["precision"], max_batch=int(f.get("max_batch") or et_export.MAX_BATCH))


def installed(runtime: str) -> bool:
    return (openvino_module() is not None) if runtime == "openvino" else (executorch_runtime() is not None)


def probe_check(runner: Runner, probes: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, max abs diff) of ``runner`` on ``probes`` against ``reference`` logits."""
    got = np.asarray(runner.predict(probes), np.float64)
    if got.shape != reference.shape:
        return 0.0, float("inf")
    agree = float((got.argmax(1) == reference.argmax(1)).mean()) if len(got) else 1.0
    return agree, float(np.abs(got - reference).max()) if got.size else 0.0


def rerun_runtimes(bundle_dir: str | Path, manifest: Mapping[str, Any], probes: np.ndarray,
                   recorded: np.ndarray) -> tuple[list[str], dict, dict]:
    """``bundle verify``'s edge step: rerun every bundled edge file whose runtime is installed.

    Returns (problems, checks, skipped: name -> one line why). fp32 files must match the recorded ORT fp32
    logits within :data:`FP32_ATOL`; every file must agree top-1 at least as well as recorded,
    less :data:`AGREEMENT_SLACK`.
    """
    problems, checks, skipped = [], {}, {}
    section = manifest.get("runtimes") or {}
    layout = manifest["input"]["layout"]
    for runtime, reason in (section.get("skipped") or {}).items():
        skipped[runtime] = f"not in this bundle ({reason})"
    for f in section.get("files") or []:
        if not installed(f["runtime"]):
            skipped[f["file"]] = f"{f['runtime']} is not installed here; not rerun"
            continue
        try:
            agree, diff = probe_check(make_runner(bundle_dir, f, layout), probes, recorded)
        except Exception as exc:  # noqa: BLE001 - a file that does not run is a problem, not a crash
            problems.append(f"{f['file']}: {f['runtime']} cannot run it: {type(exc).__name__}: {exc}".splitlines()[0])
            continue
        checks[f["file"]] = {"top1_agreement_vs_fp32": agree, "max_abs_diff_vs_fp32": diff}
        want = f.get("probe_agreement_vs_fp32")
        if want is not None and agree < want - AGREEMENT_SLACK:
            problems.append(f"{f['file']}: top-1 agreement with fp32 {agree:.4f}, recorded {want:.4f} "
                            f"(allowed slack {AGREEMENT_SLACK})")
        if f["precision"] == "fp32" and diff > FP32_ATOL:
            problems.append(f"{f['file']}: logits differ from the recorded fp32 ones by {diff:.3g} (> {FP32_ATOL:g})")
    return problems, checks, skipped


# --- per runtime -------------------------------------------------------------------------------

def _openvino(build: EdgeBuild, out: Path, onnx_path, calibration, layout: str) -> None:
    res = ov_export.convert_openvino(onnx_path, out, calibration=calibration, layout=layout)
    build.versions["openvino"], build.versions["nncf"] = res.version, res.nncf_version
    build.details["openvino"] = res.to_dict()
    for precision, xml in res.files.items():
        build.files.append(EdgeFile("openvino", precision, xml, [ov_export.weights_of(xml)]))
        build.runners.append(OpenVinoRunner(out / xml, layout=layout, precision=precision))
    build.errors.update({f"openvino {p}": e for p, e in res.errors.items()})


def _executorch(build: EdgeBuild, out: Path, student, calibration, input_shape) -> None:
    if executorch_runtime() is None:
        raise ExportError(ET_MISSING)
    res = et_export.export_executorch(student, out, input_shape=input_shape, calibration=calibration)
    build.versions["executorch"] = res.version
    build.details["executorch"] = res.to_dict()
    for precision, pte in res.files.items():
        build.files.append(EdgeFile("executorch", precision, pte))
        build.runners.append(ExecuTorchRunner(out / pte, precision=precision, max_batch=res.max_batch,
                                              input_shape=input_shape))
    build.errors.update({f"executorch {p}": e for p, e in res.errors.items()})

