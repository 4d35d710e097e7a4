"""Benchmark: how far procedural noise is from real data in a teacher's feature statistics: the
measurement behind the stand-in statistics prior (``synthesis.priors.proxy``,
``dfkd_deploy/synthesis/proxy_stats.py``).

Through the shared CIFAR-10 ResNet-56 with its BN kept (whose running statistics are the real
training data's), the BN-statistics loss of the synthesizer (sum over BN layers of
||mu - mu_run|| + ||var - var_run||, batches of 64, mean of 4) for 256 images of each kind: real
test images drawn at random, uniform and Gaussian noise, colour noise with a 1/f^alpha amplitude
spectrum for several alpha (``power_law_noise``), and dead leaves (random discs). Reported in all
and per group of layers (stem; stage 1 blocks 0-2 and 3-8; stage 2; stage 3), with the teacher's
mean confidence and class histogram on each kind.

Run: python benchmarks/proxy_noise.py  (about 1 minute on 2 cores; writes
benchmarks/results/proxy_noise.json)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))   # runs from a clone without an install too

RESULTS = HERE / "results"
GROUPS = ((0, 1, "stem"), (1, 7, "stage 1, blocks 0-2"), (7, 19, "stage 1, blocks 3-8"),
          (19, 37, "stage 2"), (37, 55, "stage 3"))


def dead_leaves(n: int, generator):
    import torch

    out = torch.zeros(n, 3, 32, 32)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    for i in range(n):
        img = torch.rand(3, 1, 1, generator=generator).expand(3, 32, 32).clone()
        for _ in range(60):
            c = torch.rand(2, generator=generator) * 32
            radius = 32 * (0.03 + 0.3 * torch.rand(1, generator=generator) ** 3)
            img[:, ((yy - c[0]) ** 2 + (xx - c[1]) ** 2) < radius ** 2] = torch.rand(3, 1, generator=generator)
        out[i] = img
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=str(HERE.parent.parent / "shared"))
    ap.add_argument("--out", type=Path, default=RESULTS / "proxy_noise.json")
    args = ap.parse_args(argv)
    shared = Path(args.shared)
    teacher_path = shared / "teachers" / "cifar10-resnet56.th"
    test_set = shared / "data" / "cifar10-test-jpeg.npz"
    for path in (teacher_path, test_set):
        if not path.exists():
            print(f"error: {path} is absent (the shared material lives beside the repository)", file=sys.stderr)
            return 2

    import torch

    from dfkd_deploy import load_teacher
    from dfkd_deploy.core.io import write_json
    from dfkd_deploy.recipe import TeacherOptions
    from dfkd_deploy.synthesis.losses import BNStatistics
    from dfkd_deploy.synthesis.proxy_stats import power_law_noise
    from dfkd_deploy.validate.data import load_eval_data, to_pixels

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    teacher = load_teacher(teacher_path, TeacherOptions(arch="cifar_resnet56"))
    norm = teacher.normalizer()
    pixels = to_pixels(load_eval_data(test_set, input_shape=teacher.spec.input_shape).images)
    kinds = {
        "real test images": pixels[torch.randperm(len(pixels), generator=g)[:256]],
        "uniform noise": torch.rand(256, 3, 32, 32, generator=g),
        "gaussian noise": (0.5 + 0.25 * torch.randn(256, 3, 32, 32, generator=g)).clamp(0, 1),
        **{f"1/f^{a:g} colour noise": power_law_noise(256, (3, 32, 32), alpha=a, generator=g)
           for a in (1.0, 1.5, 2.0, 2.5, 3.0)},
        "dead leaves": dead_leaves(256, g),
    }
    stats = BNStatistics(teacher.module)
    rows = {}
    with torch.no_grad():
        for name, x in kinds.items():
            per_layer = None
            for start in range(0, 256, 64):
                with stats.capture():
                    teacher.module(norm(x[start:start + 64]))
                t = torch.stack(stats.terms)
                per_layer = t if per_layer is None else per_layer + t
            per_layer = per_layer / 4
            p = torch.softmax(teacher.module(norm(x)), 1)
            rows[name] = {"bn_loss": round(float(per_layer.sum()), 1),
                          "bn_loss_by_group": {label: round(float(per_layer[a:b].sum()), 1) for a, b, label in GROUPS},
                          "teacher_confidence": round(float(p.max(1).values.mean()), 3),
                          "teacher_classes": torch.bincount(p.argmax(1), minlength=10).tolist()}
            print(f"{name:24s} {rows[name]['bn_loss']:8.1f}  {list(rows[name]['bn_loss_by_group'].values())}", flush=True)
    stats.remove()
    write_json(args.out, {"command": "python benchmarks/proxy_noise.py", "bn_layers": len(stats),
                          "batch": 64, "images_per_kind": 256, "kinds": rows,
                          "note": "BN loss of the synthesizer against the BN-kept teacher's running statistics; "
                                  "lower is closer to the real training data"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
