"""End-to-end measurements quoted in the README: the digits demo and the shared CIFAR-10
ResNet-56 teacher (state_dict and its ONNX export) compressed with recipes/tiny.yaml.

    python benchmarks/pipeline.py            # writes benchmarks/results/pipeline.json

Needs ../shared for the CIFAR part (skipped with a note without it). About 10-20 minutes on
2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RESULTS = REPO / "benchmarks" / "results" / "pipeline.json"


def _summary(report: dict, wall: float) -> dict:
    return {"teacher_accuracy": report["teacher"]["accuracy"], "student_accuracy": report["student"]["accuracy"],
            "student_arch": report["student"]["arch"], "student_params": report["student"]["params"],
            "probe_agreement": report["agreement"]["probe_top1"],
            "eval_agreement": report["agreement"]["eval_data_top1"],
            "onnx_max_abs_diff": report["fidelity"]["onnx_max_abs_diff"],
            "synthesis_images": report["synthesis"]["images"], "synthesis_seconds": report["synthesis"]["seconds"],
            "distillation_seconds": report["distillation"]["seconds"], "wall_seconds": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-cifar", action="store_true")
    args = parser.parse_args()

    from dfkd_deploy import run as api, stages
    from dfkd_deploy import run_demo
    from dfkd_deploy import load_recipe

    results = {"machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
                           "torch": torch.__version__, "device": "cpu"}}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        demo = run_demo(Path(tmp) / "demo", show_progress=False)
        results["demo"] = _summary(demo["report"], time.time() - t0)
        results["demo"]["command"] = "dfkd-deploy demo"

        teacher = SHARED / "teachers" / "cifar10-resnet56.th"
        data = SHARED / "data" / "cifar10-test-jpeg.npz"
        if args.skip_cifar or not teacher.exists():
            results["cifar10_resnet56"] = "skipped: ../shared absent or --skip-cifar"
        else:
            recipe_path = REPO / "recipes" / "tiny.yaml"
            for name, source in (("state_dict", teacher), ("onnx", None)):
                recipe = load_recipe(recipe_path, {"teacher.arch": "cifar_resnet56"} if name == "state_dict" else {})
                if source is None:
                    source = stages.export_teacher(teacher, load_recipe(recipe_path, {"teacher.arch": "cifar_resnet56"}),
                                                   Path(tmp) / "resnet56.onnx")
                t0 = time.time()
                res = api.compress(source, recipe, Path(tmp) / f"r56-{name}", eval_data=data, device="cpu",
                                   show_progress=False)
                results[f"cifar10_resnet56_{name}"] = _summary(res.report, time.time() - t0)
                results[f"cifar10_resnet56_{name}"]["command"] = (
                    "dfkd-deploy compress ../shared/teachers/cifar10-resnet56.th --teacher-arch cifar_resnet56 "
                    "--recipe recipes/tiny.yaml --eval-data ../shared/data/cifar10-test-jpeg.npz"
                    if name == "state_dict" else
                    "dfkd-deploy export-teacher ../shared/teachers/cifar10-resnet56.th --teacher-arch cifar_resnet56 "
                    "--out resnet56.onnx && dfkd-deploy compress resnet56.onnx --recipe recipes/tiny.yaml "
                    "--eval-data ../shared/data/cifar10-test-jpeg.npz")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
