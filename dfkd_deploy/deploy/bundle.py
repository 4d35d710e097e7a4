"""The deployment bundle: everything a device engineer needs, in one directory, checkable.

Contents: student.onnx, student.int8.onnx (Q/DQ), calibration.npz (synthetic calibration and
probe images as uint8, the normalisation, and the fp32 logits on the probes), build_engine.sh
and calib_loader.py (TensorRT), README.md and manifest.json (input contract, hashes, versions,
validation figures). Engines built here (TensorRT present) are added to it.

:func:`verify_bundle` rechecks the hashes and reruns the ONNX Runtime validation on the bundled
probes, so a bundle copied to another machine can be trusted before anyone builds from it.
Everything is written in two steps (:func:`stage_bundle` copies the files and tries TensorRT;
:func:`seal_bundle` adds the validation figures, README and manifest once they are measured).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from exporters.onnx_export import INPUT_NAME, OUTPUT_NAME
from exporters.tensorrt import PROFILE_BATCHES, TrtResult, build_engines

from dfkd_deploy.core.errors import DataError
from dfkd_deploy.core.io import atomic_path, sha256_file, write_bytes, write_json, write_text
from dfkd_deploy.report.manifest import library_versions, verify_manifest
from dfkd_deploy.runtime.onnxruntime import OrtRunner

BUNDLE_VERSION = 1
MANIFEST = "manifest.json"
CALIBRATION = "calibration.npz"
FP32, INT8 = "student.onnx", "student.int8.onnx"
FP32_ATOL = 1e-4            # verify: ORT fp32 logits vs the recorded ones (same file, same inputs)
INT8_AGREEMENT_SLACK = 0.02  # verify: int8 kernels differ a little across CPUs (VNNI or not)


@dataclass
class StagedBundle:
    path: Path
    files: list[str]
    tensorrt: TrtResult
    has_int8: bool

    def engine_files(self) -> list[str]:
        return [e["file"] for e in self.tensorrt.engines.values() if e.get("file")]


def stage_bundle(bundle_dir: str | Path, *, student_onnx: str | Path, student_int8_onnx: str | Path | None,
                 calibration_uint8: np.ndarray, probes_uint8: np.ndarray, probe_logits_fp32: np.ndarray,
                 spec, trt_precisions: Sequence[str] = ("fp32", "fp16", "int8"),
                 profile_batches: Optional[Sequence[int]] = None) -> StagedBundle:
    """Copy the models, write calibration.npz and build_engine.sh, build engines when TensorRT is here.

    ``spec`` is the teacher's :class:`~dfkd_deploy.teachers.spec.TeacherSpec`: the student
    takes the same input (layout, normalisation) as the teacher file.
    """
    out = Path(bundle_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [FP32]
    write_bytes(out / FP32, Path(student_onnx).read_bytes())
    has_int8 = bool(student_int8_onnx) and Path(student_int8_onnx).is_file()
    if has_int8:
        write_bytes(out / INT8, Path(student_int8_onnx).read_bytes())
        files.append(INT8)
    elif (out / INT8).exists():
        (out / INT8).unlink()   # a stale int8 file from an earlier bundle would not match this student
    c = spec.input_shape[0]
    with atomic_path(out / CALIBRATION) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(
                fh, calibration=np.asarray(calibration_uint8, np.uint8), probes=np.asarray(probes_uint8, np.uint8),
                probe_logits_fp32=np.asarray(probe_logits_fp32, np.float32),
                mean=np.asarray(spec.mean or [0.0] * c, np.float32), std=np.asarray(spec.std or [1.0] * c, np.float32),
                value_range=np.float32(spec.value_range))
    files.append(CALIBRATION)
    calib_ms = _model_space(np.asarray(calibration_uint8), spec.mean, spec.std, spec.value_range)
    trt = build_engines(out, out / FP32, input_shape=spec.input_shape, layout=spec.layout,
                        precisions=trt_precisions, int8_onnx=out / INT8 if has_int8 else None,
                        calibration=calib_ms, batches=tuple(profile_batches or PROFILE_BATCHES))
    files += ["build_engine.sh", "calib_loader.py"]
    trt.script = "build_engine.sh"   # relative: the bundle moves between machines
    staged = StagedBundle(out, files, trt, has_int8)
    staged.files += staged.engine_files() + (["timing.cache"] if (out / "timing.cache").is_file() else [])
    return staged


def seal_bundle(staged: StagedBundle, *, spec, validation: Mapping[str, Any], class_names: Optional[list[str]] = None,
                comparison_md: str = "", seed: Optional[int] = None,
                runtimes: Optional[Mapping[str, Any]] = None) -> dict:
    """Write README.md and manifest.json (hashing every bundled file); returns the manifest.

    ``runtimes`` is the edge runtimes' section (:meth:`dfkd_deploy.deploy.edge.EdgeBuild.to_dict`)."""
    out = staged.path
    profile = staged.tensorrt.profile or {}
    manifest = {
        "bundle_version": BUNDLE_VERSION,
        "seed": seed,
        "input": {"name": INPUT_NAME, "dtype": "float32", "layout": spec.layout,
                  "shape": ["batch", *_layout_shape(spec.input_shape, spec.layout)], "shape_range": profile},
        "output": {"name": OUTPUT_NAME, "kind": "logits", "shape": ["batch", spec.num_classes]},
        "normalisation": {
            "mean": list(spec.mean) if spec.mean else None, "std": list(spec.std) if spec.std else None,
            "value_range": spec.value_range,
            "formula": "input = (pixel / 255 * value_range - mean) / std   (pixel: uint8; no mean/std means 0/1)",
        },
        "classes": {"count": spec.num_classes, "names": class_names},
        "teacher": {"source": Path(spec.source).name, "format": spec.format},
        "versions": library_versions(),
        "tensorrt": staged.tensorrt.to_dict(),
        "runtimes": dict(runtimes or {}),
        "validation": dict(validation),
    }
    write_text(out / "README.md", render_readme(manifest, staged, comparison_md))
    names = list(dict.fromkeys(staged.files + ["README.md"]))
    manifest["artifacts"] = {n: {"sha256": sha256_file(out / n), "bytes": (out / n).stat().st_size} for n in names}
    write_json(out / MANIFEST, manifest)
    return manifest


@dataclass
class BundleCheck:
    problems: list[str] = field(default_factory=list)
    checks: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_bundle(bundle_dir: str | Path) -> BundleCheck:
    """Hashes, then ONNX Runtime fp32/int8 on the bundled probes vs the recorded figures.

    Raises :class:`DataError` (exit 2) when ``bundle_dir`` is not a bundle at all; returns the
    problems (exit 1 when any) otherwise.
    """
    out = Path(bundle_dir)
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        layout, validation = manifest["input"]["layout"], manifest["validation"]
        manifest["artifacts"]
    except FileNotFoundError:
        raise DataError(f"{out} is not a bundle: {MANIFEST} missing") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{out / MANIFEST} is unreadable: {type(exc).__name__}: {exc}") from None

    result = BundleCheck(problems=verify_manifest(out))
    if result.problems or not (out / CALIBRATION).is_file():
        return result   # changed files: rerunning them would only restate the mismatch
    with np.load(out / CALIBRATION) as npz:
        probes = _model_space(npz["probes"], npz["mean"], npz["std"], float(npz["value_range"]))
        recorded = npz["probe_logits_fp32"]
    fp32 = OrtRunner(out / FP32, layout=layout).predict(probes)
    diff = float(np.abs(fp32.astype(np.float64) - recorded).max()) if fp32.size else 0.0
    result.checks["fp32_max_abs_diff_vs_recorded"] = diff
    if fp32.shape != recorded.shape or diff > FP32_ATOL:
        result.problems.append(f"{FP32}: logits differ from the recorded ones by {diff:.3g} (> {FP32_ATOL:g})")
    want = (validation.get("int8") or {}).get("top1_agreement_vs_fp32")
    if (out / INT8).is_file() and want is not None:
        int8 = OrtRunner(out / INT8, layout=layout, precision="int8").predict(probes)
        agree = float((int8.argmax(1) == fp32.argmax(1)).mean())
        result.checks["int8_top1_agreement_vs_fp32"] = agree
        if agree < want - INT8_AGREEMENT_SLACK:
            result.problems.append(f"{INT8}: top-1 agreement with fp32 {agree:.4f}, recorded {want:.4f} "
                                   f"(allowed slack {INT8_AGREEMENT_SLACK})")
    _rerun_edge_runtimes(out, manifest, probes, recorded, result)
    return result


def _rerun_edge_runtimes(out: Path, manifest: Mapping[str, Any], probes: np.ndarray, recorded: np.ndarray,
                         result: BundleCheck) -> None:
    """OpenVINO / ExecuTorch files rerun where their runtime is installed; one line per skip."""
    from dfkd_deploy.deploy.edge import rerun_runtimes

    problems, checks, skipped = rerun_runtimes(out, manifest, probes, recorded)
    result.problems += problems
    result.checks.update({f"{name} top-1 agreement": c["top1_agreement_vs_fp32"] for name, c in checks.items()})
    result.checks.update({f"{name} skipped": why for name, why in skipped.items()})


# --- README ------------------------------------------------------------------------------------

def render_readme(manifest: Mapping[str, Any], staged: StagedBundle, comparison_md: str = "") -> str:
    inp, norm, trt = manifest["input"], manifest["normalisation"], manifest["tensorrt"]
    val = manifest.get("validation") or {}
    rng = inp.get("shape_range") or {}
    lines = [
        "# Student model: deployment bundle",
        "",
        "A data-free distilled student, a drop-in replacement for the teacher "
        f"`{manifest['teacher']['source']}` (same input, logits out).",
        "",
        "## Files",
        "",
        "| File | What |",
        "|---|---|",
        f"| `{FP32}` | ONNX Runtime, TensorRT (build_engine.sh), any ONNX runtime: fp32 student, dynamic batch |",
    ]
    if staged.has_int8:
        lines.append(f"| `{INT8}` | ONNX Runtime, TensorRT: int8 Q/DQ student (symmetric, calibrated on synthetic images only) |")
    lines += [
        *_runtime_rows(manifest.get("runtimes") or {}),
        f"| `{CALIBRATION}` | synthetic calibration images and held-out probes (uint8 NCHW), their normalisation, fp32 probe logits |",
        "| `build_engine.sh` | TensorRT engine builds (trtexec); `calib_loader.py` feeds polygraphy calibration |",
        f"| `{MANIFEST}` | input contract, sha256 of every file, versions, validation figures |",
        "",
        "## Input contract",
        "",
        f"- tensor `{inp['name']}`, {inp['dtype']}, layout {inp['layout']}, shape {inp['shape']}",
        f"- TensorRT profile: min {rng.get('min')}, opt {rng.get('opt')}, max {rng.get('max')}",
        f"- normalisation: {norm['formula']}; mean {norm['mean']}, std {norm['std']}, value_range {norm['value_range']}",
        f"- output `{manifest['output']['name']}`: {manifest['output']['shape']} logits, "
        f"{manifest['classes']['count']} classes" + (f" ({', '.join(manifest['classes']['names'])})"
                                                     if manifest['classes'].get('names') else ""),
        "",
        "## Building engines",
        "",
        "```",
        "./build_engine.sh            # fp32, fp16 and int8 (int8 from the Q/DQ model)",
        "./build_engine.sh int8-calib # int8 calibrated by TensorRT on calibration.npz (polygraphy)",
        "```",
        "",
    ]
    if trt.get("available"):
        lines.append(f"Engines built with TensorRT {trt.get('version')} on {trt.get('gpu')}: "
                     + ", ".join(f"{p}: {e.get('file') or e.get('error')}" for p, e in trt.get("engines", {}).items()))
    else:
        lines.append("No engine was built when the bundle was made (TensorRT absent there); engines are "
                     "specific to the GPU and TensorRT version, so build them on the device.")
    lines += ["", "## Validation", ""]
    int8 = val.get("int8") or {}
    if int8:
        lines.append(f"- int8 vs fp32 top-1 agreement on {int8.get('probe_images')} held-out synthetic probes: "
                     f"{_pct(int8.get('top1_agreement_vs_fp32'))}")
    for key, label in (("student_accuracy", "student accuracy (eval data)"),
                       ("teacher_accuracy", "teacher accuracy (eval data)"),
                       ("agreement_top1", "teacher-student agreement")):
        if val.get(key) is not None:
            lines.append(f"- {label}: {_pct(val[key])}")
    if comparison_md:
        lines += ["", comparison_md]
    lines += ["", "Check the bundle after copying it: `dfkd-deploy bundle verify <this directory>` "
              "(hashes, then fp32/int8 and every installed edge runtime rerun on the probes; exit 0 ok, 1 mismatch, 2 not a bundle).", ""]
    return "\n".join(lines)


def _runtime_rows(runtimes: Mapping[str, Any]) -> list[str]:
    """README rows: which file is for which runtime (OpenVINO IR, ExecuTorch programs)."""
    from dfkd_deploy.deploy.edge import RUNTIME_OF

    what = {("openvino", "fp32"): "fp32 IR", ("openvino", "fp16"): "IR with fp16-compressed weights",
            ("openvino", "int8"): "int8 IR (NNCF, calibrated on synthetic images only)",
            ("executorch", "fp32"): "fp32 program, NCHW input, batch up to the export's max",
            ("executorch", "int8"): "int8 program (XNNPACK quantizer, calibrated on synthetic images only)"}
    versions = runtimes.get("versions") or {}
    rows = []
    for f in runtimes.get("files") or []:
        names = " + ".join(f"`{n}`" for n in (f["file"], *f.get("extra_files", [])))
        rows.append(f"| {names} | {RUNTIME_OF.get(f['runtime'], f['runtime'])} "
                    f"{versions.get(f['runtime']) or ''}: {what.get((f['runtime'], f['precision']), f['precision'])} |")
    rows += [f"| - | {RUNTIME_OF.get(r, r)}: not built ({why}) |" for r, why in (runtimes.get("skipped") or {}).items()]
    return rows


# --- helpers -----------------------------------------------------------------------------------

def _model_space(images_uint8, mean, std, value_range) -> np.ndarray:
    from exporters.ort_quant import to_model_space

    mean = None if mean is None else [float(v) for v in np.asarray(mean).ravel()]
    std = None if std is None else [float(v) for v in np.asarray(std).ravel()]
    return to_model_space(np.asarray(images_uint8), mean, std, float(value_range))


def _layout_shape(chw, layout: str) -> list[int]:
    c, h, w = (int(v) for v in chw)
    return [h, w, c] if layout.upper() == "NHWC" else [c, h, w]


def _pct(v) -> str:
    return "-" if v is None else f"{100 * float(v):.2f} %"

