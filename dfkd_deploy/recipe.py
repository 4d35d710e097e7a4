"""Recipe schema (pydantic), YAML loading with clear errors, CLI overrides, and the resolved dump.

A recipe fully describes a run: with the same recipe, teacher and seed the run repeats. Unknown
keys are errors (a typo must not be silently ignored), and every error names the key.
"""
from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dfkd_deploy.core.errors import RecipeError


# Bounds beyond which a value is a mistake rather than a choice (runs forever, learns nothing).
MAX_EPOCHS = 100_000
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.1, 100.0
MAX_SIDE = 16_384
# distillation.grad_clip: auto for a student without normalisation layers. A pruned BN-folded
# ResNet-8 had a gradient norm of 1,388 on its first KD step and diverged in 4 steps even at a tenth
# of the lr; clipped at 5 its loss fell from 67 to 0.9 in 100 steps (runs/dbg, noise images).
AUTO_GRAD_CLIP = 5.0
SYNTHESIS_SHARE = 0.5     # of a budgeted run's training time (distillation.synthesis_share)
# distillation.synthesis_share: auto. A depth student of a BN-folded teacher learns more from KD
# steps than from more rounds: at 15 minutes on the dynamo ResNet-56, shares 0.3 / 0.5 / 0.7 gave
# 62.9% / 60.3% / 55.6% (budget_settings.py series 8), and 69.7% at 60 minutes (67.4% at 0.5 in an
# earlier session on a slower host; docs/benchmarks.md); every other student keeps 0.5 (series 2-4,
# the BN-kept teacher, where 0.3 lost 10 points and 0.7 tied with cutmix on).
FOLDED_DEPTH_SHARE = 0.3
SYNTHESIS_BATCH = 256     # images per synthesis round (synthesis.batch_size)
# synthesis.batch_size: auto. A budgeted depth student of a BN-folded teacher does better from
# rounds of 64, four times as many generator meta-steps for the same images: at 15 minutes on the
# dynamo ResNet-56 +1.6 points at share 0.5 (61.9 against 60.3%, budget_settings.py series 8) and +1.5 at
# share 0.3 (64.9 against 63.4%, series 9). Every other run keeps 256 (not measured against 64 with
# a baseline; without a budget a smaller round would also mean fewer images an epoch).
FOLDED_DEPTH_SYNTH_BATCH = 64
BUDGETED_MIX = "cutmix"   # distillation.mix: auto with a budget (docs/method.md, "KD settings at equal wall time")
# student.derived.lr_scale: auto. A derived student is fine-tuned at a tenth of the KD lr; a depth
# student of a BN-folded teacher (its BNs matched to the teacher's layers) at 0.03: at 15 minutes on
# the dynamo ResNet-56, 0.03 / 0.1 / 0.3 gave 56.1% / 43.1% / 30.2% (budget_settings.py, series 6).
DERIVED_LR_SCALE = 0.1
FOLDED_DEPTH_LR_SCALE = 0.03
# distillation.features: auto. Feature matching at the stage ends for a depth student of a
# BN-folded teacher, off for every other student (not measured there): at 15 minutes on the dynamo
# ResNet-56 60.3% against 55.5% without it; at 60 minutes 67.4% against 67.5% (budget_settings.py
# series 7, time_to_accuracy.py; docs/method.md).
FOLDED_DEPTH_FEATURES = 2.0
# A recipe is a few dozen values; YAML aliases can make a few hundred bytes expand to billions.
MAX_RECIPE_VALUES = 10_000
MAX_ERROR_CHARS = 2_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TeacherOptions(_Strict):
    """What cannot always be read off the teacher file; ``null`` means "detect"."""

    arch: Optional[str] = Field(None, description="zoo architecture for a plain state_dict")
    input_shape: Optional[tuple[int, int, int]] = Field(None, description="C, H, W")

    layout: Optional[Literal["NCHW", "NHWC"]] = Field(None, description="the file's input layout; null: detected from the input dims")
    num_classes: Optional[int] = Field(None, ge=2, description="classes the teacher outputs (null: from the output shape)")
    output: Optional[Literal["logits", "probabilities"]] = Field(None, description="null: probabilities when the graph ends in Softmax")
    mean: Optional[list[float]] = Field(None, description="per-channel mean the teacher expects (null: file metadata, else none)")
    std: Optional[list[float]] = Field(None, description="per-channel std the teacher expects (null: file metadata, else none)")
    value_range: Optional[float] = Field(None, gt=0, description="pixel maximum before normalisation: 1 or 255 (null: metadata, the graph's own normalisation, a uint8 input, else 1)")
    channel_order: Optional[Literal["RGB", "BGR"]] = Field(None, description="colour order the teacher expects (null: detected from a caffe-style mean, else RGB)")
    accuracy: Optional[float] = Field(None, ge=0, le=1, description="the teacher's own top-1 on real data as its owner measured it (e.g. its model card): without eval data, validate then estimates the student's accuracy too, and --min-accuracy gates on that estimate's lower bound")
    parity_tolerance: float = Field(1e-3, gt=0, description="max abs diff allowed between converted teacher and onnxruntime")
    int8_activations: Literal["fake_quant", "float"] = Field("fake_quant", description="int8 ONNX teachers: activations fake-quantized at the file's scales (straight-through rounding) or float (clamped to the same ranges)")
    int8_min_agreement: float = Field(0.25, gt=0, le=1, description="int8 ONNX teachers: least top-1 agreement with onnxruntime running the int8 file on random probes and smooth images (replaces parity_tolerance; low because onnxruntime saturates u8s8 products on AVX2 CPUs without VNNI)")

    @field_validator("input_shape")
    @classmethod
    def _positive_shape(cls, v):
        if v is not None and not all(1 <= d <= MAX_SIDE for d in v):
            raise ValueError(f"every dimension must be in 1..{MAX_SIDE}")
        return v

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v):
        if v is not None and any(s <= 0 for s in v):
            raise ValueError("every std entry must be > 0")
        return v


class HeadOptions(_Strict):
    """The student's classifier head: the architecture's own Linear, or an FC ReLU MLP that can be
    initialised from a MARS fit (spline initialisation) of the teacher's logits on synthetic images."""

    type: Literal["linear", "mlp"] = Field("linear", description="linear: the architecture's own; mlp: Linear-ReLU-Linear")
    hidden: int = Field(256, ge=2, description="hidden units of the mlp head")
    init: Literal["random", "mars"] = Field("random", description="mars: fit MARS on student features -> teacher logits, then build the head from it")
    max_terms: int = Field(32, ge=1, description="MARS forward-pass terms (each linear term takes two units)")
    pca_dims: Optional[int] = Field(32, ge=1, description="PCA components of the features before the MARS fit; null: standardise only")
    fit_images: int = Field(2000, ge=16, description="pool images (at most) the MARS fit sees")
    fit_after: int = Field(0, ge=0, description="KD epochs trained with the random head before the MARS fit replaces it")

    @model_validator(mode="after")
    def _consistent(self):
        if self.init == "mars" and self.type != "mlp":
            raise ValueError("init: mars needs type: mlp (the MARS network is an FC ReLU head)")
        if self.init == "mars" and 2 * self.max_terms > self.hidden:
            raise ValueError(f"max_terms {self.max_terms} needs hidden >= {2 * self.max_terms} "
                             "(a linear MARS term takes two ReLU units)")
        return self


class DerivedOptions(_Strict):
    """How a student derived from the teacher (student.init prune or depth) is made."""

    prune_importance: Literal["magnitude", "bn_scale", "taylor"] = Field(
        "magnitude", description="data-free channel importance: L2 weight magnitude, BN scale, or Taylor "
                                 "(gradients on synthesized images)")
    depth_blocks: Literal["spread", "last", "first"] = Field(
        "spread", description="which teacher blocks a depth student keeps per stage (block 0 always): "
                              "spread evenly, the last ones, or the first ones")
    recalibrate_bn: bool = Field(True, description="re-estimate BN statistics on synthesized images before KD "
                                "(a depth student of a BN-folded teacher: each BN's scale and shift first set "
                                "to the mean and sd of the teacher layer it was copied from)")
    images: int = Field(256, ge=2, description="synthesized images for BN recalibration / Taylor importance")
    round_to: Optional[int] = Field(None, ge=1, le=64, description="prune: keep a multiple of this many channels "
                                    "in every pruned layer (rounded up, never fewer); null: whatever the ratio "
                                    "leaves (see docs/method.md for the measured latency of both)")
    lr_scale: float | Literal["auto"] = Field(
        "auto", description="KD learning rate of a derived student as a fraction of distillation.lr: it starts "
                            "from the teacher's weights and is fine-tuned (at the full lr a pruned ResNet-56 "
                            f"diverged, logits reaching 3e7); auto: {FOLDED_DEPTH_LR_SCALE:g} for a depth student "
                            f"of a BN-folded teacher, {DERIVED_LR_SCALE:g} otherwise (measured: docs/method.md)")

    @field_validator("lr_scale")
    @classmethod
    def _scale(cls, v):
        if v != "auto" and not 0 < v <= 1:
            raise ValueError("student.derived.lr_scale must be in (0, 1] or auto")
        return v


class StudentOptions(_Strict):
    arch: Optional[str] = Field(None, description="zoo architecture (see `list students`); null: chosen from "
                                                  "student.target, or at least 2x smaller and faster than the teacher")
    init: Literal["auto", "scratch", "prune", "depth"] = Field(
        "scratch", description="scratch: a zoo architecture from random weights; prune: the teacher channel-pruned; "
                               "depth: a shallower net of the teacher's residual family from its blocks; auto: depth "
                               "where the teacher is such a net (or an ONNX graph computing one), else scratch")
    target: Optional[str] = Field(None, description="size relative to the teacher: params=F, macs=F or latency=F "
                                                    "(ONNX Runtime CPU, batch 1 and 32), 0 < F < 1")
    derived: DerivedOptions = DerivedOptions()
    head: HeadOptions = HeadOptions()

    @field_validator("target")
    @classmethod
    def _target(cls, v):
        if v is not None:
            from dfkd_deploy.core.units import parse_target

            try:
                parse_target(v)
            except Exception as exc:  # noqa: BLE001 - the UsageError's line becomes the recipe error
                raise ValueError(str(exc)) from None
        return v


class AugmentOptions(_Strict):
    crop_padding: int = Field(4, ge=0, description="differentiable random crop after zero padding by this many pixels (0: none)")
    flip: bool = Field(True, description="random horizontal flip")
    zoom: float = Field(0.0, ge=0, lt=1, description="synthesis only: each view of a synthesized batch is a random window "
                        "of side 1 - zoom * U(0, 1), resized back (0: none)")
    color_shift: float = Field(0.0, ge=0, description="synthesis only: each view's model-space channels are scaled by "
                               "exp(U(-a, a)) and shifted by U(-a, a) (Plug-In Inversion's ColorShift; 0: none)")


class PriorOptions(_Strict):
    """Priors that need no BatchNorm statistics (DAFL, DeepInversion), for teachers without BN
    layers (fused graphs, BN-free nets). ``null`` (the default) means automatic: 0 when the
    teacher has BN statistics, the BN-free defaults (``dfkd_deploy.synthesis.priors.BN_FREE_PRIORS``)
    when it has none. A number, 0 included, is used as given."""

    tv: Optional[float] = Field(None, ge=0, description="total variation of the pixels (mean |neighbour difference|, 4 directions)")
    l2: Optional[float] = Field(None, ge=0, description="mean square of the normalised (model-space) pixels")
    entropy: Optional[float] = Field(None, ge=0, description="DAFL information entropy: log K - H(mean teacher prediction of the batch)")
    activation: Optional[float] = Field(None, ge=0, description="DAFL activation: -mean |penultimate teacher feature| (input of the last Linear/Gemm)")
    proxy: Optional[float] = Field(None, ge=0, description="stand-in feature statistics: match the first third of the teacher's convolutions to their statistics on 1/f colour noise (dfkd_deploy.synthesis.proxy_stats)")
    ranges: Optional[float] = Field(None, ge=0, description="int8 teachers: keep every quantized activation inside the range the file records and make the batch reach its top (auto: dfkd_deploy.synthesis.priors.RANGE_PRIOR_AUTO for a quantized teacher, else 0)")


# What ``method: deepinversion`` means for keys a recipe leaves out: the paper's DeepInversion-2k
# (2000 Adam steps on the pixels at lr 0.1 in normalised units, no statistics carried across batches).
DEEPINVERSION_DEFAULTS = {"g_steps": 2000, "lr_g": 0.1, "bn_mmt": 0.0, "reset_l0_after": None}


class SynthesisOptions(_Strict):
    method: Literal["fastdfkd", "deepinversion"] = Field(
        "fastdfkd", description="fastdfkd: meta-learned generator, g_steps per batch; deepinversion: pixels optimised directly")
    g_steps: int = Field(5, ge=1, le=100_000, description="optimisation steps per batch: inner generator steps (Fast-N) or DeepInversion pixel steps")
    batch_size: int | Literal["auto"] = Field(
        "auto", description="images per synthesized batch (a total over all processes under torchrun), >= 2; "
                            f"auto: {FOLDED_DEPTH_SYNTH_BATCH} for a budgeted depth student of a BN-folded "
                            f"teacher, {SYNTHESIS_BATCH} for any other run")
    rounds_per_epoch: int = Field(1, ge=1, le=10_000, description="synthesized batches per epoch")
    nz: int = Field(256, ge=1, description="generator latent size")
    ngf: int = Field(64, ge=4, description="generator width")
    lr_g: float = Field(3e-3, gt=0, description="generator lr (fastdfkd; the meta lr is lr_g * g_steps) or pixel lr (deepinversion)")
    lr_z: float = Field(0.01, gt=0, description="inner learning rate of the latents z")
    bn: float = Field(10.0, ge=0, description="weight of the BatchNorm-statistics loss")
    oh: float = Field(0.5, ge=0, description="weight of the cross-entropy to sampled labels")
    adv: float = Field(1.33, ge=0, description="weight of the adversarial (student-teacher KL) term")
    adv_bn_free: Optional[float] = Field(None, ge=0, description="weight of the adversarial term for a teacher without BN statistics (folded or BN-free); null: min(adv, dfkd_deploy.synthesis.priors.BN_FREE_ADV) where the proxy prior is on, else adv")
    bn_mmt: float = Field(0.9, ge=0, lt=1, description="EMA blend of batch statistics across batches")
    reset_l0_after: Optional[int] = Field(120, ge=1, description="epochs after warm-up at which the generator's input layers are re-initialised; null: never")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="synthesis forward passes: bf16 autocast, fp32, or auto (bf16 where the device runs it natively)")
    channels_last: bool = Field(True, description="run synthesis convolutions in channels-last memory format")
    priors: PriorOptions = PriorOptions()
    augment: AugmentOptions = AugmentOptions()

    @field_validator("batch_size")
    @classmethod
    def _batch_or_auto(cls, v):
        if v != "auto" and v < 2:
            raise ValueError("synthesis.batch_size must be >= 2 (BN statistics need two images) or auto")
        return v

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data):
        if isinstance(data, dict) and data.get("method") == "deepinversion":
            data = {**DEEPINVERSION_DEFAULTS, **data}
        return data


class DistillationOptions(_Strict):
    epochs: int = Field(220, ge=1, le=MAX_EPOCHS, description="total epochs, warm-up included")
    warmup: int = Field(20, ge=0, description="epochs that only synthesize")
    kd_steps: int = Field(400, ge=1, le=1_000_000, description="student steps per epoch")
    batch_size: int = Field(256, ge=1, description="KD batch (a total over all processes under torchrun)")
    lr: float = Field(0.2, gt=0, description="SGD learning rate at the start of the cosine schedule")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(1e-4, ge=0, description="SGD weight decay")
    eta_min: float = Field(2e-4, ge=0, description="learning rate at the end of the cosine schedule")
    temperature: float = Field(20.0, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE, description="KD softmax temperature")
    grad_clip: float | Literal["auto"] = Field(
        "auto", description="largest global gradient norm of a KD step: a number, 0 for no clipping, or auto: "
                            f"{AUTO_GRAD_CLIP:g} for a student without normalisation layers (e.g. pruned from a "
                            "BN-folded teacher; its KD at temperature 20 otherwise diverges within a few steps), "
                            "none for a student with them")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="KD forward passes (teacher and student; weights, optimizer and loss stay fp32): "
                            "bf16 autocast, fp32, or auto (bf16 where the device runs it natively)")
    synthesis_share: float | Literal["auto"] = Field(
        "auto", description="with a budget: the share of the training time that synthesizes (the rest trains "
                            f"the student), in (0, 1); auto: {FOLDED_DEPTH_SHARE:g} for a depth student of a "
                            f"BN-folded teacher, {SYNTHESIS_SHARE:g} for any other")
    mix: Literal["auto", "none", "mixup", "cutmix"] = Field(
        "auto", description="mixing of KD batches after crop/flip: mixup blends two pool images, cutmix pastes a "
                            "box of one into another; the teacher labels the mixed image (needs teacher_logits: "
                            f"recompute); auto: {BUDGETED_MIX} with a budget (it won at equal wall time, "
                            "docs/method.md), none without one")
    mix_alpha: float = Field(1.0, gt=0, description="the mixing weight is drawn from Beta(mix_alpha, mix_alpha)")
    attention: float = Field(0.0, ge=0, description="weight of attention transfer (ZSKT): the student's spatial "
                             "attention maps matched to the teacher's at the end of every resolution both nets "
                             "share, added to the KD loss; 0: off (needs teacher_logits: recompute)")
    features: float | Literal["auto"] = Field(
        "auto", description="weight of feature matching: the student's feature maps matched to the teacher's "
                            "(squared error relative to the teacher's mean square) at the end of every "
                            "resolution where both nets have the same shape, e.g. a depth student's stages, "
                            "added to the KD loss; 0: off (needs teacher_logits: recompute); auto: "
                            f"{FOLDED_DEPTH_FEATURES:g} for a depth student of a BN-folded teacher with recomputed "
                            "teacher logits, 0 otherwise (measured: docs/method.md)")
    teacher_logits: Literal["recompute", "cached"] = Field(
        "recompute", description="recompute: the teacher labels every augmented KD batch; cached: once per pool "
                                 "image (un-augmented), reused on every draw, so a KD step runs only the student")

    @model_validator(mode="after")
    def _mix_needs_labels(self):
        if self.mix not in ("none", "auto") and self.teacher_logits == "cached":
            raise ValueError("distillation.mix needs teacher_logits: recompute (a mixed image has no cached logits)")
        for key in ("attention", "features"):
            if getattr(self, key) not in ("auto", 0) and self.teacher_logits == "cached":
                raise ValueError(f"distillation.{key} needs teacher_logits: recompute (it reads the teacher's "
                                 "feature maps of each augmented batch)")
        return self

    @field_validator("grad_clip", "features")
    @classmethod
    def _non_negative_or_auto(cls, v, info):
        if v != "auto" and v < 0:
            zero = {"grad_clip": "no clipping", "features": "off"}[info.field_name]
            raise ValueError(f"distillation.{info.field_name} must be >= 0 (0: {zero}) or auto")
        return v

    @field_validator("synthesis_share")
    @classmethod
    def _share_or_auto(cls, v):
        if v != "auto" and not 0 < v < 1:
            raise ValueError("distillation.synthesis_share must be in (0, 1) or auto")
        return v

    @model_validator(mode="after")
    def _trains(self):
        if self.warmup >= self.epochs:
            raise ValueError(f"distillation.warmup ({self.warmup}) must be below distillation.epochs ({self.epochs}): "
                             "warm-up epochs only synthesize, so the student would never be trained")
        return self


class ValidationOptions(_Strict):
    probe_images: int = Field(512, ge=1, description="held-out synthetic probes, never trained on")
    batch_size: int = Field(256, ge=1, description="batch for evaluating teacher and student")


class ExportOptions(_Strict):
    opset: int = Field(17, ge=13, le=20, description="ONNX opset of student.onnx")
    parity_tolerance: float = Field(1e-3, gt=0, description="max abs diff allowed between student.onnx (onnxruntime) and the torch student")


class DeployOptions(_Strict):
    batch_profile: tuple[int, int, int] = Field((1, 8, 32), description="TensorRT optimisation profile: min, opt, max batch")
    calibration_images: int = Field(256, ge=1, description="synthetic pool images for INT8 calibration")
    edge_runtimes: list[Literal["openvino", "executorch"]] = Field(
        ["openvino", "executorch"], description="edge runtimes whose files go into the bundle (built, compared and "
        "timed where the package is installed, skipped with one line where not); [] for ONNX and TensorRT only")

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
    budget: Optional[str] = Field(None, description="wall-clock budget for the whole run, e.g. 30m, 1h, 90s: "
                                                    "pool size, rounds, KD steps and the schedule are planned to fit")
    seed: int = Field(0, description="everything random derives from it")

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, v):
        if v is not None:
            from dfkd_deploy.core.units import parse_duration

            try:
                parse_duration(v)
            except Exception as exc:  # noqa: BLE001
                raise ValueError(str(exc)) from None
            return str(v)
        return v

    @model_validator(mode="after")
    def _resolve_mix(self):
        """``distillation.mix: auto`` becomes a value here, so recipe.resolved.yaml and a resume see it."""
        d = self.distillation
        if d.mix == "auto":
            d.mix = BUDGETED_MIX if self.budget is not None and d.teacher_logits == "recompute" else "none"
        return self

    def resolved_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def synthesis_batch(options: SynthesisOptions) -> int:
    """``synthesis.batch_size`` as a number: ``auto`` not yet resolved against a teacher and student
    (students/build.resolve_init does that; a synthesis with no student) is SYNTHESIS_BATCH."""
    return SYNTHESIS_BATCH if options.batch_size == "auto" else options.batch_size


def _short(value: Any, limit: int = 80) -> str:
    """repr of a (possibly huge) value, cut at ``limit`` characters without building all of it."""
    if isinstance(value, (dict, list, tuple)) and len(value) > 8:
        return f"<{type(value).__name__} of {len(value)} items>"
    shortener = reprlib.Repr()   # keyword arguments only from Python 3.12
    shortener.maxlevel, shortener.maxdict, shortener.maxlist, shortener.maxtuple = 2, 4, 4, 4
    shortener.maxstring = shortener.maxother = limit
    text = shortener.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "<root>"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"unknown key {_short(key)}"
    ctx = err.get("ctx") or {}
    if kind == "literal_error" and "expected" in ctx:
        return f"{key}: {_short(err['input'])} is not allowed; allowed values: {ctx['expected']}"
    return f"{key}: {err['msg']} (got {_short(err.get('input'))})"


def _validate(data: dict[str, Any], origin: str) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        if len(problems) > MAX_ERROR_CHARS:
            problems = problems[: MAX_ERROR_CHARS - 3] + "..."
        raise RecipeError(f"{origin}: {problems}") from None


def _check_size(data: Any, origin: str) -> None:
    """Refuse a document that expands to more values than any recipe has (an alias bomb), by
    walking it with a budget: aliases make the walk long, never the memory."""
    stack, seen = [data], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_RECIPE_VALUES:
            raise RecipeError(f"{origin}: the recipe expands to more than {MAX_RECIPE_VALUES} values (nested YAML "
                              "aliases?); a recipe is a few dozen settings")
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)


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
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise RecipeError(f"{p}: not a text file (not valid UTF-8 YAML)") from None
        except OSError as exc:
            raise RecipeError(f"cannot read the recipe {p}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise RecipeError(f"{p}: not valid YAML{where}") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{p}: a recipe is a mapping of sections, got {type(data).__name__}")
        _check_size(data, origin)
    for dotted, value in (overrides or {}).items():
        _check_size(value, f"--set {dotted}")
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"{origin}: cannot set {dotted!r}, {part!r} is not a section")
        node[leaf] = value
    return _validate(data, origin)
