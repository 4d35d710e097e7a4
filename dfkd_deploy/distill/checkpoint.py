"""Training checkpoints with every RNG state, so a resumed run continues where it stopped.

A checkpoint holds tensors and plain Python types only (dicts, lists, tuples, numbers, strings),
so it is read with ``torch.load(weights_only=True)``: a run directory copied from elsewhere cannot
run code on ``--resume``. :func:`save_checkpoint` converts NumPy values on the way in.
"""
from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import torch

from dfkd_deploy.core.errors import TrainingError, UsageError, one_line
from dfkd_deploy.core.io import save_torch


def rng_state(np_rng: np.random.Generator) -> dict:
    """Python, NumPy (the generator given), torch CPU and, once CUDA is in use, this process's GPU."""
    state = {"python": random.getstate(), "numpy": np_rng.bit_generator.state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # The current device only: one process per GPU under torchrun, and touching every GPU
        # would create a CUDA context on each of them.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, np_rng: np.random.Generator) -> None:
    random.setstate(state["python"])
    np_rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):   # older checkpoints kept every device's state
            torch.cuda.set_rng_state_all(cuda)
        else:
            torch.cuda.set_rng_state(cuda)


# What every checkpoint of this version holds, at the top and for each rank.
REQUIRED_KEYS = ("epoch", "world_size", "student", "optimizer", "scheduler", "synthesizer", "ranks",
                 "synthesis_seconds", "distillation_seconds", "history")
REQUIRED_RANK_KEYS = ("rng", "pool_shards", "pool_files", "synthesizer")


def plain(obj):
    """``obj`` with NumPy scalars as Python numbers and arrays as tensors (what weights_only reads)."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    return obj


def save_checkpoint(path: str | Path, state: dict) -> Path:
    return save_torch(path, plain(state))


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint without unpickling anything but tensors and plain types."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise TrainingError(f"{path}: refused: the checkpoint holds Python objects, not only tensors and plain "
                            f"values ({one_line(exc, 120)}); loading it would run code from the file") from None
    except Exception as exc:  # noqa: BLE001 - truncated by hand, or not a checkpoint at all
        raise TrainingError(f"{path}: not a readable checkpoint ({one_line(exc)})") from None
    if not isinstance(state, dict) or "ranks" not in state or "epoch" not in state:
        raise TrainingError(f"{path}: not a checkpoint of this version of dfkd-deploy; start a new run")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    ranks = state["ranks"] if isinstance(state["ranks"], list) else []
    missing += [f"ranks[{r}].{k}" for r, rank in enumerate(ranks) for k in REQUIRED_RANK_KEYS
                if not isinstance(rank, dict) or k not in rank]
    if missing or not ranks:
        raise TrainingError(f"{path}: incomplete checkpoint, missing {', '.join(missing) or 'ranks'}; "
                            "start a new run (another --out)")
    return state


# Recipe keys a resumed run may change (dotted prefixes): the epoch count, to extend a run; the
# per-epoch counts, which a budgeted resume cuts to fit the time left (budget/planner.py:
# replan_remaining); and what only happens after training. Everything else must match the
# checkpoint's recipe.
RESUMABLE_CHANGES = ("distillation.epochs", "distillation.kd_steps", "synthesis.rounds_per_epoch", "validation.",
                     "export.", "deploy.")


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def recipe_changes(saved: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ between two recipe dumps and may not change on a resume."""
    before, now = _flatten(saved), _flatten(current)
    return sorted(k for k in before.keys() | now.keys()
                  if before.get(k) != now.get(k) and not k.startswith(RESUMABLE_CHANGES))


def check_resume_recipe(saved: dict | None, current: dict) -> None:
    """Refuse a resume whose recipe differs from the checkpoint's (older checkpoints have none)."""
    if saved is None:
        return
    changed = recipe_changes(saved, current)
    if changed:
        before, now = _flatten(saved), _flatten(current)
        shown = ", ".join(f"{k} ({before.get(k)!r} -> {now.get(k)!r})" for k in changed[:5])
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        raise UsageError(f"--resume: the recipe differs from the checkpoint's in {shown}{more}; only "
                         "distillation.epochs, distillation.kd_steps, synthesis.rounds_per_epoch, validation.*, export.* "
                         "and deploy.* may change when resuming: "
                         "restore the others, or start a new run in another --out")
