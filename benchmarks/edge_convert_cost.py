"""What a budgeted run's estimate of the edge conversions should be: for CIFAR-shaped zoo students,
one ONNX export of the student (what ``budget/calibrate.py`` times anyway) side by side with the
OpenVINO conversion (fp32, fp16, int8) and the ExecuTorch lowering (fp32, int8) of the same
student, in the same process, so the ratio conversion / export holds on whatever host runs it.

    python benchmarks/edge_convert_cost.py --archs tiny_cnn,cifar_resnet8,cifar_resnet20,cifar_resnet56

Writes results/edge_convert_cost.json (one row per architecture: layers, export seconds, each
runtime's seconds, and their ratio to the export).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    import numpy as np
    import torch

    from dfkd_deploy.budget.calibrate import _bookkeeping, _layers
    from dfkd_deploy.core.io import write_json
    from dfkd_deploy.models import build_model
    from exporters.executorch import export_executorch
    from exporters.onnx_export import export_teacher_onnx
    from exporters.openvino import convert_openvino

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", default="tiny_cnn,cifar_resnet8,cifar_resnet20,cifar_resnet56")
    ap.add_argument("--calibration-images", type=int, default=256, help="as deploy.calibration_images")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "edge_convert_cost.json"))
    args = ap.parse_args(argv)
    shape = (3, 32, 32)
    calib = np.random.default_rng(0).standard_normal((args.calibration_images, *shape)).astype(np.float32)
    rows = []
    for arch in args.archs.split(","):
        torch.manual_seed(0)
        model = build_model(arch, num_classes=10, in_channels=3, input_size=shape[1:]).eval()
        _, export_s = _bookkeeping(model, shape)
        with tempfile.TemporaryDirectory(prefix="dfkd-edge-cost-") as tmp:
            onnx_path = export_teacher_onnx(model, Path(tmp) / "student.onnx", input_shape=shape, fold=True)
            t0 = time.perf_counter()
            convert_openvino(onnx_path, Path(tmp) / "ov", calibration=calib)
            ov_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            export_executorch(model, Path(tmp) / "et", input_shape=shape, calibration=calib)
            et_s = time.perf_counter() - t0
        rows.append({"arch": arch, "layers": _layers(model), "export_s": round(export_s, 3),
                     "openvino_s": round(ov_s, 2), "executorch_s": round(et_s, 2),
                     "openvino_per_export": round(ov_s / export_s, 2), "executorch_per_export": round(et_s / export_s, 2)})
        print(rows[-1], flush=True)
    write_json(Path(args.out), {"setting": "CIFAR-shaped zoo students, random weights; one process, side by side",
                                "torch_threads": torch.get_num_threads(), "machine": f"{os.cpu_count()} CPU cores",
                                "loadavg_after": [round(v, 2) for v in os.getloadavg()], "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
