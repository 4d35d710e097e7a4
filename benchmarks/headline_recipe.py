"""The README's CPU headline, run as a user runs it: ``recipes/cpu-30min.yaml`` as shipped (no
overrides but the teacher's architecture name) on the shared CIFAR-10 ResNet-56 state_dict, the
student ONNX scored on all 10,000 shared CIFAR-10 test images.

    python benchmarks/headline_recipe.py --shared ../shared              # 30 minutes
    python benchmarks/headline_recipe.py --shared ../shared --budget 60m

Equivalent to ``dfkd-deploy compress ../shared/teachers/cifar10-resnet56.th --teacher-arch
cifar_resnet56 --recipe recipes/cpu-30min.yaml --eval-data ../shared/data/cifar10-test-jpeg.npz``.
Appends one record per call to results/headline_recipe.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    from dfkd_deploy import compress, load_recipe
    from dfkd_deploy.core.io import write_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--budget", default=None, help="override the recipe's budget (e.g. 60m)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "headline_recipe.json"))
    ap.add_argument("--work", default=str(REPO / "runs" / "headline_recipe"))
    args = ap.parse_args(argv)
    shared = Path(args.shared)
    teacher = shared / "teachers" / "cifar10-resnet56.th"
    eval_data = shared / "data" / "cifar10-test-jpeg.npz"
    if not teacher.is_file() or not eval_data.is_file():
        print(f"skip: {teacher} or {eval_data} is missing (the shared material is not here)")
        return 0
    sets = {"teacher.arch": "cifar_resnet56", **({"budget": args.budget} if args.budget else {})}
    recipe = load_recipe(REPO / "recipes" / "cpu-30min.yaml", sets)
    run_dir = Path(args.work) / f"cpu-30min-{recipe.budget}"
    if run_dir.exists():
        import shutil
        shutil.rmtree(run_dir)
    t0 = time.time()
    r = compress(teacher, recipe, run_dir, eval_data=eval_data, show_progress=False).report
    s, b = r["student"], r.get("budget") or {}
    lat, t_lat = (r.get("latency") or {}).get("student") or {}, (r.get("latency") or {}).get("teacher") or {}
    record = {"recipe": "recipes/cpu-30min.yaml", "overrides": sets, "budget": recipe.budget,
              "wall_min": round((time.time() - t0) / 60, 3), "budget_used_s": b.get("used_s"),
              "top1": s.get("onnx_accuracy"), "teacher_top1": r["teacher"].get("accuracy"),
              "student_arch": s["arch"], "init": s.get("init"), "init_choice": s.get("init_choice"),
              "params": s["params"], "teacher_params": s.get("teacher_params"),
              "latency_b32_ms": lat.get("batch_32_ms"), "latency_b1_ms": lat.get("batch_1_ms"),
              "teacher_latency_b32_ms": t_lat.get("batch_32_ms"), "teacher_latency_b1_ms": t_lat.get("batch_1_ms"),
              "mix": recipe.distillation.mix, "plan": b.get("plan"), "budget_notes": b.get("notes"),
              "warnings": s.get("warnings"), "loadavg": [round(v, 2) for v in os.getloadavg()]}
    out = Path(args.out)
    runs = json.loads(out.read_text())["runs"] if out.is_file() else []
    runs.append(record)
    write_json(out, {"setting": "recipes/cpu-30min.yaml as shipped, shared ResNet-56 state_dict, all 10,000 "
                                "CIFAR-10 test images", "machine": f"{os.cpu_count()} CPU cores", "runs": runs})
    print(json.dumps({k: record[k] for k in ("budget", "wall_min", "top1", "student_arch", "init", "params",
                                              "latency_b32_ms", "teacher_latency_b32_ms")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
