"""What the hand-off stage takes from the run and what it returns, typed; ``to_dict`` gives the
report.json sections (report/ renders them, nothing here renders)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from exporters.ort_quant import QuantResult
from exporters.tensorrt import TrtResult

from dfkd_deploy.deploy.compare import Comparison
from dfkd_deploy.deploy.edge import EdgeBuild
from dfkd_deploy.deploy.latency import Latency, Size

INT8_VALIDATION_KEYS = ("top1_agreement_vs_fp32", "max_abs_diff_vs_fp32", "probe_images", "accuracy")


@dataclass(frozen=True)
class RunFigures:
    """The run's accuracy and agreement figures, copied into the bundle manifest's validation."""

    student_accuracy: Optional[float] = None
    teacher_accuracy: Optional[float] = None
    onnx_accuracy: Optional[float] = None
    agreement_top1: Optional[float] = None

    @classmethod
    def from_evaluation(cls, evaluation: Optional[Mapping[str, Any]], probe_agreement: Optional[float]) -> "RunFigures":
        """From :func:`dfkd_deploy.validate.metrics.evaluate`'s dict (None: no eval data, then the
        agreement is the one on synthetic probes)."""
        e = evaluation or {}
        return cls(e.get("student_accuracy"), e.get("teacher_accuracy"), e.get("onnx_accuracy"),
                   e.get("agreement", probe_agreement))

    def to_dict(self) -> dict:
        return {"student_accuracy": self.student_accuracy, "teacher_accuracy": self.teacher_accuracy,
                "onnx_accuracy": self.onnx_accuracy, "agreement_top1": self.agreement_top1}


@dataclass
class Int8Result:
    """The int8 student: the quantization's figures, or why there is none."""

    quant: Optional[QuantResult] = None
    error: Optional[str] = None
    accuracy: Optional[float] = None       # on real labelled data, from the back-end comparison

    @property
    def produced(self) -> bool:
        return self.quant is not None

    def to_dict(self) -> dict:
        if self.quant is None:
            return {"file": None, "error": self.error}
        out = self.quant.to_dict()
        if self.accuracy is not None:
            out["accuracy"] = self.accuracy
        return out

    def validation(self) -> Optional[dict]:
        """The figures the bundle manifest records (and `bundle verify` rechecks), or None."""
        if self.quant is None:
            return None
        d = self.to_dict()
        return {k: d.get(k) for k in INT8_VALIDATION_KEYS}


@dataclass(frozen=True)
class BundleInfo:
    path: Path
    files: list[str]

    def to_dict(self) -> dict:
        return {"path": str(self.path), "files": sorted(self.files)}


@dataclass
class DeployResult:
    """Everything the hand-off stage measured and wrote."""

    int8: Int8Result
    comparison: Comparison
    latency: Latency
    size: Size
    tensorrt: TrtResult
    bundle: BundleInfo
    edge: Optional[EdgeBuild] = None
    artifacts: list[str] = field(default_factory=list)   # run-relative files for the run's manifest.json

    def sections(self) -> dict:
        """report.json's top-level sections: int8, comparison, latency, size, tensorrt, runtimes, bundle."""
        return {"int8": self.int8.to_dict(), "comparison": self.comparison.to_dict(),
                "latency": self.latency.to_dict(), "size": self.size.to_dict(),
                "tensorrt": self.tensorrt.to_dict(), "runtimes": self.edge.to_dict() if self.edge else None,
                "bundle": self.bundle.to_dict()}
