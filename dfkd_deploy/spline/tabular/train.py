"""Train the same fully connected ReLU net from three initialisations — MARS (exact spline
construction), He and Xavier — on one split with one schedule, and record loss curves."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from dfkd_deploy.spline.construct import build_network, required_widths
from dfkd_deploy.spline.tabular.data import Split
from dfkd_deploy.spline.mars import MarsModel, fit_mars

__all__ = ["Schedule", "make_mlp", "train_regressor", "compare_inits", "epochs_to_reach"]

INITS = ("mars", "he", "xavier")


@dataclass(frozen=True)
class Schedule:
    """Identical for every init: optimiser, learning rate, batch size (0 = full batch)."""

    epochs: int = 100
    lr: float = 1e-3
    batch_size: int = 64
    optimizer: str = "adam"     # "adam" or "sgd" (momentum 0.9)


def make_mlp(d_in: int, widths: list[int], d_out: int, init: str, seed: int) -> nn.Sequential:
    """Linear/ReLU stack with He (kaiming normal, fan_in, ReLU gain) or Xavier (normal) weights
    and zero biases."""
    g = torch.Generator().manual_seed(seed)
    dims = [d_in, *widths, d_out]
    mods: list[nn.Module] = []
    for i in range(len(dims) - 1):
        lin = nn.Linear(dims[i], dims[i + 1])
        fan_in, fan_out = dims[i], dims[i + 1]
        std = np.sqrt(2.0 / fan_in) if init == "he" else np.sqrt(2.0 / (fan_in + fan_out))
        if init not in ("he", "xavier"):
            raise ValueError(f"unknown init {init!r}")
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * std)
            lin.bias.zero_()
        mods.append(lin)
        if i < len(dims) - 2:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def train_regressor(net: nn.Module, split: Split, schedule: Schedule, seed: int) -> dict:
    """MSE training on the standardised target. Curves are in target units (MSE * y_std^2);
    index 0 is the loss at initialisation, index e after e epochs."""
    torch.manual_seed(seed)
    Xtr = torch.as_tensor(split.X_train, dtype=torch.float32)
    ytr = torch.as_tensor(split.y_train, dtype=torch.float32).reshape(-1, 1)
    Xte = torch.as_tensor(split.X_test, dtype=torch.float32)
    yte = torch.as_tensor(split.y_test, dtype=torch.float32).reshape(-1, 1)
    if schedule.optimizer == "adam":
        opt = torch.optim.Adam(net.parameters(), lr=schedule.lr)
    elif schedule.optimizer == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=schedule.lr, momentum=0.9)
    else:
        raise ValueError(f"unknown optimizer {schedule.optimizer!r}")
    scale = split.y_std ** 2
    g = torch.Generator().manual_seed(seed)     # same batch order for every init
    n = len(Xtr)
    bs = schedule.batch_size or n

    def evaluate() -> tuple[float, float]:
        with torch.no_grad():
            return (float(((net(Xtr) - ytr) ** 2).mean()) * scale, float(((net(Xte) - yte) ** 2).mean()) * scale)

    train_curve, test_curve = [], []
    tr, te = evaluate()
    train_curve.append(tr)
    test_curve.append(te)
    t0 = time.perf_counter()
    for _ in range(schedule.epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, bs):
            idx = perm[s:s + bs]
            opt.zero_grad(set_to_none=True)
            loss = ((net(Xtr[idx]) - ytr[idx]) ** 2).mean()
            loss.backward()
            opt.step()
        tr, te = evaluate()
        train_curve.append(tr)
        test_curve.append(te)
    return {"train_mse": train_curve, "test_mse": test_curve, "train_seconds": time.perf_counter() - t0}


def epochs_to_reach(curve: list[float], level: float) -> int | None:
    """First epoch whose loss is <= level (0 = already at init), None if never."""
    for e, v in enumerate(curve):
        if v <= level:
            return e
    return None


@dataclass
class Comparison:
    mars: MarsModel
    widths: list[int]
    runs: dict = field(default_factory=dict)   # init -> train_regressor result


def compare_inits(split: Split, *, hidden: int = 64, schedule: Schedule = Schedule(), seed: int = 0,
                  max_degree: int = 1, max_terms: int | None = None, model: MarsModel | None = None) -> Comparison:
    """Fit MARS on the training split, build the exact net padded to ``hidden`` units, and train
    it next to He- and Xavier-initialised nets of the same shape."""
    if max_terms is None:
        # A linear term costs 2 units, so hidden // 2 terms always fit a degree-1 net.
        max_terms = max(2, hidden // 2)
    if model is None:  # the fit is deterministic for a fixed split, so callers may reuse one
        model = fit_mars(split.X_train, split.y_train, max_degree=max_degree, max_terms=max_terms,
                         feature_names=split.feature_names)
    widths = [max(hidden, w) for w in required_widths(model)]
    nets = {
        "mars": build_network(model, widths, check_inputs=split.X_train, seed=seed),
        "he": make_mlp(split.X_train.shape[1], widths, 1, "he", seed),
        "xavier": make_mlp(split.X_train.shape[1], widths, 1, "xavier", seed),
    }
    comp = Comparison(model, widths)
    for name in INITS:
        comp.runs[name] = train_regressor(nets[name], split, schedule, seed)
    return comp
