"""How close a 2-process torchrun run comes to a 1-process run, against seed-to-seed variation.

The tolerance of tests/resilience/test_distributed.py (AGREEMENT_TOLERANCE) rests on this: the
same recipe (tests/resilience/conftest.py REFERENCE) and the same digits teacher as the tests,
run for several seeds in one process and with ``torchrun --standalone --nproc-per-node 2`` on
gloo (CPU), one thread per process.

    python benchmarks/distributed_parity.py [--seeds 4]   # writes benchmarks/results/distributed_parity.json

About 5 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "distributed_parity.json"
sys.path.insert(0, str(REPO))


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _run(prefix: list[str], teacher, recipe, eval_npz, out: Path, seed: int) -> dict:
    cmd = prefix + ["-m", "dfkd_deploy", "compress", str(teacher), "--recipe", str(recipe), "--eval-data",
                    str(eval_npz), "--out", str(out), "--quiet", "--device", "cpu", "--seed", str(seed)]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stdout + r.stderr)
    report = json.loads((out / "report.json").read_text())
    return {"seed": seed, "eval_agreement": report["agreement"]["eval_data_top1"],
            "student_accuracy": report["student"]["accuracy"], "probe_agreement": report["agreement"]["probe_top1"],
            "images": report["synthesis"]["images"], "wall_seconds": round(time.time() - t0, 1),
            "loadavg_1min": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=4)
    args = parser.parse_args()

    from dfkd_deploy.demo import digits_split, export_teacher_onnx, train_digits_teacher
    from tests.conftest import quick_recipe
    from tests.resilience.conftest import REFERENCE

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        x_tr, x_te, y_tr, y_te = digits_split()
        teacher = export_teacher_onnx(train_digits_teacher(x_tr, y_tr, epochs=8, seed=0), tmp / "digits.onnx")
        eval_npz = tmp / "digits-test.npz"
        np.savez(eval_npz, images=x_te, labels=y_te)
        recipe = tmp / "reference.yaml"
        recipe.write_text(quick_recipe(**REFERENCE).resolved_yaml())
        modes = {"1 process": [sys.executable],
                 "2 processes (torchrun, gloo)": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc-per-node", "2"]}
        rows = {name: [] for name in modes}
        for seed in range(args.seeds):
            for name, prefix in modes.items():
                row = _run(prefix, teacher, recipe, eval_npz, tmp / f"{len(rows[name])}-{name[0]}", seed)
                rows[name].append(row)
                print(name, row, flush=True)

    def summary(values):
        return {"mean": round(float(np.mean(values)), 4), "min": round(float(np.min(values)), 4),
                "max": round(float(np.max(values)), 4), "range": round(float(np.ptp(values)), 4)}

    one = [r["eval_agreement"] for r in rows["1 process"]]
    two = [r["eval_agreement"] for r in rows["2 processes (torchrun, gloo)"]]
    result = {
        "what": "student/teacher top-1 agreement on the held-out 30% of the digits, after a short compress run "
                "(tests/resilience/conftest.py REFERENCE) in one process and in two (same total batch sizes)",
        "recipe_overrides": REFERENCE, "seeds": args.seeds, "runs": rows,
        "eval_agreement": {"1 process": summary(one), "2 processes": summary(two),
                           "max |2-process - 1-process| at the same seed": round(
                               float(np.max(np.abs(np.array(two) - np.array(one)))), 4),
                           "max |difference| over all pairs": round(
                               float(np.max(np.abs(np.subtract.outer(two, one)))), 4)},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["eval_agreement"], indent=2))


if __name__ == "__main__":
    main()
