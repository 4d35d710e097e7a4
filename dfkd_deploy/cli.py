"""Command line: parse arguments, call the library, map errors to exit codes. Nothing else.

Exit codes: 0 success, 2 usage or input error (one line, no traceback unless --debug),
1 an unexpected internal error (one line and a hint to rerun with --debug).
"""
from __future__ import annotations

import json
import os
import signal
import sys
from functools import wraps
from pathlib import Path

import click
import yaml

from dfkd_deploy.core.errors import DfkdError
from dfkd_deploy.core.io import OUTPUT_ERRNOS, describe_os_error

_DEBUG = {"on": False}


def _fail(msg: str, code: int) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


def handle_errors(fn):
    """One line per failure; tracebacks only with --debug."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DfkdError as exc:
            if _DEBUG["on"]:
                raise
            _fail(str(exc), exc.exit_code)
        except Terminated:
            _fail("terminated (SIGTERM); the last checkpoint is kept (rerun with --resume)", 128 + signal.SIGTERM)
        except KeyboardInterrupt:
            _fail("interrupted; the last checkpoint is kept (rerun with --resume)", 130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - last resort: never a bare traceback
            if _DEBUG["on"]:
                raise
            if isinstance(exc, OSError) and exc.errno in OUTPUT_ERRNOS:   # disk full, read-only, ...
                _fail(describe_os_error(exc), 2)
            if _out_of_memory(exc):
                _fail("out of memory: lower synthesis.batch_size / distillation.batch_size (--set KEY=VALUE); "
                      "the last checkpoint is kept", 2)
            _fail(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", 1)

    return wrapper


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler or torchrun stopping the job), raised where the process was."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def _parse_sets(values: tuple[str, ...]) -> dict:
    out = {}
    for item in values:
        if "=" not in item:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE, e.g. distillation.epochs=5", param_hint="--set")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise click.BadParameter(f"{item!r}: the value is not valid YAML", param_hint="--set") from None
    return out


def _recipe(recipe_path, sets, teacher_arch=None, seed=None):
    from dfkd_deploy.recipe import load_recipe

    overrides = _parse_sets(sets)
    if teacher_arch:
        overrides["teacher.arch"] = teacher_arch
    if seed is not None:
        overrides["seed"] = seed
    return load_recipe(recipe_path, overrides)


def teacher_options(fn):
    fn = click.option("--teacher-arch", help="zoo architecture of a plain state_dict teacher (see `list students`)")(fn)
    fn = click.option("--trust-pickle", is_flag=True, help="allow loading a pickled whole module or a TorchScript archive (both run code from the file)")(fn)
    return fn


def run_options(fn):
    fn = click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False), help="recipe YAML (default: built-in defaults)")(fn)
    fn = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="override a recipe value, e.g. --set distillation.epochs=5")(fn)
    fn = click.option("--seed", type=int, help="random seed (overrides the recipe's)")(fn)
    fn = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)(fn)
    fn = click.option("--quiet", is_flag=True, help="no progress bars or per-epoch lines (warnings and the "
                      "final summary are still printed)")(fn)
    return fn


class GuardedGroup(click.Group):
    """Applies the same error mapping to every subcommand, including groups added later (spline)."""

    def invoke(self, ctx):
        return handle_errors(super().invoke)(ctx)


@click.group(cls=GuardedGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="show full tracebacks on errors")
@click.version_option(package_name="dfkd-deploy")
def cli(debug: bool):
    """Compress a deployed image classifier without its training data."""
    _DEBUG["on"] = debug


@cli.command()
@click.argument("teacher", type=click.Path())
@run_options
@teacher_options
@click.option("--eval-data", type=click.Path(), help=".npz (images, labels) or ImageFolder directory for real accuracy")
@click.option("--out", type=click.Path(file_okay=False), help="run directory (default: runs/<teacher name>)")
@click.option("--dry-run", is_flag=True, help="check the recipe and teacher, print the plan, run nothing")
@click.option("--resume", is_flag=True, help="continue the run in --out from its last checkpoint (same recipe; "
              "under torchrun the same number of processes)")
@click.option("--auto-resume", is_flag=True, help="--resume when --out holds a checkpoint, else start afresh "
              "(for restarts by torchrun --max-restarts or a job scheduler)")
@click.option("--bundle", "bundle_dir", type=click.Path(file_okay=False), help="edge hand-off bundle directory (default: OUT/bundle)")
@click.option("--tensorboard", "tensorboard_dir", type=click.Path(file_okay=False),
              help="also write TensorBoard scalars and image grids here (needs the tensorboard extra)")
@click.option("--sign-key", type=click.Path(dir_okay=False),
              help="Ed25519 private key (PEM): sign the bundle it writes (as `bundle sign`)")
@click.option("--target", help="student size relative to the teacher: params=F, macs=F or latency=F (ONNX Runtime "
              "CPU, batch 1 and 32), e.g. params=0.3; replaces the recipe's student.arch (student.target)")
@click.option("--budget", help="wall-clock budget for the whole run, e.g. 30m, 1h, 90s: the run is planned to end "
              "within it (budget:); with --resume, what is left of it")
def compress(teacher, recipe_path, sets, seed, device, quiet, teacher_arch, trust_pickle, eval_data, out, dry_run, resume,
             auto_resume, bundle_dir, tensorboard_dir, sign_key, target, budget):
    """Distill TEACHER into a small student, export it to ONNX and validate it.

    Several GPUs or nodes: launch it with torchrun, e.g.
    `torchrun --nproc-per-node 4 -m dfkd_deploy compress TEACHER ...` (see docs/scale-out.md).
    """
    from dfkd_deploy import run as api
    from dfkd_deploy.teachers import load_teacher

    sets = tuple(sets) + _size_and_budget_sets(target, budget)
    recipe = _recipe(recipe_path, sets, teacher_arch, seed)
    out = out or str(Path("runs") / Path(teacher).stem)
    main_rank = os.environ.get("RANK", "0") == "0"   # under torchrun only rank 0 speaks
    if auto_resume:
        resume = resume or (Path(out) / "checkpoints" / "last.pt").is_file()
    if sign_key:
        from dfkd_deploy.deploy.signing import load_private_key

        load_private_key(sign_key)   # a bad key fails now, not after the run
    if dry_run:
        t = load_teacher(teacher, recipe.teacher, trust_pickle=trust_pickle)
        if main_rank:
            click.echo(yaml.safe_dump({"plan": api.plan(t, recipe), "out": out}, sort_keys=False))
        return
    result = api.compress(teacher, recipe, out, device=device, eval_data=eval_data, trust_pickle=trust_pickle,
                          resume=resume, show_progress=not quiet, bundle_dir=bundle_dir,
                          tensorboard_dir=tensorboard_dir)
    if main_rank:
        _print_summary(result.report, result.run_dir)
        if sign_key:
            from dfkd_deploy.deploy.bundle import sign_bundle

            sig, fingerprint = sign_bundle(Path(bundle_dir) if bundle_dir else result.run_dir / "bundle", sign_key)
            click.echo(f"bundle signed with Ed25519 key {fingerprint}: {sig}")


def _size_and_budget_sets(target, budget) -> tuple[str, ...]:
    """--target and --budget as recipe overrides (a target replaces a recipe's named arch)."""
    out: tuple[str, ...] = ()
    if target:
        out += (f"student.target={target}", "student.arch=null")
    if budget:
        out += (f"budget={budget}",)
    return out


def _print_summary(report: dict, run_dir) -> None:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.2f}%"

    t, s, a, f = report["teacher"], report["student"], report["agreement"], report["fidelity"]
    click.echo(f"teacher accuracy {pct(t.get('accuracy'))}   student accuracy {pct(s.get('accuracy'))}   "
               f"agreement: held-out probes {pct(a.get('probe_top1'))}, real data {pct(a.get('eval_data_top1'))}   "
               f"ONNX max |diff| {f.get('onnx_max_abs_diff')}")
    for line in s.get("warnings") or []:
        click.echo(f"warning: {line}")
    click.echo(f"artifacts in {run_dir}")


@cli.command()
@click.argument("teacher", type=click.Path())
@teacher_options
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def inspect(teacher, teacher_arch, trust_pickle, recipe_path, sets, as_json):
    """Show what was found in TEACHER and what was assumed: format, input, layout, value range,
    normalisation, output kind, BN statistics, converter parity. Each convention is printed with
    where it came from (recipe, file metadata, detected, or a default) so a wrong guess can be
    corrected in the recipe's teacher: section."""
    from dfkd_deploy.synthesis.priors import synthesis_weights
    from dfkd_deploy.teachers import load_teacher
    from dfkd_deploy.teachers.batchnorm import missing_statistics_warning

    recipe = _recipe(recipe_path, sets, teacher_arch)
    teacher_obj = load_teacher(teacher, recipe.teacher, trust_pickle=trust_pickle)
    loaded = teacher_obj.spec
    spec = loaded.to_dict()
    losses = {"bn_statistics": loaded.bn_layers > 0 and recipe.synthesis.bn > 0,
              **synthesis_weights(teacher_obj, recipe.synthesis)}
    weak = missing_statistics_warning(teacher_obj)
    if as_json:
        click.echo(json.dumps({**spec, "synthesis_losses": losses, "warnings": [weak] if weak else []}, indent=2))
        return
    for key, value in spec.items():
        if key in ("notes", "sources"):
            continue
        click.echo(f"{key:24s} {value}")
    sources = spec.get("sources") or {}
    if sources:
        click.echo("conventions (value, then where it came from; override under teacher: in the recipe):")
        for key, value in _conventions(spec).items():
            click.echo(f"  {key:15s} {value:32s} {sources.get(key, '')}")
    priors = ", ".join(f"{k} {v:g}" for k, v in losses["priors"].items()) or "none"
    click.echo(f"synthesis losses: BN-statistics matching {'on' if losses['bn_statistics'] else 'off'}; "
               f"BN-free priors: {priors}; adversarial weight {losses['adversarial_weight']:g}")
    for note in spec.get("notes") or []:
        click.echo(f"note: {note}")
    if weak:
        click.echo(f"warning: {weak}")


def _conventions(spec: dict) -> dict[str, str]:
    c = spec["input_shape"][0]
    if spec.get("mean") is None and spec.get("std") is None:
        norm = "none"
    else:
        norm = f"mean {list(spec.get('mean') or [0.0] * c)} std {list(spec.get('std') or [1.0] * c)}"
    bn = spec.get("bn_layers") or 0
    return {"layout": spec["layout"], "input_shape": str(spec["input_shape"]),
            "value_range": f"[0, {spec['value_range']:g}]", "normalisation": norm,
            "channel_order": spec.get("channel_order", "RGB"), "output": spec["output"],
            "bn_statistics": f"{bn} BN layers" if bn else "none (BN-free priors)"}


@cli.command()
@click.argument("teacher", type=click.Path())
@run_options
@teacher_options
@click.option("--out", type=click.Path(file_okay=False), required=True, help="directory for the image pool")
@click.option("--rounds", type=int, default=None, help="batches to synthesize (default: the recipe's warm-up epochs x rounds)")
def synthesize(teacher, recipe_path, sets, seed, device, quiet, teacher_arch, trust_pickle, out, rounds):
    """Synthesize images from TEACHER alone into a pool (no student)."""
    from dfkd_deploy import stages

    recipe = _recipe(recipe_path, sets, teacher_arch, seed)
    info = stages.synthesize(teacher, recipe, out, device=device, rounds=rounds, trust_pickle=trust_pickle,
                             show_progress=not quiet)
    click.echo(f"{info['images']} images in {info['pool']} ({info['seconds']:.1f}s)")


@cli.command()
@click.argument("teacher", type=click.Path())
@run_options
@teacher_options
@click.option("--pool", type=click.Path(file_okay=False), required=True, help="pool made by `synthesize`")
@click.option("--out", type=click.Path(file_okay=False), required=True)
def distill(teacher, recipe_path, sets, seed, device, quiet, teacher_arch, trust_pickle, pool, out):
    """Train a student by KD on an existing pool (no further synthesis); writes student.pt."""
    from dfkd_deploy import stages

    recipe = _recipe(recipe_path, sets, teacher_arch, seed)
    path = stages.distill_on_pool(teacher, recipe, pool, out, device=device, trust_pickle=trust_pickle,
                                  show_progress=not quiet)
    click.echo(f"student written to {path}")


@cli.command()
@click.argument("student", type=click.Path())
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="ONNX file to write")
@click.option("--opset", type=int, default=17, show_default=True)
def export(student, out, opset):
    """Export a student.pt to ONNX (BN folded, dynamic batch) and check parity."""
    from dfkd_deploy import stages

    result = stages.export(student, out, opset=opset)
    click.echo(f"{result.path}: opset {result.opset}, max |diff| vs torch {result.max_abs_diff:.2e}")


@cli.command("export-teacher")
@click.argument("teacher", type=click.Path())
@teacher_options
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="ONNX file to write")
@click.option("--exporter", type=click.Choice(["legacy", "dynamo"]), default="legacy", show_default=True,
              help="legacy: BatchNorm kept as nodes; dynamo: torch's default exporter, BN folded into the convs "
                   "(a teacher without BN statistics), weights in OUT.data")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: 17 legacy, 18 dynamo)")
@click.option("--fold-bn", is_flag=True, help="legacy exporter: fold BatchNorm into the convs (constant folding)")
@click.option("--external-data/--no-external-data", default=None,
              help="dynamo exporter: weights in a separate OUT.data file (default) or inside the .onnx")
def export_teacher(teacher, teacher_arch, trust_pickle, recipe_path, sets, out, exporter, opset, fold_bn, external_data):
    """Export TEACHER (any supported form) to ONNX, normalisation in its metadata; checked against torch."""
    from exporters.onnx_export import describe_teacher_onnx

    from dfkd_deploy import stages

    recipe = _recipe(recipe_path, sets, teacher_arch)
    path = stages.export_teacher(teacher, recipe, out, trust_pickle=trust_pickle, opset=opset, exporter=exporter,
                                 fold=fold_bn, external_data=external_data)
    info = describe_teacher_onnx(path)
    data = f", weights in {', '.join(info['external_data'])}" if info["external_data"] else ""
    click.echo(f"teacher written to {path} ({exporter} exporter, opset {info['opset']}, "
               f"{info['batchnorm_nodes']} BatchNormalization nodes{data})")


@cli.command()
@click.argument("student", type=click.Path())
@click.option("--teacher", required=True, type=click.Path(), help="the teacher, in any form `compress` takes")
@teacher_options
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE")
@click.option("--eval-data", type=click.Path(), help=".npz or ImageFolder for real accuracy")
@click.option("--probes", type=int, default=256, show_default=True, help="synthetic probe images")
@click.option("--probe-data", type=click.Path(), help="unlabelled images (.npz with images, or a folder; labels "
              "ignored) to probe with, besides the synthetic sources, when there is no --eval-data")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--min-agreement", type=click.FloatRange(0, 1), help="fail (exit 1) below this top-1 agreement "
              "with the teacher: on --eval-data when given, else the LOWER bound of the data-free estimate's "
              "interval, e.g. 0.9")
@click.option("--min-accuracy", type=click.FloatRange(0, 1), help="fail below this student accuracy on --eval-data "
              "(without it: below the lower bound of the estimated accuracy, which needs --teacher-accuracy)")
@click.option("--teacher-accuracy", type=click.FloatRange(0, 1), help="the teacher's own real top-1 (e.g. from its "
              "model card; = --set teacher.accuracy=...): without --eval-data the student's accuracy is then "
              "estimated too")
@click.option("--baseline", type=click.Path(dir_okay=False), help="an earlier report.json or `validate --json` output")
@click.option("--max-drop", type=click.FloatRange(min=0), help="points the figures may drop against --baseline")
@click.option("--junit", type=click.Path(dir_okay=False), help="write JUnit XML, one testcase per threshold")
def validate(student, teacher, teacher_arch, trust_pickle, recipe_path, sets, eval_data, probes, probe_data, seed,
             as_json, min_agreement, min_accuracy, teacher_accuracy, baseline, max_drop, junit):
    """Compare STUDENT (student.pt or .onnx) with the teacher on synthetic probes and real data.

    With thresholds this is a CI gate: exit 0 when every threshold holds, 1 when one fails,
    2 on a usage or input error.
    """
    from dfkd_deploy.validate import gate
    from dfkd_deploy import stages
    from dfkd_deploy.core.errors import DfkdError

    try:   # input errors still leave a JUnit file behind, so CI shows why the gate did not run
        if teacher_accuracy is not None:
            sets = tuple(sets) + (f"teacher.accuracy={teacher_accuracy}",)
        recipe = _recipe(recipe_path, sets, teacher_arch, seed)
        gate.check_options(eval_data=eval_data, min_accuracy=min_accuracy, baseline=baseline, max_drop=max_drop,
                           teacher_accuracy=recipe.teacher.accuracy)
        metrics = stages.validate(student, teacher, recipe, eval_data=eval_data, probes=probes,
                                  probe_data=probe_data, trust_pickle=trust_pickle)
        checks = gate.run_gate(metrics, min_agreement=min_agreement, min_accuracy=min_accuracy,
                               baseline=gate.load_baseline(baseline) if baseline else None, max_drop=max_drop)
    except DfkdError as exc:
        if junit:
            gate.write_junit(junit, [], error=str(exc))
        raise
    if junit:
        gate.write_junit(junit, checks, metrics=metrics)
    if as_json:
        click.echo(json.dumps({**metrics, "checks": [c.to_dict() for c in checks]} if checks else metrics, indent=2))
    else:
        click.echo("\n".join(f"{k:28s} {v}" for k, v in metrics.items()))
        if metrics.get("estimated_agreement") is not None:
            click.echo(f"estimated real agreement {100 * metrics['estimated_agreement']:.1f}% "
                       f"({100 * metrics['estimate_coverage']:.0f}% interval "
                       f"{100 * metrics['estimated_agreement_low']:.1f}%..{100 * metrics['estimated_agreement_high']:.1f}%); "
                       f"based on: {metrics['estimate_based_on']}. Raw probe agreement is not real agreement.")
        if metrics.get("estimated_accuracy") is not None:
            click.echo(f"estimated real accuracy {100 * metrics['estimated_accuracy']:.1f}% (bounds "
                       f"{100 * metrics['estimated_accuracy_low']:.1f}%..{100 * metrics['estimated_accuracy_high']:.1f}% "
                       f"over the agreement interval); based on: {metrics['estimated_accuracy_based_on']}")
        for c in checks:
            click.echo(f"{'PASS' if c.passed else 'FAIL'} {c.name}: {c.message}")
    failed = [c for c in checks if not c.passed]
    if failed:
        click.echo(f"validation gate failed: {', '.join(c.name for c in failed)}", err=True)
        sys.exit(1)


@cli.group("bundle")
def bundle_group():
    """The deployment bundle a run writes to RUN/bundle/."""


@bundle_group.command("verify")
@click.argument("directory", type=click.Path())
@click.option("--key", "public_key", type=click.Path(dir_okay=False),
              help="Ed25519 public key (PEM): manifest.sig must be its signature (needs the sign extra)")
def bundle_verify(directory, public_key):
    """Check a bundle: exactly the listed files, the signature (--key), file hashes, then ONNX
    Runtime fp32/int8 rerun vs the recorded figures.

    Without --key this proves integrity against accidents only, not authenticity.
    Exit 0 when it all holds, 1 on any mismatch or a bad or missing signature, 2 when DIRECTORY
    is not a bundle or the key cannot be read.
    """
    from dfkd_deploy.deploy.bundle import verify_bundle

    result = verify_bundle(directory, public_key=public_key)
    for key, value in result.checks.items():
        click.echo(f"{key:32s} {value}")
    for problem in result.problems:
        click.echo(f"FAIL {problem}")
    if not result.ok:
        sys.exit(1)
    click.echo(f"bundle {directory} verified" + ("" if public_key else " (integrity only: unsigned check)"))


@bundle_group.command("sign")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--key", "private_key", type=click.Path(dir_okay=False), required=True,
              help="Ed25519 private key (PEM, from `bundle keygen`)")
def bundle_sign(directory, private_key):
    """Write DIRECTORY/manifest.sig, an Ed25519 signature of its manifest.json.

    The bundle must first pass the path, file-set and hash checks (refused with exit 2 otherwise).
    """
    from dfkd_deploy.deploy.bundle import sign_bundle

    sig, fingerprint = sign_bundle(directory, private_key)
    click.echo(f"signed {directory} with Ed25519 key {fingerprint}: {sig}")


@bundle_group.command("keygen")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="folder for private.pem (mode 0600) and public.pem; existing keys are not overwritten")
def bundle_keygen(out_dir):
    """Make an Ed25519 key pair for `bundle sign` / `bundle verify --key`."""
    from dfkd_deploy.deploy.signing import generate_keys

    pair = generate_keys(out_dir)
    click.echo(f"key {pair.fingerprint}: private {pair.private} (keep it secret, off the devices), public {pair.public}")


@cli.command()
@click.option("--out", type=click.Path(file_okay=False), default="runs/demo", show_default=True)
@click.option("--quiet", is_flag=True)
def demo(out, quiet):
    """Built-in default: a digits teacher (trained once, cached) compressed data-free."""
    from dfkd_deploy.demo import run_demo

    res = run_demo(out, show_progress=not quiet)
    click.echo(f"digits teacher accuracy {100 * res['teacher_accuracy']:.2f}%   "
               f"student accuracy {100 * res['student_accuracy']:.2f}%   "
               f"({100 * res['student_accuracy'] / res['teacher_accuracy']:.1f}% of the teacher)   "
               f"student {res['student_params']} params vs teacher {res['teacher_params']}")
    click.echo(f"artifacts in {res['run_dir']}")


@cli.group("list")
def list_group():
    """List registered components."""


@list_group.command("students")
def list_students():
    """Architectures a recipe may name as student.arch (or --teacher-arch)."""
    from dfkd_deploy import list_students as students

    for entry in students():
        click.echo(f"{entry.name:18s} {entry.description}")


def _register_optional_groups() -> None:
    from dfkd_deploy.spline.tabular.cli import spline  # imports py-earth2 lazily, only when a spline command runs

    cli.add_command(spline)


_register_optional_groups()


def main() -> None:
    import warnings

    # onnx2torch's converted graphs trigger torch deprecation notes that are not the user's to fix.
    warnings.filterwarnings("ignore", module=r"onnx2torch(\..*)?$")
    # SIGTERM ends a run like Ctrl-C: the checkpoint is kept and the process says so.
    signal.signal(signal.SIGTERM, _on_sigterm)
    cli(prog_name="dfkd-deploy")


if __name__ == "__main__":
    main()
