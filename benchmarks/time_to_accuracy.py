"""Real top-1 against wall-clock minutes: budgeted ``compress`` runs (``--budget``) on 2 CPU cores,
for students from scratch, from the teacher's blocks (depth) and from the pruned teacher (prune).

The table (issue 13, about 4.5 CPU-hours in all; run it in the background, it resumes):
1. the shared ResNet-56 as a state_dict (BN kept): scratch ResNet-20, depth ResNet-20, prune to
   params=0.3 (<= 0.27M params), at 10 and 30 minutes;
2. the best of those inits (top-1 at 30 minutes) at 60 minutes on the state_dict and on its dynamo
   ONNX export (BN fused), and at 30 minutes on the dynamo export;
3. the other real teachers in ../shared (MLPerf-Tiny ResNet-8 ONNX, BN folded, batch fixed at 16;
   the Fashion-MNIST MLP) and the digits teacher, at 10 and 30 minutes, every init that applies.
Top-1 is the exported student ONNX on every image of the teacher's real test set.

    python benchmarks/time_to_accuracy.py                 # the table -> results/time_to_accuracy.json
    python benchmarks/time_to_accuracy.py --smoke         # digits teacher, 2 minutes: a check of the script
    python benchmarks/time_to_accuracy.py --only resnet8/onnx_folded --budgets 10   # some rows now
    python benchmarks/time_to_accuracy.py --only fashion_mlp/onnx --budgets 30 --inits prune

Resumable: the JSON is read first, finished records (teacher, teacher_form, init, budget_min) are
skipped, each new record is appended and the file rewritten atomically; the PNG (top-1 against
minutes, one line per init, one panel per teacher form) is redrawn from all records.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
INITS = ("scratch", "depth", "prune")
CIFAR_MLPERF = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2023, 0.1994, 0.2010]}


@dataclass(frozen=True)
class Teacher:
    name: str
    form: str                     # state_dict | onnx_bn | onnx_dynamo | onnx_folded
    path: Path
    eval_data: Path
    teacher_options: dict = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)      # overrides of the recipe defaults
    student_arch: str | None = None                 # scratch/depth student (None: the default choice)
    prune_target: str = "params=0.3"


def teachers(shared: Path, work: Path) -> dict[str, Teacher]:
    from dfkd_deploy.demo import demo_recipe, ensure_teacher

    cifar = shared / "data" / "cifar10-test-jpeg.npz"
    r56 = shared / "teachers" / "cifar10-resnet56.th"
    digits_teacher, digits_test = ensure_teacher()
    demo = demo_recipe().model_dump(mode="json")
    digits_recipe = {"synthesis": demo["synthesis"], "distillation": {k: demo["distillation"][k] for k in
                                                                        ("batch_size", "lr", "temperature")}}
    out = {
        "resnet56/state_dict": Teacher("cifar10-resnet56", "state_dict", r56, cifar, {"arch": "cifar_resnet56"},
                                       student_arch="cifar_resnet20"),
        "resnet56/onnx_dynamo": Teacher("cifar10-resnet56", "onnx_dynamo", work / "cifar10-resnet56-dynamo.onnx",
                                        cifar, student_arch="cifar_resnet20"),
        "resnet8/onnx_folded": Teacher("cifar10-resnet8-mlperftiny", "onnx_folded",
                                       shared / "teachers" / "cifar10-resnet8-mlperftiny.onnx", cifar, CIFAR_MLPERF),
        "fashion_mlp/onnx": Teacher("fashion-mnist-mlp", "onnx_bn", shared / "teachers" / "fashion-mnist-mlp.onnx",
                                    shared / "data" / "fashion-mnist-test.npz", {"mean": [0.5], "std": [0.5]},
                                    {"synthesis": {"augment": {"crop_padding": 2, "flip": False}}}),
        "digits/onnx_bn": Teacher("digits", "onnx_bn", digits_teacher, digits_test, recipe=digits_recipe),
    }
    return out


def applicable(t: Teacher, init: str) -> str | None:
    """None when ``init`` applies to the teacher, else why not."""
    if init == "depth" and t.name != "cifar10-resnet56":
        return "depth needs a residual zoo teacher: a state_dict, or an ONNX graph that computes one"
    return None


def table(results: list[dict], phase2_init: str | None = None) -> list[tuple[str, str, int]]:
    """(teacher key, init, budget minutes) of the full table; phase 2 follows phase 1's winner, or
    ``phase2_init`` while phase 1 is not complete (docs/benchmarks.md says which rows ran so)."""
    # The derived inits first at 30 minutes: they are the candidates for the 30-minute target.
    rows = [("resnet56/state_dict", init, 10) for init in INITS]
    rows += [("resnet56/state_dict", init, 30) for init in ("prune", "depth", "scratch")]
    best = _best_init(results, "cifar10-resnet56", "state_dict", 30) or phase2_init
    if best:
        # depth applies to the dynamo file too: students/recognise.py matches its graph to the zoo
        # ResNet-56 (the dynamo prune row from before that stays in the results)
        rows += [("resnet56/state_dict", best, 60), ("resnet56/onnx_dynamo", best, 30),
                 ("resnet56/onnx_dynamo", best, 60)]
    # Without BN statistics the winner on the state_dict need not win: on the BN-folded ResNet-8 a
    # scratch student with BN beat the pruned BN-free copy (32.1% against 10.0% at 30 minutes)
    rows += [("resnet56/onnx_dynamo", "scratch", m) for m in (60, 30)]
    rows += [(key, init, m) for key in ("resnet8/onnx_folded", "fashion_mlp/onnx", "digits/onnx_bn")
             for m in (10, 30) for init in ("scratch", "prune")]
    return rows


def smoke_table() -> list[tuple[str, str, int]]:
    return [("digits/onnx_bn", init, 2) for init in INITS]


def _best_init(results, teacher, form, minutes) -> str | None:
    done = [r for r in results if (r["teacher"], r["teacher_form"], r["budget_min"]) == (teacher, form, minutes)]
    if len({r["init"] for r in done}) < len(INITS):
        return None
    return max(done, key=lambda r: r["top1"] if r["top1"] is not None else -1)["init"]


def recipe_for(t: Teacher, init: str, minutes: int, overrides: dict | None = None):
    from dfkd_deploy import load_recipe

    over = {"teacher": t.teacher_options, **t.recipe}
    student = {"init": init}
    if init == "prune":
        student["target"] = t.prune_target
    elif t.student_arch:
        student["arch"] = t.student_arch
    over["student"] = student
    over["budget"] = f"{minutes}m"
    flat = {}

    def walk(prefix, node):
        for k, v in node.items():
            if isinstance(v, dict) and v:
                walk(f"{prefix}{k}.", v)
            else:
                flat[f"{prefix}{k}"] = v
    walk("", over)
    return load_recipe(None, {**flat, **(overrides or {})})


def run_one(t: Teacher, init: str, minutes: int, work: Path, overrides: dict | None = None) -> dict:
    from dfkd_deploy import compress

    tag = "".join(f"-{k.rsplit('.', 1)[-1]}{v}" for k, v in (overrides or {}).items())
    out = work / f"{t.name}-{t.form}-{init}-{minutes}m{tag}"
    if out.exists():
        import shutil
        shutil.rmtree(out)       # an unfinished run of an earlier session: start it again
    from dfkd_deploy import DfkdError

    recipe = recipe_for(t, init, minutes, overrides)
    # the KD defaults changed over the table's sessions (records without this key: mix none, share 0.5)
    kd = {"mix": recipe.distillation.mix, "synthesis_share": recipe.distillation.synthesis_share}
    if overrides:
        kd["overrides"] = dict(overrides)
    t0 = time.time()
    try:
        result = compress(t.path, recipe, out, eval_data=t.eval_data, show_progress=False)
    except DfkdError as exc:   # e.g. a budget too short for this init: the table says so
        return {"teacher": t.name, "teacher_form": t.form, "init": init, "budget_min": minutes,
                "wall_min": round((time.time() - t0) / 60, 3), "top1": None, "error": str(exc).splitlines()[0].replace(f"{REPO}/", ""),
                "kd_settings": kd, "loadavg": [round(v, 2) for v in os.getloadavg()]}
    wall = time.time() - t0
    r = result.report
    kd["resolved"] = resolved_kd(out)
    lat = (r.get("latency") or {}).get("student") or {}
    return {"teacher": t.name, "teacher_form": t.form, "init": init, "budget_min": minutes,
            "wall_min": round(wall / 60, 3), "top1": r["student"].get("onnx_accuracy", r["student"].get("accuracy")),
            "teacher_top1": r["teacher"].get("accuracy"), "params": r["student"]["params"],
            "teacher_params": r["student"].get("teacher_params"), "student_arch": r["student"]["arch"],
            "latency_b32_ms": lat.get("batch_32_ms"), "latency_b1_ms": lat.get("batch_1_ms"),
            "budget_used_s": (r.get("budget") or {}).get("used_s"), "plan": (r.get("budget") or {}).get("plan"),
            "warnings": r["student"].get("warnings"), "eval_images": (r.get("eval_data") or {}).get("images"),
            "budget_notes": (r.get("budget") or {}).get("notes"), "kd_settings": kd, **as_run(r, recipe),
            "loadavg": [round(v, 2) for v in os.getloadavg()]}


def as_run(report: dict, recipe) -> dict:
    """What the run did, from its report: synthesis rounds and KD steps run, and the seconds of
    each (a re-tuned plan's counts hold only for the epochs after its last re-tune)."""
    s, d = report.get("synthesis") or {}, report.get("distillation") or {}
    images, batch = s.get("images"), s.get("batch_size", recipe.synthesis.batch_size)   # resolved by the run
    return {"rounds_run": images // batch if images else None, "kd_steps_run": d.get("kd_steps"),
            "synthesis_s": s.get("seconds"), "kd_s": d.get("seconds")}


def resolved_kd(run_dir: Path) -> dict | None:
    """The KD settings the run trained with, its ``auto`` choices made (recipe.resolved.yaml)."""
    import yaml

    f = run_dir / "recipe.resolved.yaml"
    if not f.is_file():
        return None
    r = yaml.safe_load(f.read_text(encoding="utf-8"))
    d = r.get("distillation", {})
    return {"mix": d.get("mix"), "features": d.get("features"), "attention": d.get("attention"),
            "lr_scale": r.get("student", {}).get("derived", {}).get("lr_scale"),
            "synthesis_share": d.get("synthesis_share")}


def load_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return json.loads(path.read_text(encoding="utf-8")).get("runs", [])


def load_superseded(path: Path) -> list[dict]:
    """Records of rows run again with later defaults (``--rerun``): kept, out of the table."""
    if not path.is_file():
        return []
    return json.loads(path.read_text(encoding="utf-8")).get("superseded", [])


def save_results(path: Path, runs: list[dict], setting: str, superseded: list[dict] | None = None) -> None:
    from dfkd_deploy.core.io import write_json

    body = {"setting": setting, "machine": f"{os.cpu_count()} CPU cores", "runs": runs}
    if superseded:
        body["superseded"] = superseded
    write_json(path, body)


def plot(path: Path, runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["teacher"], r["teacher_form"]) for r in runs})
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.5 * max(1, len(panels)), 3.6), squeeze=False)
    for ax, (teacher, form) in zip(axes[0], panels):
        mine = [r for r in runs if (r["teacher"], r["teacher_form"]) == (teacher, form)]
        for init in INITS:
            pts = sorted((r["wall_min"], 100 * r["top1"]) for r in mine if r["init"] == init and r["top1"] is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=init)
        top = [r["teacher_top1"] for r in mine if r.get("teacher_top1") is not None]
        if top:
            ax.axhline(100 * top[0], color="grey", linestyle="--", linewidth=1, label="teacher")
        ax.set_title(f"{teacher} ({form})", fontsize=9)
        ax.set_xlabel("wall-clock minutes (2 CPU cores)")
        ax.set_ylabel("student top-1 (%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(runs: list[dict]) -> str:
    """The table as markdown (results/time_to_accuracy.md), one row per run in the order run."""
    # The runs span sessions on 2-core hosts of different speed: the calibrated synthesis round (teacher
    # and student in it) says how fast each run's machine was (ResNet-56 -> depth ResNet-20: 31.1 s in
    # the 10-minute run, 11.8 s in the 30-minute one, 7.8 s in the 60-minute one).
    lines = ["| teacher | form | init | budget | wall | student top-1 | params | ORT b32 ms | synthesis round s | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        round_s = ((r.get("plan") or {}).get("costs") or {}).get("synth_round_s")
        top1 = "-" if r.get("top1") is None else f"{100 * r['top1']:.1f}%"
        note = r.get("error") or "; ".join((r.get("warnings") or []) + (r.get("budget_notes") or []))
        lat, params = r.get("latency_b32_ms"), r.get("params")
        lines.append(f"| {r['teacher']} | {r['teacher_form']} | {r['init']} | {r['budget_min']} min | "
                     f"{r['wall_min']:.1f} min | {top1} | {'-' if params is None else f'{params:,}'} | "
                     f"{'-' if lat is None else f'{lat:.3g}'} | {'-' if round_s is None else f'{round_s:.1f}'} | "
                     f"{note[:160]} |")
    return "\n".join(lines) + "\n"


def grid(runs: list[dict]) -> str:
    """The full table of docs/benchmarks.md: student top-1 per teacher form, init and student size
    (rows) and budget (columns); each cell is the latest run of that key (a redone row replaces the
    earlier one), "-" where none ran. A student whose size changed between budgets (a default changed between
    sessions) gets a row of its own; latency is the row's latest run's."""
    budgets = sorted({r["budget_min"] for r in runs})
    cells: dict[tuple, dict] = {}
    for r in runs:
        cells[(r["teacher"], r["teacher_form"], r["init"], r["budget_min"])] = r
    rows: dict[tuple, dict[int, dict]] = {}
    for (t, f, i, m), r in cells.items():
        rows.setdefault((t, f, i, r.get("params") or 0), {})[m] = r
    lines = ["| teacher (form), its top-1 | init | params | ORT b32 ms | " + " | ".join(f"{m} min" for m in budgets)
             + " |", "|---|---|---|---|" + "---|" * len(budgets)]
    for key in sorted(rows, key=lambda k: (k[0], k[1], INITS.index(k[2]), -k[3])):
        t, f, i, params = key
        mine = [rows[key][m] for m in budgets if m in rows[key]]
        lat = mine[-1].get("latency_b32_ms")

        def cell(m):
            r = rows[key].get(m)
            if r is None:
                return "-"
            return "error" if r.get("top1") is None else f"{100 * r['top1']:.1f}%"
        top = next((r["teacher_top1"] for r in mine if r.get("teacher_top1") is not None), None)
        lines.append(f"| {t} ({f}){'' if top is None else f', {100 * top:.1f}%'} | {i} | {params:,} | {'-' if lat is None else f'{lat:.3g}'} | "
                     + " | ".join(cell(m) for m in budgets) + " |")
    return "\n".join(lines) + "\n"


def ensure_dynamo(shared: Path, work: Path) -> None:
    from dfkd_deploy import stages
    from dfkd_deploy import load_recipe

    out = work / "cifar10-resnet56-dynamo.onnx"
    if not out.is_file():
        stages.export_teacher(shared / "teachers" / "cifar10-resnet56.th",
                              load_recipe(None, {"teacher.arch": "cifar_resnet56"}), out, exporter="dynamo")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--smoke", action="store_true", help="digits teacher at 2 minutes: a check of the script")
    ap.add_argument("--out", help="results JSON (default results/time_to_accuracy.json, or _smoke.json)")
    ap.add_argument("--max-runs", type=int, default=None,
                    help="stop after this many new runs (the table resumes on the next call)")
    ap.add_argument("--work", default=str(REPO / "runs" / "time_to_accuracy"), help="run directories")
    ap.add_argument("--only", default=None, help="comma-separated teacher keys of the table to run now, e.g. "
                                                 "resnet8/onnx_folded,fashion_mlp/onnx (the rest stays to do)")
    ap.add_argument("--phase2-init", choices=INITS, default=None,
                    help="init of the 60-minute and dynamo rows while the 30-minute state_dict rows are not all "
                         "done (phase 1's winner decides once they are)")
    ap.add_argument("--redo-errors", action="store_true",
                    help="run again the rows (of --only/--budgets, if given) whose record is an error")
    ap.add_argument("--budgets", default=None, help="comma-separated budgets in minutes to run now, e.g. 10")
    ap.add_argument("--grid", action="store_true", help="print the full table (docs/benchmarks.md) from the results and stop")
    ap.add_argument("--inits", default=None, help=f"comma-separated inits to run now, of {', '.join(INITS)}")
    ap.add_argument("--rerun", action="store_true",
                    help="run again the rows of --only/--budgets/--inits that have a record (after a change of "
                         "defaults); each earlier record moves to 'superseded' in the JSON when its new run ends")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe override for every run of this call (repeatable), e.g. "
                         "distillation.attention=1000; needs --out, so that the table keeps the defaults")
    args = ap.parse_args(argv)
    if args.set and not args.out:
        ap.error("--set needs --out: the default results file is the table of the defaults")
    overrides = {}
    for item in args.set:
        k, sep, v = item.partition("=")
        if not sep:
            ap.error(f"--set {item!r}: expected KEY=VALUE")
        import yaml
        overrides[k] = yaml.safe_load(v)
    if args.rerun and not (args.only or args.budgets or args.inits):
        ap.error("--rerun needs --only, --budgets or --inits to say which rows")
    inits = set(args.inits.split(",")) if args.inits else None
    if inits and inits - set(INITS):
        ap.error(f"unknown init(s) {', '.join(sorted(inits - set(INITS)))}; choose from {', '.join(INITS)}")
    only = set(args.only.split(",")) if args.only else None
    budgets = {int(b) for b in args.budgets.split(",")} if args.budgets else None
    shared, work = Path(args.shared), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / ("time_to_accuracy_smoke.json" if args.smoke else
                                                     "time_to_accuracy.json")
    setting = "smoke: digits teacher, 2-minute budgets" if args.smoke else "issue 13 table"
    if overrides:
        setting += ", with " + ", ".join(f"{k}={v}" for k, v in overrides.items())
    runs = load_results(out)
    superseded = load_superseded(out)
    if args.grid:
        print(grid(runs), end="")
        return 0
    known = teachers(shared, work)
    key_of = {(t.name, t.form): k for k, t in known.items()}
    if args.redo_errors:   # e.g. after a fix: the rows that ended in an error are to do again
        runs = [r for r in runs if not r.get("error") or (only and key_of[r["teacher"], r["teacher_form"]] not in only)
                or (budgets and r["budget_min"] not in budgets)]

    def selected(r: dict) -> bool:
        return ((only is None or key_of.get((r["teacher"], r["teacher_form"])) in only)
                and (budgets is None or r["budget_min"] in budgets) and (inits is None or r["init"] in inits))

    rerun = [r for r in runs if selected(r)] if args.rerun else []
    done = {(r["teacher"], r["teacher_form"], r["init"], r["budget_min"]) for r in runs if not any(r is x for x in rerun)}
    new = 0
    while args.max_runs is None or new < args.max_runs:
        todo = [(k, i, m) for k, i, m in (smoke_table() if args.smoke else table(runs, args.phase2_init))
                if (known[k].name, known[k].form, i, m) not in done
                and (only is None or k in only) and (budgets is None or m in budgets)
                and (inits is None or i in inits)]
        if not todo:
            break
        key, init, minutes = todo[0]
        t = known[key]
        done.add((t.name, t.form, init, minutes))
        why = applicable(t, init)
        if why:
            print(f"skip {t.name} ({t.form}) {init}: {why}", flush=True)
            continue
        if t.form == "onnx_dynamo":
            ensure_dynamo(shared, work)
        print(f"run {t.name} ({t.form}) {init} {minutes} min ...", flush=True)
        record = run_one(t, init, minutes, work, overrides)
        old = [r for r in rerun if (r["teacher"], r["teacher_form"], r["init"], r["budget_min"])
               == (t.name, t.form, init, minutes)]
        runs = [r for r in runs if not any(r is x for x in old)] + [record]
        superseded += old
        new += 1
        save_results(out, runs, setting, superseded)          # atomic rewrite after every finished run
        plot(out.with_suffix(".png"), runs)
        out.with_suffix(".md").write_text(markdown(runs), encoding="utf-8")
        print(json.dumps({k: record.get(k) for k in ("teacher", "teacher_form", "init", "budget_min", "wall_min",
                                                      "top1", "params", "latency_b32_ms", "error")}), flush=True)
    if new == 0:
        print(f"nothing to run: every selected row is in {out} already (--rerun runs it again), or the "
              "selection names no row of the table (the 60-minute and dynamo rows need phase 1's rows in "
              "that file, or --phase2-init)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
