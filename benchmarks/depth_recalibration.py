"""BN recalibration of a ``depth`` student before KD: the shared ResNet-56 as a state_dict (real BN
scales) and as its dynamo ONNX export (BN folded; recognised as the zoo ResNet-56 by
students/recognise.py), depth -> ResNet-20 (blocks 0, 4, 8 per stage), top-1 on random CIFAR-10
test images before any KD:

- ``none``: the copied blocks as they are;
- ``statistics``: every BN's running statistics re-estimated on synthesized images (the default
  for a teacher with real BN);
- ``teacher-matched``: each BN's scale and shift set to the per-channel standard deviation and
  mean of the teacher's output at the layer it was copied from, on the same images, then its
  statistics re-estimated (the default for a folded teacher, ``depth.match_teacher_bn``).

(Before 2026-12-04 a folded teacher's default was ``function-preserving``: statistics re-estimated
with each BN's scale and shift re-expressed so that the eval-mode function did not change. It kept
the copied blocks' 12.6%; git history has it.)

    python benchmarks/depth_recalibration.py --shared ../shared --eval-images 1000

Writes results/depth_recalibration.json.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def main(argv=None) -> int:
    import torch

    import time_to_accuracy as tta
    from dfkd_deploy.core.io import write_json
    from dfkd_deploy.run import build_student, derivation_images
    from dfkd_deploy.students.build import depth_source
    from dfkd_deploy.students import depth
    from dfkd_deploy.teachers import load_teacher
    from dfkd_deploy.validate.data import load_eval_data
    from dfkd_deploy.validate.metrics import evaluate

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--eval-images", type=int, default=1000)
    ap.add_argument("--calibration-images", type=int, default=256)
    ap.add_argument("--work", default=str(REPO / "runs" / "time_to_accuracy"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "depth_recalibration.json"))
    args = ap.parse_args(argv)
    shared, work = Path(args.shared), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tta.ensure_dynamo(shared, work)
    table = tta.teachers(shared, work)
    rows = []
    for key in ("resnet56/state_dict", "resnet56/onnx_dynamo"):
        t = table[key]
        recipe = tta.recipe_for(t, "depth", 30)
        plain = load_recipe_without_recalibration(recipe)
        teacher = load_teacher(t.path, recipe.teacher)
        data = load_eval_data(t.eval_data, input_shape=teacher.spec.input_shape).subset(args.eval_images, seed=1)
        torch.manual_seed(0)
        images = derivation_images(teacher, recipe, "cpu", args.calibration_images)
        source = depth_source(teacher)[1]
        blocks = depth.block_map("cifar_resnet56", "cifar_resnet20", recipe.student.derived.depth_blocks)
        for mode in ("none", "statistics", "teacher-matched"):
            student = build_student(plain, teacher, measure_latency=False)
            if mode == "statistics":
                depth.recalibrate_bn(student, images)
            elif mode == "teacher-matched":
                depth.match_teacher_bn(student, source, blocks, images)
            m = evaluate(teacher.module, student.eval(), teacher.normalizer(), data)
            rows.append({"teacher_form": t.form, "recalibration": mode, "top1": round(m["student_accuracy"], 4),
                         "teacher_top1": round(m["teacher_accuracy"], 4), "agreement": round(m["agreement"], 4)})
            print(rows[-1], flush=True)
    write_json(Path(args.out), {"setting": f"shared ResNet-56 -> depth ResNet-20 (spread), before KD; "
                                           f"{args.calibration_images} synthesized calibration images",
                                "eval_images": args.eval_images, "eval_subset_seed": 1,
                                "machine": f"{os.cpu_count()} CPU cores", "rows": rows})
    return 0


def load_recipe_without_recalibration(recipe):
    derived = recipe.student.derived.model_copy(update={"recalibrate_bn": False})
    return recipe.model_copy(update={"student": recipe.student.model_copy(update={"derived": derived})})


if __name__ == "__main__":
    sys.exit(main())
