"""A MARS-initialised classifier head for distillation: features -> teacher's tempered logits.

The student's penultimate features are usually high-dimensional (hundreds of channels) and
MARS's forward pass costs roughly O(N * D * terms^2), so the features are first reduced with
**PCA** (``torch.pca_lowrank``, randomized, centred) to ``pca_dims`` components, each scaled to
unit variance. The reduction is affine, ``z = A @ (x - mu)``, and is folded exactly into the
first Linear layer, so the returned head still takes the raw features. The fit uses at most
``max_samples`` rows and ``max_terms`` forward-pass terms, and runs pyearth's fast forward pass
(``use_fast``, ``minspan``/``endspan`` 50) without the pruning pass (which dominated the time
with 10 outputs) so the fit stays within seconds; ``max_terms`` is then the model size.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from dfkd_deploy.core.errors import UsageError
from dfkd_deploy.spline.construct import build_network, required_widths
from dfkd_deploy.spline.mars import MarsModel, fit_mars

__all__ = ["mars_head", "fit_mars_head", "HeadFit"]


@dataclass
class HeadFit:
    head: nn.Sequential
    mars: MarsModel             # fitted on the reduced features z
    A: np.ndarray               # [p, D]: z = A @ x + c
    c: np.ndarray               # [p]
    fit_seconds: float


def _reduction(X: np.ndarray, pca_dims: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, c) with z = A @ x + c: PCA to ``pca_dims`` unit-variance components, or a plain
    per-feature standardisation when ``pca_dims`` is None or >= D."""
    mu = X.mean(0)
    D = X.shape[1]
    if pca_dims is None or pca_dims >= D:
        sd = X.std(0)
        A = np.diag(1.0 / np.where(sd > 0, sd, 1.0))
    else:
        if pca_dims < 1:
            raise UsageError(f"pca_dims must be >= 1 (got {pca_dims})")
        torch.manual_seed(seed)   # pca_lowrank draws a random sketch
        _, _, V = torch.pca_lowrank(torch.as_tensor(X, dtype=torch.float64), q=pca_dims, center=True, niter=4)
        V = V.numpy()                                    # [D, p]
        sd = ((X - mu) @ V).std(0)
        A = (V / np.where(sd > 0, sd, 1.0)).T            # [p, D]
    return A, -A @ mu


def fit_mars_head(features: Tensor, teacher_logits: Tensor, *, hidden: int, temperature: float = 1.0,
                  max_terms: int = 32, pca_dims: int | None = 32, max_samples: int = 2000,
                  seed: int = 0) -> HeadFit:
    """:func:`mars_head` plus the fitted model and the reduction, for inspection."""
    X = features.detach().reshape(len(features), -1).double().cpu().numpy()
    L = teacher_logits.detach().double().cpu().numpy()
    if L.ndim != 2 or len(L) != len(X):
        raise UsageError(f"mars_head: features [N, D] and teacher_logits [N, K] must share N "
                         f"(got {tuple(features.shape)}, {tuple(teacher_logits.shape)})")
    if temperature <= 0:
        raise UsageError(f"temperature must be > 0 (got {temperature})")
    if len(X) > max_samples:   # subsample once so the reduction, fit and check see the same rows
        X, L = (v[np.random.default_rng(seed).choice(len(X), max_samples, replace=False)] for v in (X, L))
    Y = (L - L.mean(1, keepdims=True)) / temperature   # softmax-invariant centring, tempered
    A, c = _reduction(X, pca_dims, seed)
    Z = X @ A.T + c
    cap = max_terms
    while True:
        model = fit_mars(Z, Y, max_degree=1, max_terms=cap, seed=seed,
                         use_fast=True, fast_K=5, minspan=50, endspan=50, enable_pruning=False)
        units = required_widths(model)[0] if model.terms else 0
        # pyearth's forward pass adds hinges in pairs and may end a term or two past its cap;
        # refit with a lower cap rather than build a head wider than ``hidden``.
        if units <= hidden or cap <= 1:
            break
        cap = max(1, cap - (units - hidden + 1) // 2 - 1)
    head = build_network(model, hidden, input_map=(A, c), check_inputs=X, seed=seed)
    return HeadFit(head, model, A, c, model.fit_seconds)


def mars_head(features: Tensor, teacher_logits: Tensor, *, hidden: int, temperature: float,
              max_terms: int, pca_dims: int | None, max_samples: int = 2000, seed: int = 0) -> nn.Module:
    """Fit degree-1 MARS from ``features`` [N, D] to ``(teacher_logits - row mean) / temperature``
    [N, K] and return the exact ReLU head ``Linear(D, hidden) - ReLU - Linear(hidden, K)``.

    Reduction: PCA (``torch.pca_lowrank``) to ``pca_dims`` unit-variance components, folded into
    the first Linear layer; ``pca_dims=None`` means per-feature standardisation only (also
    folded). So ``head(features) ~= (teacher_logits - mean) / temperature`` and
    ``softmax(head(x))`` approximates the teacher's softmax at temperature ``temperature``.
    Extra units up to ``hidden`` have zero outgoing weights (function unchanged). Each linear
    MARS term takes two units, so ``max_terms <= hidden // 2`` always fits; otherwise a
    ``UsageError`` names the width needed. At most ``max_samples`` rows are used (seeded).
    """
    return fit_mars_head(features, teacher_logits, hidden=hidden, temperature=temperature, max_terms=max_terms,
                         pca_dims=pca_dims, max_samples=max_samples, seed=seed).head


@dataclass
class StudentHeadFit:
    fit_seconds: float
    images: int
    terms: int
    agreement_before: float     # student vs teacher top-1 on the fit images, random head
    agreement_after: float      # same images, MARS head
    terms_markdown: str


def _batches(x: Tensor, size: int):
    for i in range(0, len(x), size):
        yield x[i:i + size]


def init_student_head(student: nn.Module, teacher: nn.Module, images: Tensor, *, num_classes: int,
                      hidden: int, temperature: float, max_terms: int, pca_dims: int | None,
                      seed: int = 0, batch_size: int = 256) -> StudentHeadFit:
    """Spline initialisation of a student's MLP head, in place.

    ``images`` are normalised synthetic images (what both networks see in KD). The student's
    penultimate features are read in training mode, i.e. with batch statistics, as KD will see
    them; its BN running statistics are restored afterwards so the fit leaves no trace but the
    head. The MARS target is the teacher's logits centred per sample and divided by the KD
    temperature T (the quantities inside KD's softmax); the output layer is then multiplied by T,
    because KD divides the student's logits by T too, so the head starts at the teacher's
    centred logits.
    """
    from dfkd_deploy.models.heads import features_and_logits, load_head_weights

    device = next(student.parameters()).device
    was_training = student.training
    saved = {k: v.detach().clone() for k, v in student.named_buffers()}
    feats, t_logits, s_logits = [], [], []
    with torch.no_grad():
        student.train()
        for xb in _batches(images, batch_size):
            xb = xb.to(device)
            f, out = features_and_logits(student, xb, num_classes)
            feats.append(f.float().cpu())
            s_logits.append(out.float().cpu())
            t_logits.append(teacher(xb).float().cpu())
        for k, v in student.named_buffers():
            v.copy_(saved[k])
    F_, T_, S_ = torch.cat(feats), torch.cat(t_logits), torch.cat(s_logits)
    fit = fit_mars_head(F_, T_, hidden=hidden, temperature=temperature, max_terms=max_terms,
                        pca_dims=pca_dims, max_samples=len(F_), seed=seed)
    with torch.no_grad():
        out = fit.head[-1]
        out.weight.mul_(temperature)
        out.bias.mul_(temperature)
        after = fit.head.double()(F_.double()).float()
    load_head_weights(student, num_classes, fit.head.float())
    student.train(was_training)
    target = T_.argmax(1)
    from dfkd_deploy.spline.mars import terms_markdown

    return StudentHeadFit(fit.fit_seconds, len(F_), len(fit.mars.terms),
                          float((S_.argmax(1) == target).float().mean()),
                          float((after.argmax(1) == target).float().mean()),
                          terms_markdown(fit.mars, [f"class{i}" for i in range(num_classes)]))
