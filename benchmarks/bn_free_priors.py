"""Benchmark: which BN-free synthesis priors make the best student when the teacher has no
BatchNorm statistics (issue 3).

The shared CIFAR-10 ResNet-56 is exported through torch's dynamo exporter (BatchNorm folded into
the convolutions, as torch's default export does) and loaded back as a BN-free teacher; the same
teacher with BN kept is the baseline. Every arm runs the protocol of
``benchmarks/synthesis_speed.py --small`` (FastDFKD Fast-5, 24 batches of 64 images, 1000 KD
steps of 64 into a CIFAR ResNet-20, seed 0) and differs only in the synthesis loss:

- ``bn-kept``: the BN-kept teacher, BN-statistics loss + CE + adversarial (the recipe's default);
- ``bn-free/adv``: the dynamo teacher, CE + adversarial only (every prior 0);
- ``bn-free/dafl``: + DAFL information entropy and activation;
- ``bn-free/image``: + total variation and L2 image priors;
- ``bn-free/all``: all four priors;
- ``bn-free/proxy*``: TV + L2 + the stand-in statistics on 1/f noise
  (``dfkd_deploy.synthesis.proxy_stats``) at weight 2 on the first third of the convolutions
  (``-all``: on all of them; ``proxy10``: weight 10; ``-oh2``: CE weight 2);
- ``bn-free/*-adv0.3``, ``-adv0``: the adversarial weight for the BN-free teacher
  (``synthesis.adv_bn_free``) at 0.3 or 0 instead of the BN teachers' 1.33 that the other arms use;
  ``bn-free/proxy-adv0.3`` is the BN-free default;
- ``bn-free/proxy-adv0.3-zoom0.5``, ``-color1``, ``-zoom-color``: the default with stronger views
  in the inversion loss (``synthesis.augment.zoom`` 0.5, ``color_shift`` 1.0, both).

Reported per arm: student top-1 on the 10,000 real test images, agreement with the teacher,
synthesis seconds, and two properties of the synthetic pool measured with the BN-kept teacher
(which the BN-free arms never saw): its BN-statistics loss (how far the pool's feature statistics
are from those of the real training data) and the entropy of its predicted-class histogram.

Run: python benchmarks/bn_free_priors.py  (about 35-45 minutes on 2 cores; ``--arms a,b`` runs
a subset and merges it into the stored results).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import math
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))          # synthesis_speed's protocol
sys.path.insert(0, str(HERE.parent))   # runs from a clone without an install too

import synthesis_speed as protocol  # noqa: E402

RESULTS = HERE / "results"
ZERO = {"tv": 0.0, "l2": 0.0, "entropy": 0.0, "activation": 0.0, "proxy": 0.0}
IMAGE = {**ZERO, "tv": 0.5, "l2": 0.01}
PROXY = {**IMAGE, "proxy": 2.0}
# The adversarial weight the first arms ran with (the BN teachers' 1.33, before a BN-free teacher
# got its own: synthesis.adv_bn_free), pinned so that they measure again what they measured.
ADV = {"synthesis.adv_bn_free": 1.33}
# arm -> (teacher: "bn" | "dynamo", prior weights; None = the library's automatic choice
#         [, {"module": settings of dfkd_deploy.synthesis.proxy_stats, "recipe": other recipe keys}])
ARMS = {
    "bn-kept": ("bn", None),
    "bn-free/adv": ("dynamo", ZERO, {"recipe": ADV}),
    "bn-free/dafl": ("dynamo", {**ZERO, "entropy": 5.0, "activation": 0.1}, {"recipe": ADV}),
    "bn-free/image": ("dynamo", IMAGE, {"recipe": ADV}),
    "bn-free/all": ("dynamo", {**IMAGE, "entropy": 5.0, "activation": 0.1}, {"recipe": ADV}),
    # stand-in statistics on 1/f colour noise (dfkd_deploy.synthesis.proxy_stats), on top of TV + L2
    "bn-free/proxy": ("dynamo", PROXY, {"recipe": ADV}),
    "bn-free/proxy-all": ("dynamo", PROXY, {"module": {"PROXY_LAYER_FRACTION": 1.0}, "recipe": ADV}),
    "bn-free/proxy10": ("dynamo", {**PROXY, "proxy": 10.0}, {"recipe": ADV}),
    # with the proxy on, the class and adversarial weights (the BN term no longer holds the images)
    "bn-free/proxy-oh2": ("dynamo", PROXY, {"recipe": {**ADV, "synthesis.oh": 2.0}}),
    "bn-free/proxy-adv0.3": ("dynamo", PROXY, {"recipe": {"synthesis.adv_bn_free": 0.3}}),   # the BN-free default
    "bn-free/image-adv0.3": ("dynamo", IMAGE, {"recipe": {"synthesis.adv_bn_free": 0.3}}),
    "bn-free/proxy-adv0": ("dynamo", PROXY, {"recipe": {"synthesis.adv_bn_free": 0.0}}),
    # stronger views in the inversion loss (synthesis.augment): a random zoom, Plug-In Inversion's
    # colour shift, both; on top of the BN-free default
    "bn-free/proxy-adv0.3-zoom0.5": ("dynamo", PROXY, {"recipe": {"synthesis.adv_bn_free": 0.3,
                                                                  "synthesis.augment.zoom": 0.5}}),
    "bn-free/proxy-adv0.3-color1": ("dynamo", PROXY, {"recipe": {"synthesis.adv_bn_free": 0.3,
                                                                 "synthesis.augment.color_shift": 1.0}}),
    "bn-free/proxy-adv0.3-zoom-color": ("dynamo", PROXY, {"recipe": {"synthesis.adv_bn_free": 0.3,
                                                                     "synthesis.augment.zoom": 0.5,
                                                                     "synthesis.augment.color_shift": 1.0}}),
}


def pool_properties(bn_teacher, pool) -> dict:
    """BN-statistics loss (batches of 64, mean) and predicted-class entropy of a pool, both
    measured with the BN-kept teacher."""
    import numpy as np
    import torch

    from dfkd_deploy.synthesis.losses import BNStatistics

    stats = BNStatistics(bn_teacher.module)
    norm = bn_teacher.normalizer()
    losses, preds = [], []
    try:
        with torch.no_grad():
            for start in range(0, len(pool), 64):
                x = norm(pool.get(np.arange(start, min(start + 64, len(pool)))))
                with stats.capture():
                    logits = bn_teacher.module(x)
                losses.append(float(stats.loss()))
                preds.append(logits.argmax(1))
    finally:
        stats.remove()
    hist = torch.bincount(torch.cat(preds), minlength=bn_teacher.spec.num_classes).float()
    p = hist / hist.sum()
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    return {"pool_bn_loss_vs_real_statistics": float(np.mean(losses)),
            "pool_class_entropy": entropy, "pool_class_entropy_max": math.log(len(p)),
            "pool_class_histogram": hist.int().tolist()}


def dynamo_teacher(workdir: Path):
    from dfkd_deploy import stages
    from dfkd_deploy import load_recipe
    from dfkd_deploy import load_teacher

    recipe = load_recipe(protocol.REPO / "recipes" / "cifar-resnet20.yaml", {"teacher.arch": "cifar_resnet56"})
    path = stages.export_teacher(protocol.TEACHER, recipe, workdir / "resnet56_dynamo.onnx", exporter="dynamo")
    return load_teacher(path), path


def merge(path: Path, key: str, value) -> dict:
    """Read-modify-write one entry of the results JSON under a lock (arms may run in parallel)."""
    from dfkd_deploy.core.io import write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(Path(tempfile.gettempdir()) / f"{path.name}.lock", "w") as lock:   # not in the repo
        fcntl.flock(lock, fcntl.LOCK_EX)
        report = json.loads(path.read_text()) if path.is_file() else {}
        report.setdefault("arms", {})
        if key == "arms":
            report["arms"].update(value)
        else:
            report[key] = value
        write_json(path, report)
    return report


def table(report: dict) -> str:
    arms = report.get("arms", {})
    lines = ["| arm | teacher | priors (tv, l2, entropy, activation, proxy) | adversarial weight | student top-1 | agreement | synthesis s "
             "| pool BN loss (BN-kept teacher) | pool class entropy |", "|---|---|---|---|---|---|---|---|---|"]
    for name in ARMS:
        if name not in arms:
            continue
        r = arms[name]
        pr = r["priors_used"]
        lines.append(f"| {name} | {r['teacher']} (BN layers {r['teacher_bn_layers']}) | "
                     f"{pr['tv']:g}, {pr['l2']:g}, {pr['entropy']:g}, {pr['activation']:g}, {pr.get('proxy', 0):g}"
                     f"{' (all layers)' if r.get('proxy_settings') else ''}"
                     f"{''.join(f', {k.split(chr(46))[-1]} {v:g}' for k, v in _adv_keys(r.get('recipe_keys', {})).items() if k != 'synthesis.adv_bn_free')} | "
                     f"{_adv_keys(r.get('recipe_keys', {})).get('synthesis.adv_bn_free', 1.33):g} | "
                     f"{r['student_top1']:.4f} | {r['teacher_agreement']:.4f} | {r['synthesis_seconds']:.0f} | "
                     f"{r['pool_bn_loss_vs_real_statistics']:.2f} | {r['pool_class_entropy']:.3f} |")
    free = {k: v for k, v in arms.items() if k.startswith("bn-free/")}
    if free:
        best = max(free, key=lambda k: free[k]["student_top1"])
        lines += ["", f"- best BN-free arm by student top-1: {best} ({free[best]['student_top1']:.4f})"]
    if "bn-kept" in arms:
        lines.append(f"- BN-kept teacher: {arms['bn-kept']['student_top1']:.4f}")
    lines.append(f"- teacher top-1 {report.get('teacher_top1', float('nan')):.4f} (BN-kept), "
                 f"{report.get('dynamo_teacher_top1', float('nan')):.4f} (dynamo export); one seed per arm")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    ap.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE",
                    help="override one entry of synthesis_speed's small settings")
    ap.add_argument("--out", type=Path, default=RESULTS / "bn_free_priors.json")
    args = ap.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        print(f"error: unknown arm(s) {unknown}; known: {', '.join(ARMS)}", file=sys.stderr)
        return 2

    import torch

    from dfkd_deploy.core.io import write_text
    from dfkd_deploy.recipe import TeacherOptions
    from dfkd_deploy.synthesis.priors import resolve_priors
    from dfkd_deploy import load_teacher
    from dfkd_deploy.validate.data import load_eval_data, to_pixels
    from dfkd_deploy.validate.metrics import predict, top1_accuracy

    s = protocol.chosen_settings("small", args.setting)
    if s is None or protocol.shared_material_missing():
        return 2

    started = time.perf_counter()
    bn_teacher = load_teacher(protocol.TEACHER, TeacherOptions(arch="cifar_resnet56"))
    data = load_eval_data(protocol.TEST_SET, input_shape=bn_teacher.spec.input_shape)
    pixels, labels = to_pixels(data.images), torch.as_tensor(data.labels)
    eval_idx = protocol.eval_subset(len(labels), s["eval_images"])
    with tempfile.TemporaryDirectory(prefix="bn-free-priors-") as tmp:
        tmp = Path(tmp)
        teachers = {"bn": bn_teacher}
        if any(ARMS[a][0] == "dynamo" for a in arms):
            teachers["dynamo"], _ = dynamo_teacher(tmp)
        logits = {k: predict(t.module, pixels, normalizer=t.normalizer()) for k, t in teachers.items()}
        merge(args.out, "teacher_top1", top1_accuracy(logits["bn"], labels))
        if "dynamo" in teachers:
            merge(args.out, "dynamo_teacher_top1", top1_accuracy(logits["dynamo"], labels))
            merge(args.out, "dynamo_teacher_bn_layers", teachers["dynamo"].spec.bn_layers)
        merge(args.out, "settings", s)
        merge(args.out, "machine", protocol.machine())
        from dfkd_deploy.synthesis import proxy_stats

        for arm in arms:
            which, priors, *more = ARMS[arm]
            more = more[0] if more else {}
            module_settings, recipe_keys = more.get("module", {}), more.get("recipe", {})
            saved = {k: getattr(proxy_stats, k) for k in module_settings}
            for k, v in module_settings.items():
                setattr(proxy_stats, k, v)
            teacher = teachers[which]
            extra = {} if priors is None else {f"synthesis.priors.{k}": v for k, v in priors.items()}
            extra.update(recipe_keys)
            props = {}

            def after(distiller, props=props):
                props.update(pool_properties(bn_teacher, distiller.pool))

            try:
                row = protocol.run_method("fast", teacher, s, pixels, labels, logits[which], eval_idx, tmp,
                                          extra=extra, name=arm.replace("/", "-"), after=after)
            finally:
                for k, v in saved.items():
                    setattr(proxy_stats, k, v)
            row.update(props, teacher="dynamo export" if which == "dynamo" else "BN kept",
                       proxy_settings=module_settings, recipe_keys=recipe_keys,
                       teacher_bn_layers=teacher.spec.bn_layers,
                       priors_used=resolve_priors(_priors(priors), teacher.spec.bn_layers > 0))
            report = merge(args.out, "arms", {arm: row})
            print(f"{arm}: student {row['student_top1']:.4f}, agreement {row['teacher_agreement']:.4f}, "
                  f"pool BN loss {row['pool_bn_loss_vs_real_statistics']:.2f}, "
                  f"class entropy {row['pool_class_entropy']:.3f}", flush=True)
    report = merge(args.out, "command", "python benchmarks/bn_free_priors.py"
                   + "".join(f" --setting {x}" for x in args.setting))
    write_text(args.out.with_suffix(".md"), table(report))
    print(table(report))
    print(f"wall {time.perf_counter() - started:.0f} s", flush=True)
    return 0


def _adv_keys(keys: dict) -> dict:
    """An arm's recipe keys as the table shows them: synthesis.adv (what the first arms ran with,
    before synthesis.adv_bn_free existed) as the adversarial weight it was."""
    return {("synthesis.adv_bn_free" if k == "synthesis.adv" else k): v for k, v in keys.items()}


def _priors(priors):
    from dfkd_deploy.recipe import PriorOptions

    return PriorOptions() if priors is None else PriorOptions(**priors)


if __name__ == "__main__":
    sys.exit(main())
