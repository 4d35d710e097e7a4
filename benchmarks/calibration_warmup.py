"""How far a budgeted run's calibration is from the costs the run then measures: ``calibrate`` called
several times in one process on the shared ResNet-56 (state_dict) and its depth ResNet-20 student,
the setting of ``budget_settings.py``. The first call is what a run plans with; later calls show
the same measurement once the process is warm (allocator, oneDNN primitives, thread pool).

    python benchmarks/calibration_warmup.py --shared ../shared --calls 4

Writes results/calibration_warmup.json (one row per call: synthesis round and KD step seconds).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# as budget_settings.py and time_to_accuracy.py run (set OMP_WAIT_POLICY yourself to compare)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def main(argv=None) -> int:
    import torch

    import time_to_accuracy as tta
    from dfkd_deploy.budget.calibrate import calibrate
    from dfkd_deploy.core.io import write_json
    from dfkd_deploy.run import build_student
    from dfkd_deploy.teachers import load_teacher

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--init", default="depth", choices=tta.INITS)
    ap.add_argument("--work", default=str(REPO / "runs" / "time_to_accuracy"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "calibration_warmup.json"))
    args = ap.parse_args(argv)
    t = tta.teachers(Path(args.shared), Path(args.work))["resnet56/state_dict"]
    recipe = tta.recipe_for(t, args.init, 10)
    teacher = load_teacher(t.path, recipe.teacher)
    torch.manual_seed(0)
    student = build_student(recipe, teacher, measure_latency=False)
    rows = []
    for call in range(args.calls):
        t0 = time.perf_counter()
        c = calibrate(teacher, recipe, student, "cpu")
        rows.append({"call": call + 1, "synth_round_s": round(c.synth_round_s, 3), "kd_step_s": round(c.kd_step_s, 4),
                     "calibration_s": round(time.perf_counter() - t0, 1)})
        print(rows[-1], flush=True)
    write_json(Path(args.out), {"setting": f"shared ResNet-56 state_dict -> {args.init} ResNet-20, the "
                                           "time_to_accuracy recipe; calibrate() called again and again in one process",
                                "torch_threads": torch.get_num_threads(),
                                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "machine": f"{os.cpu_count()} CPU cores",
                                "loadavg_after": [round(v, 2) for v in os.getloadavg()], "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
