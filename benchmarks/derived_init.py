"""Which teacher-derived student starts best, before and after a short KD: prune importances
(magnitude, BN scale, Taylor) and depth block choices (spread, last), each with and without BN
recalibration on synthesized images.

Small setting: the shared CIFAR-10 ResNet-56 (state_dict), a ResNet-20-sized student
(prune to params=0.3; depth ResNet-56 -> ResNet-20), top-1 on random test images, BN
recalibration on 256 Fast-5 images of a fresh generator, then ``--kd-steps`` KD steps on one
shared pool of synthesized images (every variant sees the same pool and batches).

    python benchmarks/derived_init.py --shared ../shared --eval-images 2000 --kd-steps 60

Writes benchmarks/results/derived_init.json.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = [("prune", {"prune_importance": "magnitude"}), ("prune", {"prune_importance": "bn_scale"}),
            ("prune", {"prune_importance": "taylor"}), ("depth", {"depth_blocks": "spread"}),
            ("depth", {"depth_blocks": "last"})]


def main(argv=None) -> int:
    import torch

    from dfkd_deploy.core.io import write_json
    from dfkd_deploy.distill.trainer import seed_everything
    from dfkd_deploy.recipe import TeacherOptions, load_recipe
    from dfkd_deploy.students import build as derive
    from dfkd_deploy.run import derivation_images
    from dfkd_deploy import load_teacher
    from dfkd_deploy.validate.data import load_eval_data, to_pixels
    from dfkd_deploy.validate.metrics import predict, top1_accuracy

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--eval-images", type=int, default=2000)
    ap.add_argument("--kd-steps", type=int, default=60)
    ap.add_argument("--pool-images", type=int, default=1024)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "derived_init.json"))
    args = ap.parse_args(argv)
    shared = Path(args.shared)
    teacher = load_teacher(shared / "teachers" / "cifar10-resnet56.th", TeacherOptions(arch="cifar_resnet56"))
    data = load_eval_data(shared / "data" / "cifar10-test-jpeg.npz", input_shape=(3, 32, 32),
                          num_classes=10).subset(args.eval_images, seed=0)
    pixels, labels = to_pixels(data.images), torch.from_numpy(data.labels)
    norm = teacher.normalizer()

    def top1(model):
        return top1_accuracy(predict(model.eval(), pixels, normalizer=norm), labels)

    base = load_recipe(None, {"synthesis.batch_size": 64, "student.target": "params=0.3"})
    seed_everything(0)
    t0 = time.perf_counter()
    pool = derivation_images(teacher, base, "cpu", args.pool_images)       # KD pool (model space)
    pool_seconds = time.perf_counter() - t0
    calib = pool[:256]
    with torch.no_grad():
        pool_logits = teacher.module(pool)
    rows = [{"variant": "teacher", "top1": top1(teacher.module)}]
    for init, derived in VARIANTS:
        for recal in (False, True):
            r = load_recipe(None, {"synthesis.batch_size": 64, "student.init": init,
                                   "student.target": "params=0.3" if init == "prune" else None,
                                   **{f"student.derived.{k}": v for k, v in derived.items()},
                                   "student.derived.recalibrate_bn": recal, "student.derived.images": 256})
            seed_everything(0)
            t0 = time.perf_counter()
            # the same 256 images for every variant; latency is not what is compared here
            student = derive(r, teacher, images=lambda n: calib[:n], measure_latency=False).module
            build_s = time.perf_counter() - t0
            row = {"variant": f"{init}:{next(iter(derived.values()))}", "bn_recalibrated": recal,
                   "params": sum(p.numel() for p in student.parameters()), "build_seconds": round(build_s, 1),
                   "top1_before_kd": top1(student)}
            row.update(_short_kd(student, pool, pool_logits, args.kd_steps))
            row["top1_after_kd"] = top1(student) if args.kd_steps else None
            rows.append(row)
            print(json.dumps(row), flush=True)
    load = os.getloadavg()
    write_json(args.out, {"setting": {"teacher": "cifar10-resnet56.th (state_dict)", "eval_images": args.eval_images,
                                      "kd_steps": args.kd_steps, "kd_batch": 64, "pool_images": args.pool_images,
                                      "pool_seconds": round(pool_seconds, 1), "calibration_images": 256,
                                      "loadavg": [round(v, 2) for v in load]}, "rows": rows})
    return 0


def _short_kd(student, pool, pool_logits, steps) -> dict:
    import torch
    import torch.nn.functional as F

    if not steps:
        return {}
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    student.train()
    for _ in range(steps):
        idx = torch.randint(0, len(pool), (64,), generator=g)
        x, t = pool[idx], pool_logits[idx]
        loss = F.kl_div(F.log_softmax(student(x) / 4, 1), F.softmax(t / 4, 1), reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return {"kd_final_loss": round(float(loss), 4)}


if __name__ == "__main__":
    sys.exit(main())
