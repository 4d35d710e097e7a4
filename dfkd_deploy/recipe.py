"""Recipe schema (pydantic), YAML loading with clear errors, CLI overrides, and the resolved dump.

A recipe fully describes a run: with the same recipe, teacher and seed the run repeats. Unknown
keys are errors (a typo must not be silently ignored), and every error names the key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import RecipeError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TeacherOptions(_Strict):
    """What cannot always be read off the teacher file; ``null`` means "detect"."""

    arch: Optional[str] = Field(None, description="zoo architecture for a plain state_dict")
    input_shape: Optional[tuple[int, int, int]] = Field(None, description="C, H, W")
    layout: Optional[Literal["NCHW", "NHWC"]] = None
    num_classes: Optional[int] = Field(None, ge=2)
    output: Optional[Literal["logits", "probabilities"]] = None
    mean: Optional[list[float]] = Field(None, description="per-channel mean the teacher expects")
    std: Optional[list[float]] = Field(None, description="per-channel std the teacher expects")
    value_range: Optional[float] = Field(None, gt=0, description="pixel maximum before normalisation: 1 or 255")
    parity_tolerance: float = Field(1e-3, gt=0, description="max abs diff allowed between converted teacher and onnxruntime")

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v):
        if v is not None and any(s <= 0 for s in v):
            raise ValueError("every std entry must be > 0")
        return v


class StudentOptions(_Strict):
    arch: str = "cifar_resnet20"


class AugmentOptions(_Strict):
    crop_padding: int = Field(4, ge=0)
    flip: bool = True


class SynthesisOptions(_Strict):
    method: Literal["fastdfkd"] = "fastdfkd"
    g_steps: int = Field(5, ge=1, description="inner generator steps per batch (Fast-N)")
    batch_size: int = Field(256, ge=2)
    rounds_per_epoch: int = Field(1, ge=1)
    nz: int = Field(256, ge=1)
    ngf: int = Field(64, ge=4)
    lr_g: float = Field(3e-3, gt=0)
    lr_z: float = Field(0.01, gt=0)
    bn: float = Field(10.0, ge=0, description="weight of the BatchNorm-statistics loss")
    oh: float = Field(0.5, ge=0, description="weight of the cross-entropy to sampled labels")
    adv: float = Field(1.33, ge=0, description="weight of the adversarial (student-teacher KL) term")
    bn_mmt: float = Field(0.9, ge=0, lt=1, description="EMA blend of batch statistics across batches")
    reset_l0_after: Optional[int] = Field(120, ge=1, description="epochs after warm-up at which the generator's input layers are re-initialised; null: never")
    augment: AugmentOptions = AugmentOptions()


class DistillationOptions(_Strict):
    epochs: int = Field(220, ge=1, description="total epochs, warm-up included")
    warmup: int = Field(20, ge=0, description="epochs that only synthesize")
    kd_steps: int = Field(400, ge=1, description="student steps per epoch")
    batch_size: int = Field(256, ge=1)
    lr: float = Field(0.2, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    eta_min: float = Field(2e-4, ge=0)
    temperature: float = Field(20.0, gt=0)


class ValidationOptions(_Strict):
    probe_images: int = Field(512, ge=1, description="held-out synthetic probes, never trained on")
    batch_size: int = Field(256, ge=1)


class ExportOptions(_Strict):
    opset: int = Field(17, ge=13, le=20)
    parity_tolerance: float = Field(1e-3, gt=0)


class DeployOptions(_Strict):
    batch_profile: tuple[int, int, int] = Field((1, 8, 32), description="TensorRT optimisation profile: min, opt, max batch")
    calibration_images: int = Field(256, ge=1, description="synthetic pool images for INT8 calibration")

    @field_validator("batch_profile")
    @classmethod
    def _ordered(cls, v):
        if not (0 < v[0] <= v[1] <= v[2]):
            raise ValueError("must be min <= opt <= max, all > 0")
        return v


class Recipe(_Strict):
    teacher: TeacherOptions = TeacherOptions()
    student: StudentOptions = StudentOptions()
    synthesis: SynthesisOptions = SynthesisOptions()
    distillation: DistillationOptions = DistillationOptions()
    validation: ValidationOptions = ValidationOptions()
    export: ExportOptions = ExportOptions()
    deploy: DeployOptions = DeployOptions()
    seed: int = 0

    def resolved_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _describe(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "<root>"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"unknown key {key!r}"
    ctx = err.get("ctx") or {}
    if kind == "literal_error" and "expected" in ctx:
        return f"{key}: {err['input']!r} is not allowed; allowed values: {ctx['expected']}"
    return f"{key}: {err['msg']} (got {err.get('input')!r})"


def _validate(data: dict[str, Any], origin: str) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise RecipeError(f"{origin}: {problems}") from None


def load_recipe(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Recipe:
    """Load a recipe file (or the defaults when ``path`` is None) and apply dotted-key overrides."""
    data: dict[str, Any] = {}
    origin = "recipe defaults"
    if path is not None:
        p = Path(path)
        origin = str(p)
        if not p.is_file():
            raise RecipeError(f"recipe not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise RecipeError(f"{p}: not valid YAML{where}") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{p}: a recipe is a mapping of sections, got {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"{origin}: cannot set {dotted!r}, {part!r} is not a section")
        node[leaf] = value
    return _validate(data, origin)
