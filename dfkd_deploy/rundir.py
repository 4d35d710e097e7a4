"""The run directory: what ``--out`` and ``--bundle`` may be, checked before anything is computed;
the exclusive lock a run holds on its directory; the leftovers of a killed run; whether the
machine has room for the recipe's batches."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from dfkd_deploy.core import distributed, lock
from dfkd_deploy.core.errors import UsageError
from dfkd_deploy.core.io import OUTPUT_ERRNOS, OutputError, is_temporary, os_error_reason
from dfkd_deploy.recipe import Recipe, synthesis_batch
from dfkd_deploy.validate.data import check_eval_data

_HELD_LOCKS: dict[Path, lock.RunLock] = {}


def _is_our_run(run_dir: Path) -> bool:
    """Our lock file (every run since it existed), a checkpoint, or the pair of files every
    finished run writes (runs of earlier versions)."""
    return ((run_dir / lock.LOCK_NAME).exists() or (run_dir / "checkpoints" / "last.pt").is_file()
            or ((run_dir / "recipe.resolved.yaml").is_file() and (run_dir / "report.json").is_file()))


def _refuse_foreign_dir(run_dir: Path) -> None:
    """``--out`` may be new, empty, or a run directory of ours; anything else is the user's."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir} is a file, not a directory")
    if run_dir.is_dir() and not _is_our_run(run_dir) and any(run_dir.iterdir()):
        raise UsageError(f"--out {run_dir} is a non-empty directory that is not a dfkd-deploy run; "
                         "choose a new or empty directory (nothing in it was changed)")


def prepare_run_dir(out: str | Path, resume: bool, ctx: distributed.DistContext | None = None) -> Path:
    """Check ``out`` for a fresh run (new, empty, or ours without a checkpoint) or a resume (a
    checkpoint there), create it, take its lock (held until :func:`release_run_dir` or the
    process ends) and make sure it takes files: a read-only location fails here, in one line,
    not hours later. Under torch.distributed rank 0 creates and locks it and every rank checks it
    can write there."""
    ctx = ctx or distributed.current()
    run_dir = Path(out)
    ckpt = run_dir / "checkpoints" / "last.pt"

    def check_state() -> None:
        if resume:
            if not ckpt.is_file():
                raise UsageError(f"--resume: no checkpoint at {ckpt}")
        elif ckpt.exists():
            raise UsageError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")

    def create_and_lock() -> None:
        check_state()
        _refuse_foreign_dir(run_dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if exc.errno in OUTPUT_ERRNOS:
                raise OutputError(f"cannot create the run directory {run_dir}: {os_error_reason(exc)}") from None
            raise UsageError(f"cannot create the run directory {run_dir}: {exc.strerror}") from None
        key = run_dir.resolve()
        if key not in _HELD_LOCKS:
            try:
                _HELD_LOCKS[key] = lock.acquire(run_dir)
            except OSError as exc:
                raise OutputError(f"the run directory {run_dir} is not writable: {os_error_reason(exc)}") from None
        check_state()   # again, under the lock: another run may have got there first
        if not resume:
            shutil.rmtree(run_dir / "pool", ignore_errors=True)   # ours (a fresh run's leftovers)
        remove_stale_temporaries(run_dir)   # what a killed run was writing; no one writes now

    ctx.on_main(create_and_lock)
    try:
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as exc:
        raise OutputError(f"the run directory {run_dir} is not writable: {os_error_reason(exc)}") from None
    return run_dir


def release_run_dir(run_dir: str | Path) -> None:
    held = _HELD_LOCKS.pop(Path(run_dir).resolve(), None)
    if held is not None:
        held.release()


def _is_bundle(path: Path) -> bool:
    """A bundle of ours: sealed (our manifest), or staged by a run killed before sealing it."""
    from dfkd_deploy.deploy.bundle import CALIBRATION, FP32, MANIFEST

    try:
        if "bundle_version" in json.loads((path / MANIFEST).read_text(encoding="utf-8")):
            return True
    except (OSError, ValueError, TypeError):
        pass
    return (path / FP32).is_file() and (path / CALIBRATION).is_file()


def _writable_dir(path: Path) -> Path:
    """The nearest existing directory at or above ``path`` (where creating it starts)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def check_paths(out: str | Path, *, eval_data=None, bundle_dir=None) -> None:
    """Every path a run will use, checked before anything is computed: the eval data exists and
    its header reads, the bundle directory is not the run directory (nor holds it), is new, empty
    or a bundle of ours, and can be written."""
    if eval_data is not None:
        check_eval_data(eval_data)
    if bundle_dir is None:
        return
    bundle, run_dir = Path(bundle_dir).resolve(), Path(out).resolve()
    if bundle == run_dir or bundle in run_dir.parents:
        raise UsageError(f"--bundle {bundle_dir} must be a directory of its own, not --out {out} or a folder "
                         "above it (a bundle lists every file in it)")
    if bundle.exists() and not bundle.is_dir():
        raise UsageError(f"--bundle {bundle_dir} is a file, not a directory")
    if bundle.is_dir() and any(bundle.iterdir()) and not _is_bundle(bundle):
        raise UsageError(f"--bundle {bundle_dir} is a non-empty directory that is not a dfkd-deploy bundle; "
                         "choose a new or empty directory (nothing in it was changed)")
    base = _writable_dir(bundle)
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise OutputError(f"--bundle {bundle_dir} cannot be written: {base} is not a writable directory")


def remove_stale_temporaries(run_dir: Path) -> int:
    """Delete the ``.NAME.*.tmp`` files a killed run left (core.io writes through them)."""
    removed = 0
    for tmp in run_dir.rglob(".*.tmp"):
        if is_temporary(tmp) and (tmp.is_file() or tmp.is_symlink()):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


# Absolute lower bound of the memory a batch takes: the images themselves, their gradient and the
# generator's output (float32). Real use is several times more; this only refuses the impossible.
_BATCH_COPIES = 3


def available_memory(device: torch.device) -> int | None:
    """Bytes free for tensors on ``device`` (None: unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_batch_memory(recipe: Recipe, input_shape, device: torch.device) -> None:
    """Refuse batch sizes whose images alone cannot fit in the memory left on the machine."""
    free = available_memory(device)
    if free is None:
        return
    per_image = 4 * int(np.prod(input_shape)) * _BATCH_COPIES
    for key, batch in (("synthesis.batch_size", synthesis_batch(recipe.synthesis)),
                       ("distillation.batch_size", recipe.distillation.batch_size),
                       ("validation.batch_size", recipe.validation.batch_size)):
        need = batch * per_image
        if need > free:
            raise UsageError(f"{key}={batch} needs at least {need / 2**30:.1f} GiB for one batch of "
                             f"{list(input_shape)} images, but {device.type} has {free / 2**30:.1f} GiB free; "
                             f"lower {key}")
