"""Exact ReLU network for a CPWL MARS model (see ``mars.py`` for what "CPWL" means here).

Degree 1 -> ``Linear(D, H) - ReLU - Linear(H, K)``:
  * hinge ``max(0, x_j - t)``: a unit with weight ``e_j`` and bias ``-t``;
  * mirrored hinge ``max(0, t - x_j)``: weight ``-e_j``, bias ``+t``;
  * linear ``x_j``: two units, ``relu(x_j) - relu(-x_j)``;
  * intercept: the output bias.
Degree 2 (products already replaced by ``min(h1, h2)`` in the model) -> two hidden layers:
  layer 1 holds every hinge once; layer 2 passes every layer-1 unit through (``relu(h) = h`` as
  hinges are >= 0) and adds ``relu(h1 - h2)`` per min-term, so ``min(h1, h2) = h1 - relu(h1 - h2)``
  is read off linearly by the output layer. The network is exact for the *substituted* model,
  not for pyearth's product model, and the check below compares against the substituted one.

Padding to a requested width leaves the function unchanged:
  * ``"random"`` (default): extra units with He-scaled random incoming weights and zero outgoing
    weights (they get gradients through their outgoing weights, so they can be recruited);
  * ``"duplicate"``: copies of existing units with the outgoing weight split in half (note:
    copies receive identical gradients, so they add no capacity under plain gradient descent).

Every build is checked: float32 network vs float64 model on the given inputs plus random points,
``|net - model| < atol * max(1, |model|)`` with ``atol = 1e-5`` at every point, else
:class:`ConstructionError` is raised. That is the absolute 1e-5 bound wherever outputs are O(1)
(standardised targets, centred logits); for larger outputs it becomes relative, because float32
itself cannot resolve 1e-5 at, say, 400 (its spacing there is 3e-5).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from dfkd_deploy.core.errors import DfkdError, UsageError
from dfkd_deploy.spline.mars import Factor, MarsModel

__all__ = ["ConstructionError", "build_network", "check_network", "required_widths"]


class ConstructionError(DfkdError):
    """The constructed network does not reproduce the MARS model (a bug, not a user error)."""

    exit_code = 1


def _unit_key(f: Factor) -> tuple:
    return (f.variable, round(f.knot, 12) if f.direction else 0.0, f.direction)


def _first_layer(model: MarsModel):
    """Hinge/linear units of layer 1 (deduplicated) and, per factor key, its unit index or
    (pos, neg) pair for linear factors."""
    rows, biases, index = [], [], {}
    D = model.n_features
    for term in model.terms:
        for f in term.factors:
            key = _unit_key(f)
            if key in index:
                continue
            e = np.zeros(D)
            e[f.variable] = 1.0
            if f.direction == 0:       # x = relu(x) - relu(-x)
                index[key] = (len(rows), len(rows) + 1)
                rows += [e, -e]
                biases += [0.0, 0.0]
            else:
                index[key] = len(rows)
                rows.append(f.direction * e)
                biases.append(-f.direction * f.knot)
    W = np.stack(rows) if rows else np.zeros((0, D))
    return W, np.asarray(biases, dtype=np.float64), index


def _exact_layers(model: MarsModel) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(W, b), ...] in float64 for the unpadded exact network."""
    W1, b1, index = _first_layer(model)
    K, H1 = model.n_outputs, W1.shape[0]

    def read_factor(f: Factor, out_col: np.ndarray, c: np.ndarray, offset_of) -> None:
        """Add c * factor to the output weights (columns are units of the last hidden layer)."""
        idx = index[_unit_key(f)]
        if isinstance(idx, tuple):
            out_col[:, offset_of(idx[0])] += c
            out_col[:, offset_of(idx[1])] -= c
        else:
            out_col[:, offset_of(idx)] += c

    if all(t.degree == 1 for t in model.terms):
        Wo = np.zeros((K, H1))
        for i, term in enumerate(model.terms):
            read_factor(term.factors[0], Wo, model.coef[:, i], lambda u: u)
        return [(W1, b1), (Wo, model.intercept.copy())]

    if any(f.direction == 0 for t in model.terms if t.degree == 2 for f in t.factors):
        raise UsageError("degree-2 MARS terms with linear factors have no min() stand-in; fit with allow_linear=False")
    mins = [i for i, t in enumerate(model.terms) if t.degree == 2]
    H2 = H1 + len(mins)
    W2 = np.zeros((H2, H1))
    W2[:H1, :H1] = np.eye(H1)                     # pass-through: relu(h) = h for h >= 0
    Wo = np.zeros((K, H2))
    for r, i in enumerate(mins):
        a, b = (index[_unit_key(f)] for f in model.terms[i].factors)
        W2[H1 + r, a] += 1.0                       # relu(h_a - h_b)
        W2[H1 + r, b] -= 1.0
        Wo[:, a] += model.coef[:, i]               # c * (h_a - relu(h_a - h_b)) = c * min(h_a, h_b)
        Wo[:, H1 + r] -= model.coef[:, i]
    for i, term in enumerate(model.terms):
        if term.degree == 1:
            read_factor(term.factors[0], Wo, model.coef[:, i], lambda u: u)
    return [(W1, b1), (W2, np.zeros(H2)), (Wo, model.intercept.copy())]


def required_widths(model: MarsModel) -> list[int]:
    """Hidden widths of the unpadded exact network."""
    return [W.shape[0] for W, _ in _exact_layers(model)[:-1]]


def _pad(layers, l: int, width: int, mode: str, rng: np.random.Generator):
    """Grow hidden layer ``l`` (rows of layers[l], columns of layers[l+1]) to ``width`` units
    without changing the function."""
    (W, b), (Wn, bn) = layers[l], layers[l + 1]
    extra = width - W.shape[0]
    if extra <= 0:
        return
    if mode == "random" or W.shape[0] == 0:
        fan_in = W.shape[1]
        Wx = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(extra, fan_in))
        # zero bias keeps the random units' kinks through the origin of standardised inputs
        W, b = np.concatenate([W, Wx]), np.concatenate([b, np.zeros(extra)])
        Wn = np.concatenate([Wn, np.zeros((Wn.shape[0], extra))], axis=1)
    elif mode == "duplicate":
        for r in range(extra):
            src = r % layers[l][0].shape[0]
            W, b = np.concatenate([W, W[src:src + 1]]), np.append(b, b[src])
            half = Wn[:, src] / 2.0
            Wn = np.concatenate([Wn, half[:, None]], axis=1)
            Wn[:, src] = half
    else:
        raise UsageError(f"pad must be 'random' or 'duplicate' (got {mode!r})")
    layers[l], layers[l + 1] = (W, b), (Wn, bn)


def build_network(model: MarsModel, hidden: int | Sequence[int] | None = None, *, pad: str = "random",
                  input_map: tuple[np.ndarray, np.ndarray] | None = None, check_inputs=None,
                  n_random: int = 2048, atol: float = 1e-5, seed: int = 0) -> nn.Sequential:
    """ReLU ``nn.Sequential`` computing ``model.predict`` exactly (float32), padded to ``hidden``.

    ``hidden``: width of every hidden layer (int) or one width per hidden layer (1 for degree-1
    models, 2 when the model has min-terms); ``None`` keeps the minimal widths.
    ``input_map=(A, c)``: the network takes raw ``x`` and the model sees ``z = A @ x + c``
    (e.g. a PCA projection); it is folded exactly into the first Linear layer.
    ``check_inputs``: inputs (in the network's input space) for the exactness check, usually the
    training inputs; random points around them (or standard normal ones) are always added.
    """
    rng = np.random.default_rng(seed)
    layers = _exact_layers(model)
    n_hidden = len(layers) - 1
    if hidden is not None:
        widths = [int(hidden)] * n_hidden if np.isscalar(hidden) else [int(h) for h in hidden]
        if len(widths) != n_hidden:
            raise UsageError(f"hidden: {len(widths)} widths given for {n_hidden} hidden layers")
        need = [W.shape[0] for W, _ in layers[:-1]]
        if any(w < n for w, n in zip(widths, need)):
            raise UsageError(f"the exact MARS network needs hidden widths {need} but hidden={widths}; "
                             "raise --hidden or lower max_terms")
    else:
        widths = [max(1, W.shape[0]) for W, _ in layers[:-1]]
    if input_map is not None:
        A, c = (np.asarray(v, dtype=np.float64) for v in input_map)
        W1, b1 = layers[0]
        layers[0] = (W1 @ A, W1 @ c + b1)   # W1 (A x + c) + b1
    for l, w in enumerate(widths):
        _pad(layers, l, w, pad, rng)

    mods: list[nn.Module] = []
    for i, (W, b) in enumerate(layers):
        lin = nn.Linear(W.shape[1], W.shape[0])
        with torch.no_grad():
            lin.weight.copy_(torch.as_tensor(W, dtype=torch.float32))
            lin.bias.copy_(torch.as_tensor(b, dtype=torch.float32))
        mods.append(lin)
        if i < len(layers) - 1:
            mods.append(nn.ReLU())
    net = nn.Sequential(*mods)

    d_in = layers[0][0].shape[1]
    if input_map is None:
        reference = model.predict
    else:
        reference = lambda X: model.predict(X @ A.T + c)  # noqa: E731
    check_network(net, reference, _check_points(check_inputs, d_in, n_random, rng), atol=atol)
    return net


def _check_points(X, d_in: int, n_random: int, rng: np.random.Generator) -> np.ndarray:
    """Given inputs plus random ones: jittered copies of given rows and uniform draws from their
    (widened) bounding box, so every linear region near the data is probed, not only the data."""
    if X is None:
        return rng.normal(size=(n_random, d_in))
    X = np.asarray(X, dtype=np.float64)
    lo, hi = X.min(0), X.max(0)
    span = np.where(hi > lo, hi - lo, 1.0)
    jitter = X[rng.integers(0, len(X), n_random // 2)] + 0.1 * span * rng.normal(size=(n_random // 2, d_in))
    box = rng.uniform(lo - 0.1 * span, hi + 0.1 * span, size=(n_random - n_random // 2, d_in))
    return np.concatenate([X, jitter, box])


def check_network(net: nn.Module, reference: Callable[[np.ndarray], np.ndarray], X: np.ndarray,
                  *, atol: float = 1e-5) -> float:
    """Raise :class:`ConstructionError` unless ``net(X)`` (float32) matches ``reference(X)``
    (float64): ``|diff| < atol * max(1, |reference|)`` pointwise (see the module note).
    Returns the max abs diff."""
    X = np.asarray(X, dtype=np.float64)
    with torch.no_grad():
        got = net(torch.as_tensor(X, dtype=torch.float32)).double().numpy()
    want = np.asarray(reference(X), dtype=np.float64).reshape(got.shape)
    if not got.size:
        return 0.0
    err = np.abs(got - want)
    diff = float(err.max())
    worst = float((err / np.maximum(1.0, np.abs(want))).max())
    if not np.isfinite(diff) or not worst < atol:
        raise ConstructionError(f"MARS network disagrees with the MARS model: max abs diff {diff:.3g} "
                                f"(scaled {worst:.3g} >= {atol:g}) on {len(X)} points")
    return diff
