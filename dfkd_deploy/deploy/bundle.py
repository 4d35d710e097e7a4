"""The deployment bundle: everything a device engineer needs, in one directory, checkable.

Contents: student.onnx, student.int8.onnx (Q/DQ), calibration.npz (synthetic calibration and
probe images as uint8, the normalisation, and the fp32 logits on the probes), build_engine.sh
and calib_loader.py (TensorRT), README.md and manifest.json (input contract, hashes, versions,
validation figures). Engines built here (TensorRT present) are added to it.

:func:`verify_bundle` checks that the bundle holds exactly the files its manifest lists (all
inside it), the manifest's Ed25519 signature when given a public key (:mod:`.signing`), the
hashes, and reruns the ONNX Runtime validation on the bundled probes. Without a signature this
proves integrity against accidents only: hashes in the same folder can be rewritten with the files.
Everything is written in two steps (:func:`stage_bundle` copies the files and tries TensorRT;
:func:`seal_bundle` adds the validation figures, README and manifest once they are measured).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from exporters.onnx_export import INPUT_NAME, OUTPUT_NAME
from exporters.tensorrt import PROFILE_BATCHES, TIMING_CACHE, TrtResult, build_engines

from dfkd_deploy.core.errors import DataError
from dfkd_deploy.core.io import atomic_path, sha256_file, write_bytes, write_json, write_text
from dfkd_deploy.images import uint8_to_model
from dfkd_deploy.deploy import signing
from dfkd_deploy.report.manifest import library_versions, path_problem, verify_manifest
from dfkd_deploy.runtime.onnxruntime import OrtRunner

BUNDLE_VERSION = 1
MANIFEST = signing.MANIFEST
CALIBRATION = "calibration.npz"
FP32, INT8 = "student.onnx", "student.int8.onnx"
FP32_ATOL = 1e-4            # verify: ORT fp32 logits vs the recorded ones (same file, same inputs)
INT8_AGREEMENT_SLACK = 0.02  # verify: int8 kernels differ a little across CPUs (VNNI or not)
# The files every bundle of BUNDLE_VERSION has, and those it may have (int8 and engines: see expected_files).
BUNDLE_FILES = (FP32, CALIBRATION, "build_engine.sh", "calib_loader.py", "README.md")
OPTIONAL_BUNDLE_FILES = (INT8, TIMING_CACHE)


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
    calib_ms = uint8_to_model(np.asarray(calibration_uint8), spec.mean, spec.std, spec.value_range)
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
            "value_range": spec.value_range, "channel_order": spec.channel_order,
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
    if (out / signing.SIGNATURE).is_file():
        (out / signing.SIGNATURE).unlink()   # signed an earlier manifest: sign this one again (`bundle sign`)
    return manifest


@dataclass
class BundleCheck:
    problems: list[str] = field(default_factory=list)
    checks: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_bundle(bundle_dir: str | Path, public_key: str | Path | None = None) -> BundleCheck:
    """Paths, file set and signature, then hashes, then ONNX Runtime fp32/int8 on the bundled
    probes vs the recorded figures.

    ``public_key``: a PEM Ed25519 public key; ``manifest.sig`` must then be its signature of
    manifest.json. Without it the check proves integrity against accidents only.
    Raises :class:`DataError` (exit 2) when ``bundle_dir`` is not a bundle at all, UsageError
    for an unreadable key; returns the problems (exit 1 when any) otherwise.
    """
    out = Path(bundle_dir)
    key = signing.load_public_key(public_key) if public_key is not None else None
    manifest = _read_manifest(out)
    layout, validation = manifest["input"]["layout"], manifest["validation"]
    result = BundleCheck(problems=check_paths(out, manifest))
    if result.problems:
        return result   # nothing named by the manifest is read until every name is safe
    result.problems += check_file_set(out, manifest)
    result.problems += check_signature(out, key, result.checks)
    result.problems += verify_manifest(out)
    if result.problems or not (out / CALIBRATION).is_file():
        return result   # changed files: rerunning them would only restate the mismatch
    _check_contract(out / FP32, manifest, result)
    with np.load(out / CALIBRATION) as npz:
        probes = uint8_to_model(npz["probes"], npz["mean"], npz["std"], float(npz["value_range"]))
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


def sign_bundle(bundle_dir: str | Path, private_key: str | Path) -> tuple[Path, str]:
    """Sign the bundle's manifest.json with a PEM Ed25519 private key; returns (manifest.sig, key fingerprint).

    Refused (:class:`DataError`) unless the bundle first passes the path, file-set and hash checks:
    a signature vouches for what is there."""
    out = Path(bundle_dir)
    key = signing.load_private_key(private_key)
    manifest = _read_manifest(out)
    problems = check_paths(out, manifest)
    problems = problems or check_file_set(out, manifest) + verify_manifest(out)
    if problems:
        raise DataError(f"{out} not signed: {problems[0]}" + (f" (and {len(problems) - 1} more problems)"
                                                             if len(problems) > 1 else ""))
    return signing.sign_manifest(out, key), signing.fingerprint(key.public_key())


def _read_manifest(out: Path) -> dict:
    """The bundle's manifest.json; :class:`DataError` when ``out`` is not a bundle."""
    if (out / "bundle" / MANIFEST).is_file() and not (out / CALIBRATION).is_file():
        raise DataError(f"{out} is a run directory, not a bundle: verify its bundle with "
                        f"`dfkd-deploy bundle verify {out / 'bundle'}`")
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        manifest["input"]["layout"], manifest["validation"]
        if not isinstance(manifest["artifacts"], dict):
            raise TypeError("artifacts is not a mapping")
    except FileNotFoundError:
        raise DataError(f"{out} is not a bundle: {MANIFEST} missing") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{out / MANIFEST} is unreadable: {type(exc).__name__}: {exc}") from None
    return manifest


def check_paths(out: Path, manifest: Mapping[str, Any]) -> list[str]:
    """Every name the manifest lists (and manifest.json, manifest.sig) stays inside the bundle."""
    names = [*manifest["artifacts"], MANIFEST] + ([signing.SIGNATURE] if os.path.lexists(out / signing.SIGNATURE)
                                                  else [])
    return [p for p in (path_problem(out, n) for n in names) if p]


def expected_files(manifest: Mapping[str, Any]) -> tuple[set[str], set[str]]:
    """(required, allowed) artifact names for a bundle of this manifest's version.

    Required: the fixed files of every bundle, the int8 model when the manifest records int8
    figures, the engines its tensorrt section names. Allowed besides: the optional fixed names."""
    required = set(BUNDLE_FILES)
    if ((manifest.get("validation") or {}).get("int8") or {}).get("top1_agreement_vs_fp32") is not None:
        required.add(INT8)
    engines = ((manifest.get("tensorrt") or {}).get("engines") or {}).values()
    required |= {e["file"] for e in engines if isinstance(e, dict) and isinstance(e.get("file"), str)}
    required |= _runtime_file_names(manifest)
    return required, required | set(OPTIONAL_BUNDLE_FILES)


def _runtime_file_names(manifest: Mapping[str, Any]) -> set[str]:
    """The OpenVINO / ExecuTorch files the manifest's runtimes section says were built."""
    names: set[str] = set()
    for f in (manifest.get("runtimes") or {}).get("files") or []:
        if isinstance(f, dict):
            names |= {n for n in (f.get("file"), *(f.get("extra_files") or [])) if isinstance(n, str)}
    return names


def check_file_set(out: Path, manifest: Mapping[str, Any]) -> list[str]:
    """The manifest lists exactly the expected files, and the bundle holds exactly those (no more)."""
    version = manifest.get("bundle_version")
    if version != BUNDLE_VERSION:
        return [f"{MANIFEST}: bundle_version {version!r}, this dfkd-deploy knows version {BUNDLE_VERSION}"]
    listed = set(manifest["artifacts"])
    required, allowed = expected_files(manifest)
    problems = [f"{n}: a bundle of version {version} has it, {MANIFEST} does not list it"
                for n in sorted(required - listed)]
    problems += [f"{n}: listed in {MANIFEST} but not a file a bundle of version {version} has"
                 for n in sorted(listed - allowed)]
    present = set(_entries_on_disk(out)) - {MANIFEST, signing.SIGNATURE}
    problems += [f"{n}: in the bundle but not listed in {MANIFEST} (added or changed after the bundle was made)"
                 for n in sorted(present - listed)]
    return problems


def check_signature(out: Path, public_key, checks: dict) -> list[str]:
    """With a key, ``manifest.sig`` must be its signature of manifest.json; without, say what that leaves."""
    if public_key is None:
        checks["signature"] = ("not checked (no --key): this proves integrity against accidents only, "
                               "not authenticity; anyone can rewrite files and hashes together")
        return []
    problems = signing.signature_problems(out, public_key)
    checks["signature"] = ("INVALID" if problems else "valid") + f" (Ed25519 key {signing.fingerprint(public_key)})"
    return problems


def _entries_on_disk(out: Path) -> list[str]:
    """Bundle-relative names of every entry but real directories (links are not followed)."""
    names = []
    for top, dirs, files in os.walk(out, followlinks=False):
        rel = Path(top).relative_to(out)
        names += [(rel / d).as_posix() for d in dirs if (Path(top) / d).is_symlink()]
        names += [(rel / f).as_posix() for f in files]
    return names


def _check_contract(onnx_path: Path, manifest: Mapping[str, Any], result: BundleCheck) -> None:
    """The input contract recorded in the student ONNX must be the manifest's."""
    from exporters.metadata import StudentContract, contract_differences, read_contract

    recorded = read_contract(onnx_path)
    if recorded is None:
        result.checks["contract"] = f"not recorded in {onnx_path.name}"
        return
    norm, inp = manifest.get("normalisation") or {}, manifest.get("input") or {}
    stated = StudentContract(layout=inp.get("layout"), channel_order=norm.get("channel_order", "RGB"),
                             value_range=float(norm.get("value_range") or 1.0), mean=norm.get("mean"),
                             std=norm.get("std"), num_classes=(manifest.get("classes") or {}).get("count"))
    diffs = contract_differences(recorded, stated)
    result.checks["contract"] = "matches the manifest" if not diffs else "differs"
    if diffs:
        result.problems.append(f"{onnx_path.name}'s recorded input contract differs from {MANIFEST}: "
                               + "; ".join(d.replace("teacher", "manifest") for d in diffs))


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
        f"- colour channel order: {norm.get('channel_order', 'RGB')}"
        + (" (feed BGR images: flip the channels of RGB ones)" if norm.get("channel_order") == "BGR" else ""),
        _contract_line(staged.path / FP32),
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
    lines += ["", "Check the bundle after copying it, before building on it: `dfkd-deploy bundle verify <this "
              "directory> --key public.pem` (exactly the listed files, signature, hashes, then fp32/int8 and every "
              "installed edge runtime rerun on the probes; exit 0 ok, 1 mismatch, 2 not a bundle). Without `--key` "
              "(or `manifest.sig`) it proves integrity against accidents only, not who made the bundle.", ""]
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

def _contract_line(onnx_path: Path) -> str:
    from exporters.metadata import read_contract

    if onnx_path.is_file() and read_contract(onnx_path) is not None:
        return (f"- `{FP32}` carries this contract in its ONNX metadata (`dfkd_deploy.*` keys: layout, channel "
                "order, value range, mean/std, classes, teacher sha256, dfkd-deploy version); `bundle verify` "
                "checks it against this manifest")
    return f"- `{FP32}` records no input contract in its metadata: this README and {MANIFEST} are the contract"



def _layout_shape(chw, layout: str) -> list[int]:
    c, h, w = (int(v) for v in chw)
    return [h, w, c] if layout.upper() == "NHWC" else [c, h, w]


def _pct(v) -> str:
    return "-" if v is None else f"{100 * float(v):.2f} %"

