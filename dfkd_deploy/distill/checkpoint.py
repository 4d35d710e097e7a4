"""Training checkpoints with every RNG state, so a resumed run continues where it stopped."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from dfkd_deploy.core.errors import TrainingError, one_line
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


def save_checkpoint(path: str | Path, state: dict) -> Path:
    return save_torch(path, state)


def load_checkpoint(path: str | Path) -> dict:
    # Our own file: it holds RNG states (tuples, numpy dicts), so weights_only cannot load it.
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - truncated by hand, or not a checkpoint at all
        raise TrainingError(f"{path}: not a readable checkpoint ({one_line(exc)})") from None
    if not isinstance(state, dict) or "ranks" not in state or "epoch" not in state:
        raise TrainingError(f"{path}: not a checkpoint of this version of dfkd-deploy; start a new run")
    return state
