"""Why the pruned ResNet-56 is slower than a ResNet-20 of the same size, and whether keeping
whole blocks of 8 channels helps: ONNX Runtime CPU latency (batch 1 and 32, the way report.json
measures it) side by side in one process, the variants alternating in every repetition.

Variants: the shared CIFAR-10 ResNet-56 teacher; the teacher pruned to params=0.3 (inner mode,
as ``student.init: prune`` does) with free channel counts and with counts rounded up to
multiples of 8 (``student.derived.round_to``); a ResNet-20 (the scratch and depth students'
architecture: same graph, so the same latency whatever its weights).

    python benchmarks/prune_latency.py --shared ../shared     # about 3 minutes on 2 cores

Writes benchmarks/results/prune_latency.json (medians, every repetition, load average).
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    import torch

    from dfkd_deploy import load_teacher
    from dfkd_deploy.core.io import write_json
    from dfkd_deploy.core.units import Target
    from dfkd_deploy.models.registry import build_model
    from dfkd_deploy.recipe import TeacherOptions
    from dfkd_deploy.students import prune
    from dfkd_deploy.students.targets import count_macs, count_params, measure_latency

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "prune_latency.json"))
    args = ap.parse_args(argv)
    t0 = time.time()
    teacher = load_teacher(Path(args.shared) / "teachers" / "cifar10-resnet56.th", TeacherOptions(arch="cifar_resnet56"))
    net = teacher.module.model
    example = torch.randn(1, 3, 32, 32)
    models = {"teacher resnet56": net}
    for round_to in (None, 8):
        r = prune.prune_to_target(net, Target("params", 0.3), example=example, num_classes=10,
                                  teacher_value=count_params(net), round_to=round_to)
        models[f"prune params=0.3, round_to {round_to}"] = r.model
    models["resnet20 (scratch/depth)"] = build_model("cifar_resnet20", num_classes=10)
    record = {name: {"params": count_params(m), "macs": count_macs(m, (3, 32, 32)),
                     "conv_widths": sorted({c.out_channels for c in m.modules() if isinstance(c, torch.nn.Conv2d)}),
                     "runs": []} for name, m in models.items()}
    for rep in range(args.repeats):
        for name, m in models.items():
            lat, why = measure_latency(m.eval(), (3, 32, 32))
            if why:
                raise SystemExit(f"{name}: latency not measured: {why}")
            record[name]["runs"].append(lat)
            print(rep, name, lat, flush=True)
    for name, r in record.items():
        for b in ("batch_1_ms", "batch_32_ms"):
            r[f"median_{b}"] = round(statistics.median(x[b] for x in r["runs"]), 3)
    ref = record["resnet20 (scratch/depth)"]
    for r in record.values():
        r["vs_resnet20_b32"] = round(r["median_batch_32_ms"] / ref["median_batch_32_ms"], 3)
        r["vs_resnet20_b1"] = round(r["median_batch_1_ms"] / ref["median_batch_1_ms"], 3)
    write_json(args.out, {"what": __doc__.split("\n")[0], "variants": record, "repeats": args.repeats,
                          "wall_s": round(time.time() - t0, 1), "loadavg_end": [round(v, 2) for v in os.getloadavg()],
                          "torch_threads": torch.get_num_threads()})
    for name, r in record.items():
        print(f"{name}: {r['params']:,} params, {r['macs'] / 1e6:.1f}M MACs, b1 {r['median_batch_1_ms']} ms, "
              f"b32 {r['median_batch_32_ms']} ms ({r['vs_resnet20_b32']}x ResNet-20)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
