"""int8 teachers: which surrogate and which prior synthesize the better student (issue 16).

The int8 MLPerf-Tiny ResNet-8 (QOperator, BN folded, batch fixed at 16) from ../shared, budgeted
``compress`` runs at equal wall-clock budgets, the student's real top-1 on all 10,000 CIFAR-10
test images (the exported student ONNX):

- ``fake_quant``: activations fake-quantized at the file's scales (straight-through rounding);
- ``float``: activations in float, clamped to the same ranges;
- ``fake_quant+ranges``: fake-quant plus the activation-range prior (``synthesis.priors.ranges``),
  the statistic a quantized graph records and a BN-free teacher otherwise lacks.

    python benchmarks/int8_teacher_study.py --shared ../shared            # 3 runs x 8 minutes
    python benchmarks/int8_teacher_study.py --shared ../shared --minutes 2 --out /tmp/check.json   # a check

Resumable: finished configurations in results/int8_teacher_study.json are skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CIFAR_MLPERF = {"teacher.mean": [0.4914, 0.4822, 0.4465], "teacher.std": [0.2023, 0.1994, 0.2010]}
CONFIGS = {
    "fake_quant": {"teacher.int8_activations": "fake_quant", "synthesis.priors.ranges": 0.0},
    "float": {"teacher.int8_activations": "float", "synthesis.priors.ranges": 0.0},
    "fake_quant+ranges": {"teacher.int8_activations": "fake_quant", "synthesis.priors.ranges": 1.0},
}


def run_one(teacher: Path, eval_data, name: str, minutes: float, work: Path, seed: int = 0) -> dict:
    from dfkd_deploy import compress, load_recipe

    out = work / f"int8-resnet8-{name.replace('+', '-')}-{minutes:g}m-s{seed}"
    if out.exists():
        shutil.rmtree(out)              # an unfinished run of an earlier call: start it again
    recipe = load_recipe(None, {**CIFAR_MLPERF, **CONFIGS[name], "budget": f"{minutes:g}m", "seed": seed})
    t0 = time.time()
    r = compress(teacher, recipe, out, eval_data=eval_data, show_progress=False).report
    lat = (r.get("latency") or {}).get("student") or {}
    return {"config": name, "budget_min": minutes, "seed": seed, "wall_min": round((time.time() - t0) / 60, 3),
            "top1": r["student"].get("onnx_accuracy", r["student"].get("accuracy")),
            "teacher_top1": r["teacher"].get("accuracy"), "student_arch": r["student"]["arch"],
            "params": r["student"]["params"], "latency_b32_ms": lat.get("batch_32_ms"),
            "probe_agreement": (r.get("agreement") or {}).get("probe"),
            "plan": (r.get("budget") or {}).get("plan"), "eval_images": (r.get("eval_data") or {}).get("images"),
            "loadavg": [round(v, 2) for v in os.getloadavg()]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget of each run")
    ap.add_argument("--seed", type=int, default=0, help="the recipe seed (a second seed repeats the table)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated configurations to run")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "int8_teacher_study.json"))
    ap.add_argument("--work", default=str(REPO / "runs" / "int8_teacher_study"))
    args = ap.parse_args(argv)
    shared, work, out = Path(args.shared), Path(args.work), Path(args.out)
    teacher = shared / "teachers" / "cifar10-resnet8-mlperftiny-int8.onnx"
    if not teacher.is_file():
        print(f"skip: {teacher} is not there (../shared holds the int8 teacher)")
        return 0
    eval_data = shared / "data" / "cifar10-test-jpeg.npz"
    work.mkdir(parents=True, exist_ok=True)
    from dfkd_deploy.core.io import write_json

    runs = json.loads(out.read_text())["runs"] if out.is_file() else []
    for name in args.configs.split(","):
        if any(r["config"] == name and r["budget_min"] == args.minutes and r.get("seed", 0) == args.seed
               for r in runs):
            continue
        print(f"run {name} {args.minutes:g} min ...", flush=True)
        runs.append(run_one(teacher, eval_data, name, args.minutes, work, args.seed))
        write_json(out, {"setting": "int8 MLPerf-Tiny ResNet-8, CIFAR-10 test set, budgeted compress",
                         "machine": f"{os.cpu_count()} CPU cores", "runs": runs})
        print(json.dumps({k: runs[-1][k] for k in ("config", "wall_min", "top1", "student_arch")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
