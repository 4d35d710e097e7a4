"""Peak memory of a run does not grow with the number of synthesized images.

A tiny random teacher (3x32x32, ``tiny_cnn`` with BN statistics) is distilled while its pool
grows to 5,000 and to 50,000 images (uint8: 15 MB and 154 MB on disk). Each figure is the peak
resident set (VmHWM) of a fresh process:

- ``run``: synthesis + KD epochs (the Distiller) until the pool holds N images;
- ``kd``: a fresh process that opens that pool and runs 300 KD-style sampling steps over all of it;
- ``load_all`` (control): the same process reading the whole pool into memory, which is what
  streaming avoids: it shows the measurement does see a pool held in memory.

    python benchmarks/pool_memory.py        # writes benchmarks/results/pool_memory.json

A few minutes on 2 CPU cores.
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

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "pool_memory.json"
SHAPE = (3, 32, 32)
BATCH, ROUNDS = 250, 10            # 2,500 images per epoch


def _peak_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _tiny_teacher():
    import torch
    from torch import nn

    from dfkd_deploy.models.small_cnn import SmallCNN

    torch.manual_seed(0)
    teacher = SmallCNN(10, SHAPE[0], width=8)
    with torch.no_grad():
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return teacher.eval().requires_grad_(False)


def child_run(images: int, out: Path) -> dict:
    import torch
    from torch import nn

    from dfkd_deploy.distill.trainer import Distiller, seed_everything
    from dfkd_deploy.models.small_cnn import SmallCNN
    from dfkd_deploy import Recipe
    from dfkd_deploy.synthesis import Priors, build_synthesizer
    from dfkd_deploy.synthesis.pool import ImagePool
    from dfkd_deploy.teachers import Teacher, TeacherSpec, count_batchnorms

    epochs = images // (BATCH * ROUNDS)
    recipe = Recipe.model_validate({
        "student": {"arch": "tiny_cnn"},
        "synthesis": {"g_steps": 1, "batch_size": BATCH, "rounds_per_epoch": ROUNDS, "nz": 32, "ngf": 8,
                      "reset_l0_after": None},
        "distillation": {"epochs": epochs, "warmup": 1, "kd_steps": 5, "batch_size": 128, "lr": 0.05,
                         "temperature": 4.0},
    })
    seed_everything(0)
    teacher = _tiny_teacher()
    spec = TeacherSpec("torch", "pool_memory", SHAPE, num_classes=10, bn_layers=count_batchnorms(teacher))
    synth = build_synthesizer("fastdfkd", Teacher(teacher, spec), recipe.synthesis, "cpu",
                              Priors.for_teacher(spec, recipe.synthesis.priors))
    d = Distiller(teacher, nn.Identity(), SmallCNN(10, SHAPE[0], width=8), synth, ImagePool(out / "pool"), recipe,
                  out, show_progress=False)
    t0 = time.time()
    result = d.run()
    return {"images": result.images, "peak_rss_mib": round(_peak_mib(), 1), "seconds": round(time.time() - t0, 1)}


def child_kd(out: Path) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from dfkd_deploy.models.small_cnn import SmallCNN
    from dfkd_deploy.synthesis.pool import ImagePool

    pool = ImagePool(out / "pool")
    student = SmallCNN(10, SHAPE[0], width=8)
    opt = torch.optim.SGD(student.parameters(), lr=0.01)
    rng = np.random.default_rng(0)
    t0 = time.time()
    for _ in range(300):
        x = pool.sample(256, rng)
        loss = F.cross_entropy(student(x), torch.zeros(len(x), dtype=torch.long))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"images": len(pool), "peak_rss_mib": round(_peak_mib(), 1), "seconds": round(time.time() - t0, 1)}


def child_load_all(out: Path) -> dict:
    import numpy as np

    from dfkd_deploy.synthesis.pool import ImagePool

    pool = ImagePool(out / "pool")
    everything = np.concatenate([np.load(pool.root / s["file"]) for s in pool.shards])
    return {"images": int(everything.shape[0]), "peak_rss_mib": round(_peak_mib(), 1)}


def _child(kind: str, out: Path, images: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    r = subprocess.run([sys.executable, __file__, "--child", kind, "--out", str(out), "--images", str(images)],
                       env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stdout + r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", choices=["run", "kd", "load_all"])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--images", type=int, default=0)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5_000, 50_000])
    args = parser.parse_args()
    if args.child:
        fn = {"run": lambda: child_run(args.images, args.out), "kd": lambda: child_kd(args.out),
              "load_all": lambda: child_load_all(args.out)}[args.child]
        print(json.dumps(fn()))
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            out = Path(tmp) / str(n)
            row = {"images": n, "pool_mib_on_disk": round(n * int(__import__("math").prod(SHAPE)) / 2**20, 1)}
            for kind in ("run", "kd", "load_all"):
                row[kind] = _child(kind, out, n)
                row[kind]["loadavg_1min"] = round(os.getloadavg()[0], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    growth = {k: round(rows[-1][k]["peak_rss_mib"] - rows[0][k]["peak_rss_mib"], 1) for k in ("run", "kd", "load_all")}
    result = {"what": "peak RSS (VmHWM, MiB) of fresh processes while the pool grows; tiny random 3x32x32 teacher",
              "rows": rows, f"growth_mib_{args.sizes[0]}_to_{args.sizes[-1]}": growth,
              "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(growth))


if __name__ == "__main__":
    main()
