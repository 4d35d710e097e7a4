"""ImageNet-1k end to end on CPU at a real budget (issue 16): ``compress`` the ONNX model zoo's int8
MobileNetV2-12 (224 px, 1000 classes) with ``recipes/imagenet.yaml`` and ``--budget``, evaluated on
``../shared/data/imagenet-sample-224`` (1000 images, one per class), and the figures that matter
at this size: top-1 and top-5 of teacher and student, synthesis and KD images/s at 224 px, peak
memory, the plan the budget chose and the time it used, every artifact present.

    python benchmarks/imagenet_budget.py --shared ../shared --minutes 60     # runs it (about an hour)
    python benchmarks/imagenet_budget.py --collect RUN --time-log LOG        # a run made by hand

(``LOG``: the output of ``/usr/bin/time -v dfkd-deploy compress ...``, for the peak resident
memory; without it the peak of this process is used.) Writes
benchmarks/results/imagenet_int8_budget.json and the run's report as ..._report.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TEACHER = "teachers/imagenet-mobilenetv2-12-int8.onnx"
DATA = "data/imagenet-sample-224"
ARTIFACTS = ("student.pt", "student.onnx", "student.int8.onnx", "report.json", "report.md", "report.html",
             "bundle/manifest.json")


def command(minutes: float, out: str) -> str:
    return (f"dfkd-deploy compress ../shared/{TEACHER} --recipe recipes/imagenet.yaml --budget {minutes:g}m "
            f"--eval-data ../shared/{DATA} --out {out}")


def peak_rss_kb(time_log: Path | None) -> int | None:
    if time_log is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_log.read_text(errors="replace"))
    return int(m.group(1)) if m else None


def summarise(run: Path, cmd: str, peak_kb: int | None, loadavg, when: str = "at the end") -> dict:
    r = json.loads((run / "report.json").read_text())
    syn, dist, st, te = r["synthesis"], r["distillation"], r["student"], r["teacher"]
    budget = r.get("budget") or {}
    plan = budget.get("plan") or {}
    import yaml

    resolved = yaml.safe_load((run / "recipe.resolved.yaml").read_text())
    kd_images = plan.get("kd_steps_total", 0) * resolved["distillation"]["batch_size"]
    return {
        "what": __doc__.split("\n")[0],
        "command": cmd,
        "machine": f"{os.cpu_count()} CPU cores; load average {loadavg[0]:.2f} / {loadavg[1]:.2f} / {loadavg[2]:.2f} "
                   f"(1/5/15 min) {when}",
        "budget": {k: budget.get(k) for k in ("requested_s", "used_s", "used_fraction", "notes")},
        "plan": plan,
        "teacher_top1": te.get("accuracy"), "teacher_top5": te.get("top5"),
        "student_arch": st.get("arch"), "student_params": st.get("params"), "teacher_params": st.get("teacher_params"),
        "student_top1": st.get("accuracy"), "student_top5": st.get("top5"),
        "student_onnx_top1": st.get("onnx_accuracy"), "student_onnx_top5": st.get("onnx_top5"),
        "eval_images": (r.get("eval_data") or {}).get("images"),
        "synthesis_images": syn.get("images"), "synthesis_seconds": syn.get("seconds"),
        "synthesis_images_per_second_224px": syn.get("images_per_second"),
        "kd_images": kd_images, "kd_seconds": dist.get("seconds"),
        "kd_images_per_second_224px": round(kd_images / dist["seconds"], 3) if dist.get("seconds") else None,
        "kd_note": "KD images = planned KD steps x distillation.batch_size; kd_seconds is the distillation "
                   "stage's own time (report.json distillation.seconds)",
        "wall_seconds": r.get("wall_seconds"),
        "peak_rss_kb": peak_kb,
        "artifacts": {a: (run / a).exists() for a in ARTIFACTS},
        "latency_ms": {k: (r.get("latency") or {}).get(k) for k in ("teacher", "student", "student_int8")},
        "size_warnings": st.get("warnings"),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--collect", type=Path, help="summarise this finished run instead of running one")
    ap.add_argument("--time-log", type=Path, help="/usr/bin/time -v output of the run (peak memory)")
    ap.add_argument("--command", help="the command the collected run was made with (recorded as given)")
    ap.add_argument("--note", help="what else the reader should know about the run (recorded as given)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "imagenet_int8_budget.json"))
    args = ap.parse_args(argv)
    if args.collect:
        run, cmd = args.collect, args.command or command(args.minutes, str(args.collect))
    else:
        from dfkd_deploy import compress, load_recipe

        run = REPO / "runs" / f"imagenet-int8-{args.minutes:g}m"
        if run.exists():
            shutil.rmtree(run)
        shared = Path(args.shared)
        recipe = load_recipe(REPO / "recipes" / "imagenet.yaml", {"budget": f"{args.minutes:g}m"})
        t0 = time.time()
        compress(shared / TEACHER, recipe, run, eval_data=shared / DATA, show_progress=False)
        print(f"compress took {time.time() - t0:.0f} s", flush=True)
        cmd = command(args.minutes, "RUN")
    record = summarise(run, cmd, peak_rss_kb(args.time_log) if args.collect else peak_rss_kb(None), os.getloadavg(),
                       "when collected, not during the run" if args.collect else "at the end")
    if args.note:
        record["note"] = args.note
    from dfkd_deploy.core.io import write_json

    out = Path(args.out)
    write_json(out, record)
    shutil.copyfile(run / "report.json", out.with_name(out.stem + "_report.json"))
    print(json.dumps({k: record[k] for k in ("teacher_top1", "teacher_top5", "student_top1", "student_top5",
                                             "synthesis_images_per_second_224px", "kd_images_per_second_224px",
                                             "peak_rss_kb", "budget")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
