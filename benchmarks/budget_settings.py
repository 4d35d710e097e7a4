"""KD settings for budgeted runs, at equal wall time (issue 13 item 4): budgeted ``compress`` runs
of the shared ResNet-56 (state_dict) into a student of ResNet-20 size, one recipe change per
variant against the time_to_accuracy run with the same init and budget (same code, same machine,
run one after the other), real top-1 of the student ONNX on all 10,000 CIFAR-10 test images.

    python benchmarks/budget_settings.py --shared ../shared --init prune --minutes 10 --variants synth_batch_64

Variants (recipe overrides), each against ``baseline`` (no override) run by the same call, so a
comparison is side by side on one machine rather than against a table row from another host:
- ``baseline``: the time_to_accuracy recipe as it is.
- ``synth_batch_64``: synthesis rounds of 64 images instead of 256: four times as many generator
  (meta) updates for the same number of images, which FastDFKD's few-step synthesis relies on.
  Series 9 ran before 64 became the default for a budgeted depth student of a BN-folded teacher
  (``synthesis.batch_size: auto``); from then on its ``baseline`` has 64 and ``synth_batch_256``
  is the old setting.
- ``share_20`` / ``share_30`` / ``share_70``: 20% / 30% / 70% of the training time synthesizes
  (``distillation.synthesis_share: auto``: 50%, or 30% for a depth student of a BN-folded teacher).
- ``fast2``: Fast-2 (two generator steps per batch) instead of Fast-5: cheaper rounds, more of them.
- ``cached_logits``: the teacher labels each pool image once (un-augmented) instead of every
  augmented KD batch: cheaper KD steps, more of them.
- ``mixup`` / ``cutmix``: KD batches mixed after crop/flip, the teacher labels the mixed images.
  Series 1-4 ran before cutmix became the budgeted default (``distillation.mix: auto``); from
  series 5 on ``baseline`` mixes with cutmix and ``no_mix`` is the old setting.
- ``share_70_cutmix``: both winners of series 2-3 together.
- ``lr_scale_001`` / ``lr_scale_003`` / ``lr_scale_03`` / ``lr_scale_1``: a derived student's KD
  learning rate at 0.01 / 0.03 / 0.3 / 1.0 of a scratch student's (``student.derived.lr_scale``; ``auto`` resolves to 0.1, or to
  0.03 for a depth student of a BN-folded teacher after series 6).
- ``features_2``: feature matching (``distillation.features``) at weight 2: the student's stage-end
  feature maps matched to the teacher's where their shapes agree (a depth student's three stages).
  Series 7 ran before it became the default for a depth student of a BN-folded teacher
  (``distillation.features: auto``); from then on ``baseline`` has it there and ``no_features`` is
  the old setting.
``--teacher resnet56/onnx_dynamo`` runs the same on the BN-fused dynamo export of the teacher.
Records belong to a ``--series`` (one sitting on one machine; the default is the file's last
series): each series has its own ``baseline`` (run first when the call does not name it), and a
variant is compared only with the baseline of its own series, since the same host can run 40%
slower from one sitting to the next. Resumable: results/budget_settings.json, finished
(series, init, minutes, variant) records are skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
VARIANTS = {"baseline": {}, "synth_batch_64": {"synthesis.batch_size": 64}, "synth_batch_256": {"synthesis.batch_size": 256},
            "share_20": {"distillation.synthesis_share": 0.2}, "share_30": {"distillation.synthesis_share": 0.3},
            "share_70": {"distillation.synthesis_share": 0.7},
            "fast2": {"synthesis.g_steps": 2}, "cached_logits": {"distillation.teacher_logits": "cached"},
            "mixup": {"distillation.mix": "mixup"}, "cutmix": {"distillation.mix": "cutmix"},
            "no_mix": {"distillation.mix": "none"},
            "share_70_cutmix": {"distillation.synthesis_share": 0.7, "distillation.mix": "cutmix"},
            "lr_scale_001": {"student.derived.lr_scale": 0.01}, "lr_scale_003": {"student.derived.lr_scale": 0.03}, "lr_scale_03": {"student.derived.lr_scale": 0.3},
            "lr_scale_1": {"student.derived.lr_scale": 1.0},
            "features_2": {"distillation.features": 2.0}, "no_features": {"distillation.features": 0.0}}
TEACHERS = ("resnet56/state_dict", "resnet56/onnx_dynamo")


def main(argv=None) -> int:
    import time_to_accuracy as tta
    from dfkd_deploy import compress, load_recipe
    from dfkd_deploy.core.io import write_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--teacher", default=TEACHERS[0], choices=TEACHERS, help="the shared ResNet-56 in which form")
    ap.add_argument("--init", default="prune", choices=tta.INITS)
    ap.add_argument("--minutes", type=int, default=10)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--series", type=int, default=None,
                    help="which series the runs belong to (default: the file's last series, 1 for a new file)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "budget_settings.json"))
    ap.add_argument("--work", default=str(REPO / "runs" / "budget_settings"))
    args = ap.parse_args(argv)
    shared, work, out = Path(args.shared), Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    t = tta.teachers(shared, work)[args.teacher]
    if t.form == "onnx_dynamo":
        tta.ensure_dynamo(shared, work)
    runs = json.loads(out.read_text())["runs"] if out.is_file() else []
    names = args.variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    series = args.series if args.series is not None else max((r.get("series", 1) for r in runs), default=1)

    def done(name):
        return any((r.get("series", 1), r["teacher_form"], r["init"], r["budget_min"], r["variant"])
                   == (series, t.form, args.init, args.minutes, name) for r in runs)

    if "baseline" not in names and not done("baseline"):
        names.insert(0, "baseline")
    for name in names:
        if done(name):
            continue
        base = tta.recipe_for(t, args.init, args.minutes).model_dump(mode="json")
        recipe = load_recipe(None, {**_flat(base), **VARIANTS[name]})
        run_dir = work / f"{t.form}-{args.init}-{args.minutes}m-{name}"
        if run_dir.exists():
            import shutil
            shutil.rmtree(run_dir)
        print(f"run {args.init} {args.minutes} min {name} ...", flush=True)
        t0 = time.time()
        r = compress(t.path, recipe, run_dir, eval_data=t.eval_data, show_progress=False).report
        plan = (r.get("budget") or {}).get("plan") or {}
        runs.append({"series": series, "teacher": t.name, "teacher_form": t.form, "init": args.init, "budget_min": args.minutes,
                     "variant": name, "overrides": VARIANTS[name], "wall_min": round((time.time() - t0) / 60, 3),
                     "top1": r["student"].get("onnx_accuracy"), "params": r["student"]["params"], "plan": plan,
                     "final": (r.get("distillation") or {}).get("final"), **tta.as_run(r, recipe),
                     "loadavg": [round(v, 2) for v in os.getloadavg()]})
        write_json(out, {"setting": "budgeted compress, shared ResNet-56 (teacher_form: state_dict, or its "
                                    "BN-fused dynamo ONNX export), CIFAR-10 test set",
                         "baseline": "the baseline variant of the same series, init and budget (series 1's "
                                     "synth_batch_64 ran before baseline existed: time_to_accuracy.json's row)",
                         "machine": f"{os.cpu_count()} CPU cores", "runs": runs})
        print(json.dumps({k: runs[-1][k] for k in ("series", "variant", "wall_min", "top1")}), flush=True)
    for line in summary(runs, series, args.init, args.minutes, t.form):
        print(line)
    return 0


def summary(runs: list[dict], series: int, init: str, minutes: int, form: str = "state_dict") -> list[str]:
    """One line per variant of the series: top-1 and KD steps against the series' baseline."""
    mine = [r for r in runs if (r.get("series", 1), r["teacher_form"], r["init"], r["budget_min"])
            == (series, form, init, minutes)]
    base = next((r for r in mine if r["variant"] == "baseline"), None)
    lines = [f"series {series}, {form}, {init}, {minutes} min:"]
    for r in mine:
        delta = "" if base is None or r is base else f" ({100 * (r['top1'] - base['top1']):+.1f} points)"
        if r.get("kd_steps_run"):
            kd = f"{r['kd_steps_run']} KD steps"
        elif r.get("kd_s"):   # recorded before the steps run were counted
            kd = f"{r['kd_s']:.0f} s of KD"
        else:                 # older still: the plan's counts after its last re-tune
            kd = f"{r['plan'].get('kd_steps_total')} KD steps as last planned"
        rounds = r.get("rounds_run") or r["plan"].get("rounds")
        lines.append(f"  {r['variant']:<15} top-1 {100 * r['top1']:.1f}%{delta}, {kd}, {rounds} rounds, "
                     f"synthesis {100 * share_as_run(r):.0f}% of the training time, {r['wall_min']:.1f} min")
    return lines


def share_as_run(r: dict) -> float:
    """Synthesis's share of the training time the run spent: its synthesis and KD seconds where the
    record has them; older records, at the costs its last re-tune measured times the plan's counts
    (the plan's ``synthesis_share`` is what it aimed at: a re-tune can only give freed time to KD
    steps while an epoch has one round)."""
    if r.get("synthesis_s") and r.get("kd_s"):
        return r["synthesis_s"] / (r["synthesis_s"] + r["kd_s"])
    plan = r["plan"]
    synth = plan["rounds"] * plan["costs"]["synth_round_s"]
    return synth / (synth + plan["kd_steps_total"] * plan["costs"]["kd_step_s"])


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in ("target",):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


if __name__ == "__main__":
    sys.exit(main())
