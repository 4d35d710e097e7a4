"""The hand-off stage of a finished run: INT8, bundle (+ TensorRT or its script), back-end
comparison, latency and size; one :class:`~dfkd_deploy.deploy.results.DeployResult` back."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from torch import nn

from exporters.ort_quant import CALIBRATION_IMAGES, quantize_student, sample_calibration

from dfkd_deploy.core.errors import DfkdError
from dfkd_deploy.deploy import latency as lat
from dfkd_deploy.deploy.bundle import CALIBRATION, FP32, INT8, MANIFEST, StagedBundle, seal_bundle, stage_bundle
from dfkd_deploy.deploy.compare import Comparison, Dataset, compare_backends
from dfkd_deploy.deploy.edge import RUNTIMES, EdgeBuild, build_edge
from dfkd_deploy.deploy.results import BundleInfo, DeployResult, Int8Result, RunFigures
from dfkd_deploy.report.deploy_md import comparison_markdown
from dfkd_deploy.runtime.base import Runner
from dfkd_deploy.runtime.onnxruntime import OrtRunner
from dfkd_deploy.runtime.tensorrt import MAX_BATCH, TrtRunner
from dfkd_deploy.runtime.torch import TorchRunner
from dfkd_deploy.images import pixels_to_uint8, uint8_to_model
from dfkd_deploy.synthesis.pool import ImagePool

COMPARE_EVAL_IMAGES = 1024   # real eval images in the back-end comparison (float copies cost memory)


@dataclass(frozen=True)
class DeployOptions:
    """The recipe's deploy settings and the run's knobs for the hand-off stage."""

    seed: int = 0
    bundle_dir: Optional[Path] = None                 # default: run_dir/bundle
    calibration_images: Optional[int] = None          # default: exporters.ort_quant.CALIBRATION_IMAGES
    profile_batches: Optional[Sequence[int]] = None   # TensorRT profile min/opt/max batch
    compare_eval_images: int = COMPARE_EVAL_IMAGES
    latency_repeats: int = lat.REPEATS
    latency_warmup: int = lat.WARMUP
    edge_runtimes: Sequence[str] = RUNTIMES           # built where installed, skipped with a line otherwise


@dataclass
class _Inputs:
    """Probes and calibration images as uint8 (what the bundle stores and `bundle verify` reruns)
    and in model space (what the models take)."""

    probes_u8: np.ndarray
    probes_ms: np.ndarray
    calib_u8: np.ndarray
    calib_ms: np.ndarray


def run_deployment(teacher, student: nn.Module, run_dir: str | Path, *, probes, eval_data=None,
                   figures: RunFigures = RunFigures(), options: DeployOptions = DeployOptions(),
                   echo: Callable[[str], object] = print) -> DeployResult:
    """INT8, bundle (+ TensorRT or its script), back-end comparison and latency for ``run_dir``.

    ``probes`` are the held-out synthetic probes (pixel space); ``eval_data`` an EvalData or None;
    ``figures`` the run's accuracy/agreement figures, copied into the bundle manifest.
    """
    run_dir, spec = Path(run_dir), teacher.spec
    bundle_dir = Path(options.bundle_dir) if options.bundle_dir else run_dir / "bundle"
    inputs = _inputs(probes, run_dir / "pool", spec, options)
    int8 = _quantize(run_dir / FP32, run_dir / INT8, inputs, spec.layout)
    fp32_runner = OrtRunner(run_dir / FP32, layout=spec.layout)
    int8_runner = OrtRunner(run_dir / INT8, layout=spec.layout, precision="int8") if int8.produced else None
    staged = _stage(bundle_dir, fp32_runner, int8_runner, inputs, spec, options.profile_batches)
    if not staged.tensorrt.available:
        echo(staged.tensorrt.message)
    edge = _edge(staged, student, inputs, spec, options.edge_runtimes, echo)

    others = ([fp32_runner] + ([int8_runner] if int8_runner else []) + _engine_runners(staged, spec.layout)
              + edge.runners)
    comparison = _compare(student, others, _datasets(inputs, eval_data, spec, options.compare_eval_images))
    int8.accuracy = comparison.accuracy("onnxruntime", "int8")
    measured = lat.latency_and_size(teacher, fp32_runner, student_int8=int8_runner,
                                    student_params=_params(student), teacher_params=_params(teacher.module),
                                    others=edge.runners, repeats=options.latency_repeats,
                                    warmup=options.latency_warmup)
    manifest = seal_bundle(staged, spec=spec, validation=_validation(inputs, int8, figures, comparison),
                           runtimes=edge.to_dict(),
                           class_names=getattr(eval_data, "class_names", None),
                           comparison_md=comparison_markdown(comparison.to_dict()["rows"]), seed=options.seed)
    return DeployResult(int8=int8, comparison=comparison, latency=measured.latency, size=measured.size,
                        tensorrt=staged.tensorrt, edge=edge, bundle=BundleInfo(bundle_dir, list(manifest["artifacts"])),
                        artifacts=_run_artifacts(run_dir, bundle_dir, int8.produced))


# --- steps -------------------------------------------------------------------------------------

def _inputs(probes, pool_dir: Path, spec, options: DeployOptions) -> _Inputs:
    probes_u8 = pixels_to_uint8(probes)
    calib_u8 = sample_calibration(ImagePool(pool_dir), options.calibration_images or CALIBRATION_IMAGES, options.seed)
    return _Inputs(probes_u8, _to_model_space(probes_u8, spec), calib_u8, _to_model_space(calib_u8, spec))


def _quantize(fp32_path: Path, int8_path: Path, inputs: _Inputs, layout: str) -> Int8Result:
    try:
        return Int8Result(quantize_student(fp32_path, int8_path, inputs.calib_ms, layout=layout,
                                           probes=inputs.probes_ms))
    except DfkdError as exc:   # int8 is an extra: the fp32 hand-off still goes ahead
        int8_path.unlink(missing_ok=True)
        return Int8Result(error=str(exc))


def _stage(bundle_dir: Path, fp32: OrtRunner, int8: Optional[OrtRunner], inputs: _Inputs, spec,
           profile_batches: Optional[Sequence[int]]) -> StagedBundle:
    """The bundle's files (+ TensorRT engines where TensorRT is here), with the fp32 probe logits."""
    return stage_bundle(bundle_dir, student_onnx=fp32.path, student_int8_onnx=int8.path if int8 else None,
                        calibration_uint8=inputs.calib_u8, probes_uint8=inputs.probes_u8,
                        probe_logits_fp32=fp32.predict(inputs.probes_ms), spec=spec, profile_batches=profile_batches)


def _edge(staged: StagedBundle, student: nn.Module, inputs: _Inputs, spec, runtimes: Sequence[str],
          echo: Callable[[str], object]) -> EdgeBuild:
    """OpenVINO / ExecuTorch files into the bundle (calibrated on the same synthetic images as
    ORT int8), checked on the probes against the fp32 logits the bundle records."""
    with np.load(staged.path / CALIBRATION) as npz:
        recorded = npz["probe_logits_fp32"]
    edge = build_edge(staged.path, student=student, student_onnx=staged.path / FP32, calibration=inputs.calib_ms,
                      probes=inputs.probes_ms, probe_logits_fp32=recorded, spec=spec, runtimes=runtimes)
    for runtime, reason in edge.skipped.items():
        echo(f"{runtime}: skipped ({reason})")
    for what, reason in edge.errors.items():
        echo(f"{what}: not built ({reason})")
    staged.files += edge.bundle_files()
    return edge


def _engine_runners(staged: StagedBundle, layout: str) -> list[Runner]:
    """A runner per TensorRT engine built into the bundle (none where TensorRT is absent)."""
    max_batch = (staged.tensorrt.profile or {}).get("max", [MAX_BATCH])[0]
    return [TrtRunner(staged.path / engine["file"], layout=layout, precision=precision, max_batch=max_batch)
            for precision, engine in staged.tensorrt.engines.items() if engine.get("file")]


def _compare(student: nn.Module, others: Sequence[Runner], datasets: Sequence[Dataset]) -> Comparison:
    """Every back end against the torch student on CPU (on a GPU, TF32 would blur an fp32 comparison)."""
    return Comparison(compare_backends(TorchRunner(student), others, datasets))


def _datasets(inputs: _Inputs, eval_data, spec, n_eval: int) -> list[Dataset]:
    datasets = [Dataset("synthetic probes", inputs.probes_ms)]
    if eval_data is not None and len(eval_data):
        part = eval_data.subset(n_eval)
        drawn = f" ({len(part)} drawn at random, seed 0)" if len(part) < len(eval_data) else ""
        datasets.append(Dataset("eval data" + drawn, _to_model_space(part.images, spec), part.labels))
    return datasets


def _validation(inputs: _Inputs, int8: Int8Result, figures: RunFigures, comparison: Comparison) -> dict:
    return {"probe_images": len(inputs.probes_u8), "int8": int8.validation(), **figures.to_dict(),
            "comparison": [r.to_dict() for r in comparison.rows]}


def _run_artifacts(run_dir: Path, bundle_dir: Path, has_int8: bool) -> list[str]:
    """Run-relative files for the run's manifest.json (a bundle outside the run cannot be listed)."""
    try:
        bundle_rel = bundle_dir.resolve().relative_to(run_dir.resolve()).as_posix()
    except ValueError:
        bundle_rel = None
    return ([INT8] if has_int8 else []) + ([f"{bundle_rel}/{MANIFEST}"] if bundle_rel else [])


def _to_model_space(images_u8: np.ndarray, spec) -> np.ndarray:
    return uint8_to_model(images_u8, spec.mean, spec.std, spec.value_range)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
