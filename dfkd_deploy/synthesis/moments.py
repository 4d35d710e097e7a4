"""Per-channel moments of activations, fast on CPU, with their gradients: what the BN-statistics
term and the proxy-statistics prior measure (see :mod:`dfkd_deploy.synthesis.losses`)."""
from __future__ import annotations

import torch


def channel_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel sum and sum of squares over every dim but 1, accumulated in fp32.

    Reductions run over the contiguous axis of each memory format (rows of channels for
    channels-last, the spatial axis for NCHW): much faster on CPU than reducing over (0, 2, 3)."""
    c = x.shape[1]
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        rows = x.permute(0, 2, 3, 1).reshape(-1, c).float()      # a view when x is fp32
        return rows.sum(0), (rows * rows).sum(0)
    flat = x.reshape(x.shape[0], c, -1).float()
    return flat.sum(2).sum(0), torch.linalg.vector_norm(flat, 2, dim=2).square().sum(0)


class _ChannelMoments(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        n = x.numel() // x.shape[1]
        s1, s2 = channel_sums(x.detach())
        mean = s1 / n
        var = (s2 / n - mean * mean).clamp_min(0)
        ctx.save_for_backward(x, mean)
        ctx.n = n
        return mean, var

    @staticmethod
    def backward(ctx, g_mean, g_var):
        x, mean = ctx.saved_tensors
        n = ctx.n
        g_mean = torch.zeros_like(mean) if g_mean is None else g_mean
        g_var = torch.zeros_like(mean) if g_var is None else g_var
        # d/dx of L(mean, var) = (dL/dmean - 2 mean dL/dvar) / n + (2 dL/dvar / n) x, per channel
        return channel_affine_grad(x, (g_mean - 2 * mean * g_var) / n, 2 * g_var / n, None, None)


def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance (fp32) over batch and spatial dims, differentiable."""
    return _ChannelMoments.apply(x)


def channel_affine_grad(x, a, b, g_y, scale):
    """a + b * x (+ scale * g_y), all per channel, in x's dtype.

    fp32: two fused multiply-adds. Reduced precision: the same sums as matrix products with
    diagonal matrices (rows of channels, or per-sample channel planes), because bf16
    element-wise multiply-adds are an order of magnitude slower than fp32 ones on CPU while bf16
    matrix products are fast; a diagonal C x C product costs C multiply-adds per element."""
    c = x.shape[1]
    if x.dtype == torch.float32 or x.dim() != 4:
        shape = [1, -1] + [1] * (x.dim() - 2)
        a, b = a.view(shape).to(x.dtype), b.view(shape).to(x.dtype)
        grad = torch.addcmul(a, b, x)
        return grad if g_y is None else torch.addcmul(grad, g_y, scale.view(shape).to(x.dtype))
    dt = x.dtype
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        n, _, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(-1, c)
        out = torch.addmm(a.to(dt), rows, torch.diag(b).to(dt))
        if g_y is not None:
            out.addmm_(g_y.permute(0, 2, 3, 1).reshape(-1, c), torch.diag(scale).to(dt))
        return out.view(n, h, w, c).permute(0, 3, 1, 2)
    n = x.shape[0]
    planes = x.reshape(n, c, -1)
    out = torch.baddbmm(a.to(dt).view(1, c, 1), torch.diag(b).to(dt).expand(n, c, c), planes)
    if g_y is not None:
        out.baddbmm_(torch.diag(scale).to(dt).expand(n, c, c), g_y.reshape(n, c, -1))
    return out.view_as(x)
