"""Training checkpoints with every RNG state, so a resumed run continues where it stopped."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from ..io import save_torch


def rng_state(np_rng: np.random.Generator) -> dict:
    state = {"python": random.getstate(), "numpy": np_rng.bit_generator.state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, np_rng: np.random.Generator) -> None:
    random.setstate(state["python"])
    np_rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, state: dict) -> Path:
    return save_torch(path, state)


def load_checkpoint(path: str | Path) -> dict:
    # Our own file: it holds RNG states (tuples, numpy dicts), so weights_only cannot load it.
    return torch.load(path, map_location="cpu", weights_only=False)
