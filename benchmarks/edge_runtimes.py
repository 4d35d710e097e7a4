"""Edge runtimes side by side for two students: file size, batch 1 and 32 latency on this machine,
top-1 agreement with the torch student and real accuracy, per back end and precision.

    python benchmarks/edge_runtimes.py                 # digits + CIFAR (needs ../shared)
    python benchmarks/edge_runtimes.py --skip-cifar
    python benchmarks/edge_runtimes.py --cifar-run runs/time_to_accuracy/cifar10-resnet56-state_dict-prune-30m
                                                       # the CIFAR rows only, from a finished run's bundle

Students: the demo's digits student (demo recipe) and a cifar_resnet20 distilled briefly from
../shared/teachers/cifar10-resnet56.th (recipes/tiny.yaml with fewer epochs: a CPU budget, so its
accuracy is low). Accuracy: the digits held-out split; a random 2,000-image subset (seed 0) of
../shared/data/cifar10-test-jpeg.npz. Latency: every runner of one student timed in the same
process, in alternating order over ``--rounds`` rounds (median of the round medians); the load
average is recorded, since the machine is shared. Results: benchmarks/results/edge_runtimes.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("DFKD_SHARED") or REPO.parent / "shared")   # ../shared beside the checkout
RESULTS = REPO / "benchmarks" / "results"
EVAL_IMAGES = 2000
CIFAR_OVERRIDES = {"teacher.arch": "cifar_resnet56", "distillation.epochs": 4, "distillation.warmup": 1,
                   "distillation.kd_steps": 10, "validation.probe_images": 128}


def runners_of(run_dir: Path, layout: str):
    """(name, runner) for torch, ORT fp32/int8 and every edge file in the run's bundle."""
    from dfkd_deploy.deploy import edge
    from dfkd_deploy import load_student
    from dfkd_deploy.runtime import OrtRunner, TorchRunner

    bundle = run_dir / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    student, _ = load_student(run_dir / "student.pt")
    chw = tuple(manifest["input"]["shape"][1:])
    chw = (chw[2], chw[0], chw[1]) if layout == "NHWC" else chw
    out = [("torch", "fp32", None, TorchRunner(student, input_shape=chw)),
           ("onnxruntime", "fp32", "student.onnx", OrtRunner(bundle / "student.onnx", layout=layout))]
    if (bundle / "student.int8.onnx").is_file():
        out.append(("onnxruntime", "int8", "student.int8.onnx",
                    OrtRunner(bundle / "student.int8.onnx", layout=layout, precision="int8")))
    for f in manifest["runtimes"].get("files", []):
        out.append((f["runtime"], f["precision"], f["file"], edge.make_runner(bundle, f, layout)))
    return out, manifest


def file_bytes(bundle: Path, name) -> int | None:
    if name is None:
        return None
    p = bundle / name
    extra = p.with_suffix(".bin") if p.suffix == ".xml" else None
    return p.stat().st_size + (extra.stat().st_size if extra and extra.is_file() else 0)


def measure(run_dir: Path, images_u8: np.ndarray, labels: np.ndarray, spec, *, rounds: int, repeats: int) -> dict:
    from dfkd_deploy.images import uint8_to_model

    runners, manifest = runners_of(run_dir, spec.layout)
    x = uint8_to_model(images_u8, spec.mean, spec.std, spec.value_range)
    logits = {i: r.predict(x) for i, (_, _, _, r) in enumerate(runners)}
    ref = logits[0].argmax(1)
    times = {(i, b): [] for i in range(len(runners)) for b in (1, 32)}
    load0 = os.getloadavg()
    for k in range(rounds):
        order = list(range(len(runners)))
        for i in (order if k % 2 == 0 else order[::-1]):
            for b in (1, 32):
                times[(i, b)].append(runners[i][3].time(b, repeats=repeats, warmup=3).median_ms)
    rows = []
    for i, (backend, precision, name, _) in enumerate(runners):
        rows.append({"backend": backend, "precision": precision, "file": name,
                     "bytes": file_bytes(run_dir / "bundle", name),
                     "batch_1_ms": round(float(np.median(times[(i, 1)])), 4),
                     "batch_32_ms": round(float(np.median(times[(i, 32)])), 4),
                     "agreement_vs_torch": float((logits[i].argmax(1) == ref).mean()),
                     "accuracy": float((logits[i].argmax(1) == labels).mean())})
    return {"rows": rows, "eval_images": int(len(labels)), "loadavg_start": load0, "loadavg_end": os.getloadavg(),
            "versions": manifest["versions"] | (manifest["runtimes"].get("versions") or {}),
            "skipped": manifest["runtimes"].get("skipped"), "errors": manifest["runtimes"].get("errors")}


def digits(tmp: Path, **kw) -> dict:
    from dfkd_deploy import run as api
    from dfkd_deploy.demo import demo_recipe, ensure_teacher
    from dfkd_deploy import load_teacher
    from dfkd_deploy import load_eval_data

    teacher_path, test_npz = ensure_teacher()
    t0 = time.time()
    res = api.compress(teacher_path, demo_recipe(), tmp / "digits", device="cpu", eval_data=test_npz,
                       show_progress=False)
    spec = load_teacher(teacher_path, demo_recipe().teacher).spec
    data = load_eval_data(test_npz, input_shape=spec.input_shape)
    out = measure(res.run_dir, data.images, data.labels, spec, **kw)
    return {"student": "demo digits student (demo recipe)", "compress_seconds": round(time.time() - t0, 1),
            "eval": f"digits held-out split ({len(data)} images)", **out}


def cifar(tmp: Path, **kw) -> dict:
    from dfkd_deploy import run as api
    from dfkd_deploy import load_recipe
    from dfkd_deploy import load_teacher
    from dfkd_deploy import load_eval_data

    teacher, data_path = SHARED / "teachers" / "cifar10-resnet56.th", SHARED / "data" / "cifar10-test-jpeg.npz"
    recipe = load_recipe(REPO / "recipes" / "tiny.yaml", CIFAR_OVERRIDES)
    spec = load_teacher(teacher, recipe.teacher).spec
    part = load_eval_data(data_path, input_shape=spec.input_shape, num_classes=spec.num_classes).subset(EVAL_IMAGES)
    npz = tmp / "cifar-eval.npz"
    np.savez(npz, images=part.images.transpose(0, 2, 3, 1), labels=part.labels)
    t0 = time.time()
    res = api.compress(teacher, recipe, tmp / "cifar", device="cpu", eval_data=npz, show_progress=False)
    out = measure(res.run_dir, part.images, part.labels, spec, **kw)
    return {"student": "cifar_resnet20 from cifar10-resnet56.th, recipes/tiny.yaml + "
                       + ", ".join(f"{k}={v}" for k, v in CIFAR_OVERRIDES.items()),
            "compress_seconds": round(time.time() - t0, 1),
            "eval": f"{EVAL_IMAGES} images drawn at random (seed 0) from cifar10-test-jpeg.npz", **out}


def cifar_from_run(run_dir: Path, **kw) -> dict:
    """The CIFAR rows from a finished ``compress`` run's bundle (e.g. a time_to_accuracy run)."""
    from dfkd_deploy import load_eval_data, load_teacher, load_recipe

    report = json.loads((run_dir / "report.json").read_text())
    recipe = load_recipe(None, {"teacher.arch": "cifar_resnet56"})
    spec = load_teacher(SHARED / "teachers" / "cifar10-resnet56.th", recipe.teacher).spec
    part = load_eval_data(SHARED / "data" / "cifar10-test-jpeg.npz", input_shape=spec.input_shape,
                          num_classes=spec.num_classes).subset(EVAL_IMAGES)
    out = measure(run_dir, part.images, part.labels, spec, **kw)
    s = report["student"]
    return {"student": f"{s['arch']} ({s.get('init', 'scratch')}, {s['params']:,} params) from cifar10-resnet56.th, "
                       f"the run {run_dir.name} (budget {(report.get('budget') or {}).get('requested_s')} s)",
            "eval": f"{EVAL_IMAGES} images drawn at random (seed 0) from cifar10-test-jpeg.npz", **out}


def markdown(results: dict) -> str:
    lines = ["# Edge runtimes", "", f"Machine: {results['machine']}.", ""]
    for key, r in results["students"].items():
        if isinstance(r, str):
            lines += [f"## {key}", "", r, ""]
            continue
        lines += [f"## {key}", "", f"{r['student']}; accuracy on {r['eval']}; load average "
                  f"{r['loadavg_start'][0]:.1f} -> {r['loadavg_end'][0]:.1f}.", "",
                  "| Back end | Precision | File | Size | Batch 1 (ms) | Batch 32 (ms) | Agreement vs torch | Accuracy |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            size = "-" if row["bytes"] is None else f"{row['bytes'] / 1e3:.1f} kB"
            lines.append(f"| {row['backend']} | {row['precision']} | {row['file'] or '(module)'} | {size} | "
                         f"{row['batch_1_ms']:.3f} | {row['batch_32_ms']:.3f} | {100 * row['agreement_vs_torch']:.2f} % | "
                         f"{100 * row['accuracy']:.2f} % |")
        if r.get("skipped"):
            lines += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in r["skipped"].items())]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-cifar", action="store_true")
    ap.add_argument("--cifar-run", help="measure this finished compress run (CIFAR-10 teacher) as the CIFAR student; "
                                        "the digits rows already in the results are kept")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    import torch

    results = {"machine": f"{os.cpu_count()} CPU threads visible, torch threads {torch.get_num_threads()}, "
                          f"{platform.processor() or platform.machine()}, {platform.platform()}",
               "timing": f"median of {args.rounds} alternating rounds, each the median of {args.repeats} runs "
                         "after 3 warm-up runs; same process", "students": {}}
    kw = dict(rounds=args.rounds, repeats=args.repeats)
    if args.cifar_run:
        old = json.loads((RESULTS / "edge_runtimes.json").read_text())
        results["students"] = {"digits": old["students"]["digits"],
                               "cifar10": cifar_from_run(Path(args.cifar_run), **kw)}
        (RESULTS / "edge_runtimes.json").write_text(json.dumps(results, indent=1) + "\n")
        (RESULTS / "edge_runtimes.md").write_text(markdown(results))
        print(markdown(results))
        return
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp:
        results["students"]["digits"] = digits(Path(tmp), **kw)
        have = (SHARED / "teachers" / "cifar10-resnet56.th").is_file()
        results["students"]["cifar10"] = (cifar(Path(tmp), **kw) if have and not args.skip_cifar
                                          else "skipped: ../shared absent or --skip-cifar")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "edge_runtimes.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / "edge_runtimes.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
