"""TensorRT engines from the student ONNX, or the script that builds them on the device.

TensorRT is optional and imported lazily: most machines that run dfkd-deploy have no NVIDIA GPU.
Either way :func:`write_build_script` writes ``build_engine.sh`` (trtexec commands, with a
polygraphy alternative for calibration-based INT8), so the device engineer can build the
engines where the GPU is; :func:`build_engines` builds them here when TensorRT is present.

INT8 has two routes, both data-free:
- explicit: build from ``student.int8.onnx`` (Q/DQ scales from our synthetic calibration);
  TensorRT needs no calibrator and the ORT and TRT int8 models share one set of scales.
- implicit: build from ``student.onnx`` with an entropy calibrator fed ``calibration.npz``
  (synthetic pool images already in model space), via TensorRT's calibrator API or polygraphy.
"""
from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from dfkd_deploy.core.errors import ExportError
from dfkd_deploy.core.io import write_bytes, write_text

from dfkd_deploy.runtime.tensorrt import tensorrt_module
from exporters.onnx_export import INPUT_NAME

PRECISIONS = ("fp32", "fp16", "int8")
PROFILE_BATCHES = (1, 8, 32)          # min / opt / max batch of the optimisation profile
WORKSPACE_MIB = 1024
TIMING_CACHE = "timing.cache"
MISSING_MESSAGE = "TensorRT is not installed; wrote build_engine.sh for the device to build it"


@dataclass(frozen=True)
class Profile:
    """An optimisation profile: full input shapes (in the file's layout) at min/opt/max batch."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def make_profile(input_shape: Sequence[int], layout: str = "NCHW",
                 batches: Sequence[int] = PROFILE_BATCHES) -> Profile:
    """Profile for a (C, H, W) student input; NHWC files get (N, H, W, C) shapes."""
    if len(batches) != 3 or not (0 < batches[0] <= batches[1] <= batches[2]):
        raise ExportError(f"profile batches must be min <= opt <= max, all > 0; got {tuple(batches)}")
    c, h, w = (int(v) for v in input_shape)
    per_image = (h, w, c) if layout.upper() == "NHWC" else (c, h, w)
    return Profile(*((int(b), *per_image) for b in batches))


def _shape_arg(shape: Sequence[int], name: str = INPUT_NAME) -> str:
    return f"{name}:{'x'.join(str(v) for v in shape)}"


def trtexec_command(onnx_file: str, engine_file: str, profile: Profile, precision: str, *,
                    timing_cache: str = TIMING_CACHE, calib_cache: Optional[str] = None,
                    workspace_mib: int = WORKSPACE_MIB, input_name: str = INPUT_NAME) -> list[str]:
    """The trtexec argument list for one engine.

    For ``int8`` pass the Q/DQ model as ``onnx_file`` (explicit quantization, no calibrator), or
    the fp32 model plus ``calib_cache`` (a TensorRT calibration cache made by polygraphy).
    """
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    cmd = ["trtexec", f"--onnx={onnx_file}", f"--saveEngine={engine_file}",
           f"--minShapes={_shape_arg(profile.min, input_name)}",
           f"--optShapes={_shape_arg(profile.opt, input_name)}",
           f"--maxShapes={_shape_arg(profile.max, input_name)}",
           f"--timingCacheFile={timing_cache}",
           f"--memPoolSize=workspace:{int(workspace_mib)}M"]
    if precision == "fp16":
        cmd.append("--fp16")
    elif precision == "int8":
        # fp16 too, so layers TensorRT will not run in int8 fall back to fp16 rather than fp32.
        cmd += ["--int8", "--fp16"]
        if calib_cache:
            cmd.append(f"--calib={calib_cache}")
    return cmd


def polygraphy_int8_command(onnx_file: str, engine_file: str, profile: Profile, *,
                            loader_script: str = "calib_loader.py", calib_cache: str = "calibration.cache",
                            timing_cache: str = TIMING_CACHE, input_name: str = INPUT_NAME) -> list[str]:
    """Implicit INT8 from the fp32 model, calibrated on calibration.npz through polygraphy."""
    return ["polygraphy", "convert", onnx_file, "--int8", "--fp16",
            "--data-loader-script", loader_script, "--calibration-cache", calib_cache,
            "--trt-min-shapes", _poly_shape(profile.min, input_name),
            "--trt-opt-shapes", _poly_shape(profile.opt, input_name),
            "--trt-max-shapes", _poly_shape(profile.max, input_name),
            "--load-timing-cache", timing_cache, "--save-timing-cache", timing_cache, "-o", engine_file]


def _poly_shape(shape: Sequence[int], name: str) -> str:
    return f"{name}:[{','.join(str(v) for v in shape)}]"


CALIB_LOADER = '''"""polygraphy data loader: synthetic calibration images from calibration.npz.

The images are stored as uint8 pixels; they are brought to model space here with the
normalisation the student expects, exactly as the calibration in dfkd-deploy did.
"""
import numpy as np

BATCH = {batch}


def load_data():
    npz = np.load("calibration.npz")
    c = npz["calibration"].shape[1]
    mean = npz["mean"].reshape(1, c, 1, 1).astype(np.float32)
    std = npz["std"].reshape(1, c, 1, 1).astype(np.float32)
    x = ((npz["calibration"].astype(np.float32) / 255.0 * float(npz["value_range"]) - mean) / std).astype(np.float32)
    if "{layout}" == "NHWC":
        x = x.transpose(0, 2, 3, 1)
    for i in range(0, len(x), BATCH):
        yield {{"{name}": np.ascontiguousarray(x[i:i + BATCH])}}
'''


def write_build_script(out_dir: str | Path, profile: Profile, *, layout: str = "NCHW",
                       fp32_onnx: str = "student.onnx", int8_onnx: Optional[str] = "student.int8.onnx",
                       calib_batch: int = 32) -> Path:
    """Write ``build_engine.sh`` (and ``calib_loader.py`` for the polygraphy route) into ``out_dir``.

    The script takes the precisions to build as arguments (default: all), runs from its own
    directory, and shares one timing cache across builds.
    """
    out_dir = Path(out_dir)
    q = shlex.join
    lines = [
        "#!/usr/bin/env bash",
        "# Build TensorRT engines for the distilled student on the target device.",
        "# Usage: ./build_engine.sh [fp32] [fp16] [int8] [int8-calib]   (default: fp32 fp16 int8)",
        f"# Input {INPUT_NAME!r}, layout {layout}; profile batch min/opt/max = "
        f"{profile.min[0]}/{profile.opt[0]}/{profile.max[0]}.",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        'targets=("$@"); [ ${#targets[@]} -eq 0 ] && targets=(fp32 fp16' + (" int8" if int8_onnx else "") + ")",
        'for t in "${targets[@]}"; do',
        '  case "$t" in',
        f"    fp32) {q(trtexec_command(fp32_onnx, 'student.fp32.engine', profile, 'fp32'))} ;;",
        f"    fp16) {q(trtexec_command(fp32_onnx, 'student.fp16.engine', profile, 'fp16'))} ;;",
    ]
    if int8_onnx:
        lines.append("    # explicit INT8: the Q/DQ model carries the synthetic-calibrated scales")
        lines.append(f"    int8) {q(trtexec_command(int8_onnx, 'student.int8.engine', profile, 'int8'))} ;;")
    lines += [
        "    # implicit INT8: calibrate the fp32 model on calibration.npz (needs polygraphy + TensorRT python)",
        f"    int8-calib) {q(polygraphy_int8_command(fp32_onnx, 'student.int8-calib.engine', profile))} ;;",
        '    *) echo "unknown target $t (fp32 fp16 int8 int8-calib)" >&2; exit 2 ;;',
        "  esac",
        "done",
        "",
    ]
    path = write_text(out_dir / "build_engine.sh", "\n".join(lines))
    path.chmod(0o755)
    write_text(out_dir / "calib_loader.py",
               CALIB_LOADER.format(batch=int(calib_batch), layout=layout.upper(), name=INPUT_NAME))
    return path


@dataclass
class TrtResult:
    available: bool
    message: Optional[str] = None
    version: Optional[str] = None
    gpu: Optional[str] = None
    engines: dict[str, dict] = field(default_factory=dict)     # precision -> {file, seconds}
    script: Optional[str] = None
    profile: Optional[dict] = None

    def to_dict(self) -> dict:
        return {"available": self.available, "message": self.message, "version": self.version,
                "gpu": self.gpu, "engines": self.engines, "script": self.script, "profile": self.profile}


def build_engines(out_dir: str | Path, fp32_onnx: str | Path, *, input_shape: Sequence[int], layout: str = "NCHW",
                  precisions: Sequence[str] = PRECISIONS, int8_onnx: str | Path | None = None,
                  calibration: Optional[np.ndarray] = None, batches: Sequence[int] = PROFILE_BATCHES,
                  script_dir: str | Path | None = None) -> TrtResult:
    """Write build_engine.sh into ``script_dir`` (default ``out_dir``); build engines when TensorRT is here.

    ``calibration`` (model-space NCHW float32) is used for int8 only when no Q/DQ ``int8_onnx`` is given.
    """
    out_dir = Path(out_dir)
    profile = make_profile(input_shape, layout, batches)
    script = write_build_script(script_dir or out_dir, profile, layout=layout, fp32_onnx=Path(fp32_onnx).name,
                                int8_onnx=Path(int8_onnx).name if int8_onnx else None)
    trt = tensorrt_module()
    if trt is None:
        return TrtResult(available=False, message=MISSING_MESSAGE, script=str(script), profile=profile.to_dict())
    result = TrtResult(available=True, version=trt.__version__, gpu=_gpu_name(), script=str(script),
                       profile=profile.to_dict())
    cache_path = out_dir / TIMING_CACHE
    for precision in precisions:
        src = Path(int8_onnx) if precision == "int8" and int8_onnx else Path(fp32_onnx)
        if precision == "int8" and not int8_onnx and calibration is None:
            result.engines[precision] = {"file": None, "error": "no Q/DQ model and no calibration data"}
            continue
        engine = out_dir / f"student.{precision}.engine"
        t0 = time.perf_counter()
        try:
            _build_one(trt, src, engine, profile, precision, cache_path,
                       calibration if precision == "int8" and not int8_onnx else None, layout)
            result.engines[precision] = {"file": engine.name, "onnx": src.name,
                                         "seconds": round(time.perf_counter() - t0, 2)}
        except Exception as exc:  # noqa: BLE001 - one failed precision must not lose the others
            result.engines[precision] = {"file": None, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    return result


# --- TensorRT proper (runs only where TensorRT is installed) -----------------------------------

def _build_one(trt, onnx_path: Path, engine_path: Path, profile: Profile, precision: str, cache_path: Path,
               calibration: Optional[np.ndarray], layout: str) -> None:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):   # deprecated (implied) in TRT 10
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_MIB << 20)
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(network.get_input(0).name, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(opt_profile)
    # One timing cache for every build (and every later run): kernel timings are reused.
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        if calibration is not None:
            x = calibration.transpose(0, 2, 3, 1) if layout.upper() == "NHWC" else calibration
            config.int8_calibrator = _calibrator(trt, np.ascontiguousarray(x, np.float32), profile.opt[0])
            config.set_calibration_profile(opt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build the {precision} engine (see the log above)")
    write_bytes(engine_path, bytes(serialized))
    write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))


def _calibrator(trt, data: np.ndarray, batch: int):
    """Entropy calibrator over synthetic images; device buffers through torch (CUDA is here)."""
    import torch

    class _Calib(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            super().__init__()
            self.pos, self.buf = 0, None

        def get_batch_size(self):
            return batch

        def get_batch(self, names):
            if self.pos + batch > len(data):
                return None
            self.buf = torch.from_numpy(data[self.pos:self.pos + batch]).cuda()
            self.pos += batch
            return [int(self.buf.data_ptr())]

        def read_calibration_cache(self):
            return None

        def write_calibration_cache(self, cache):
            return None

    return _Calib()


def _gpu_name() -> Optional[str]:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        return None
