"""The hand-off stage of a finished run: INT8, bundle (+ TensorRT or its script), back-end
comparison, latency and size."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from dfkd_deploy.deploy.bundle import FP32, INT8, MANIFEST, deploy_report_md, seal_bundle, stage_bundle

# --- the whole hand-off for a finished run (called by pipeline.finish_run) ----------------------

COMPARE_EVAL_IMAGES = 1024   # real eval images in the back-end comparison (float copies cost memory)


@dataclass
class Deployment:
    sections: dict            # report.json top-level sections: int8, comparison, latency, size, tensorrt, bundle
    markdown: str             # appended to report.md
    artifacts: list[str]      # run-relative files for the run's manifest.json


def run_deployment(teacher, student, run_dir: str | Path, *, probes, eval_data=None, seed: int = 0,
                   bundle_dir: str | Path | None = None, calibration_images: Optional[int] = None,
                   profile_batches: Optional[Sequence[int]] = None,
                   compare_eval_images: int = COMPARE_EVAL_IMAGES, latency_repeats: Optional[int] = None,
                   latency_warmup: Optional[int] = None, figures: Optional[Mapping[str, Any]] = None,
                   echo=print) -> Deployment:
    """INT8, bundle (+ TensorRT or its script), back-end comparison and latency for ``run_dir``.

    ``probes`` are the held-out synthetic probes (pixel space); ``eval_data`` an EvalData or None;
    ``figures`` the run's accuracy/agreement figures, copied into the bundle manifest.
    """
    import copy

    import torch

    from exporters.ort_quant import CALIBRATION_IMAGES, quantize_student, sample_calibration
    from exporters.onnx_export import onnx_predict
    from exporters.tensorrt import engine_predictor

    from dfkd_deploy.core.errors import DfkdError
    from dfkd_deploy.images import pixels_to_uint8, uint8_to_model
    from dfkd_deploy.synthesis.pool import ImagePool
    from dfkd_deploy.deploy import latency as lat
    from dfkd_deploy.deploy.compare import Backend, Dataset, all_passed, compare_backends, comparison_markdown
    from dfkd_deploy.validate.metrics import predict

    run_dir, spec = Path(run_dir), teacher.spec
    fp32_path, int8_path = run_dir / FP32, run_dir / INT8
    bundle_dir = Path(bundle_dir) if bundle_dir else run_dir / "bundle"
    ms = lambda u8: uint8_to_model(u8, spec.mean, spec.std, spec.value_range)  # noqa: E731
    # Probes as uint8, so the figures recorded here are exactly what `bundle verify` recomputes.
    probes_u8 = pixels_to_uint8(probes)
    probes_ms = ms(probes_u8)
    calib_u8 = sample_calibration(ImagePool(run_dir / "pool"), calibration_images or CALIBRATION_IMAGES, seed)

    try:
        int8 = quantize_student(fp32_path, int8_path, ms(calib_u8), layout=spec.layout, probes=probes_ms).to_dict()
    except DfkdError as exc:   # int8 is an extra: the fp32 hand-off still goes ahead
        int8 = {"file": None, "error": str(exc)}
        int8_path.unlink(missing_ok=True)
    has_int8 = int8_path.is_file()

    staged = stage_bundle(bundle_dir, student_onnx=fp32_path, student_int8_onnx=int8_path if has_int8 else None,
                          calibration_uint8=calib_u8, probes_uint8=probes_u8,
                          probe_logits_fp32=onnx_predict(fp32_path, probes_ms, layout=spec.layout), spec=spec,
                          profile_batches=profile_batches)
    if not staged.tensorrt["available"]:
        echo(staged.tensorrt["message"])

    # Back ends, all against the torch student on CPU (on a GPU, TF32 would blur an fp32 comparison).
    cpu_student = copy.deepcopy(student).cpu().eval()
    reference = Backend("torch", "fp32", lambda x: predict(cpu_student, torch.from_numpy(x)).numpy())
    others = [Backend("onnxruntime", "fp32", lambda x: onnx_predict(fp32_path, x, layout=spec.layout))]
    if has_int8:
        others.append(Backend("onnxruntime", "int8", lambda x: onnx_predict(int8_path, x, layout=spec.layout)))
    for precision, engine in staged.tensorrt.get("engines", {}).items():
        if engine.get("file"):
            others.append(Backend("tensorrt", precision, engine_predictor(bundle_dir / engine["file"], layout=spec.layout)))
    datasets = [Dataset("synthetic probes", probes_ms)]
    if eval_data is not None and len(eval_data):
        part = eval_data.subset(compare_eval_images)
        datasets.append(Dataset("eval data" + (f" ({len(part)} drawn at random, seed 0)" if len(part) < len(eval_data)
                                               else ""), ms(part.images), part.labels))
    rows = compare_backends(reference, others, datasets)
    table = comparison_markdown(rows)
    for r in rows:   # int8 accuracy on real data, beside its agreement
        if r.backend == "onnxruntime" and r.precision == "int8" and r.accuracy is not None:
            int8["accuracy"] = r.accuracy

    kw = {k: v for k, v in (("repeats", latency_repeats), ("warmup", latency_warmup)) if v is not None}
    ls = lat.latency_and_size(teacher, fp32_path, student_params=sum(p.numel() for p in student.parameters()),
                              teacher_params=sum(p.numel() for p in teacher.module.parameters()),
                              student_int8_onnx=int8_path if has_int8 else None, **kw)

    validation = {"probe_images": len(probes_u8), "int8": {k: int8.get(k) for k in
                                                           ("top1_agreement_vs_fp32", "max_abs_diff_vs_fp32",
                                                            "probe_images", "accuracy")} if has_int8 else None,
                  **dict(figures or {}), "comparison": [r.to_dict() for r in rows]}
    class_names = getattr(eval_data, "class_names", None)
    manifest = seal_bundle(staged, spec=spec, validation=validation, class_names=class_names,
                           comparison_md=table, seed=seed)
    try:
        bundle_rel = bundle_dir.resolve().relative_to(run_dir.resolve()).as_posix()
    except ValueError:
        bundle_rel = None   # a bundle outside the run: the run's manifest cannot list it
    sections = {
        "int8": int8,
        "comparison": {"passed": all_passed(rows), "reference": "torch fp32 (CPU)",
                       "rows": [r.to_dict() for r in rows]},
        "latency": ls["latency"], "size": ls["size"],
        "tensorrt": staged.tensorrt,
        "bundle": {"path": str(bundle_dir), "files": sorted(manifest["artifacts"])},
    }
    artifacts = ([INT8] if has_int8 else []) + ([f"{bundle_rel}/{MANIFEST}"] if bundle_rel else [])
    markdown = deploy_report_md(sections, table, lat.latency_markdown(ls["latency"], ls["size"]))
    return Deployment(sections, markdown, artifacts)
