import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfkd_deploy.models import build_model
from dfkd_deploy.synthesis.losses import (BNStatistics, PenultimateFeatures, activation_l1,
                                          adversarial_kl, channel_moments, class_balance, kl_per_sample,
                                          l2_prior, total_variation)
from dfkd_deploy.teachers import count_batchnorms, find_batchnorms
from dfkd_deploy._compat import import_onnx2torch


def _functional_bn_net():
    """A net whose BN is onnx2torch's functional OnnxBatchNorm (stats passed as inputs)."""
    OnnxBatchNorm = import_onnx2torch().node_converters.batch_norm.OnnxBatchNorm

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = OnnxBatchNorm(momentum=0.1, epsilon=1e-5)
            self.register_buffer("w", torch.ones(4))
            self.register_buffer("b", torch.zeros(4))
            self.register_buffer("rm", torch.randn(4))
            self.register_buffer("rv", torch.rand(4) + 0.5)

        def forward(self, x):
            return self.bn(self.conv(x), self.w, self.b, self.rm, self.rv).mean((2, 3))

    return Net().eval()


def test_hooks_find_every_batchnorm_in_zoo_models():
    for arch, expected in [("cifar_resnet20", 19), ("cifar_resnet56", 55), ("small_cnn", 3)]:
        model = build_model(arch, num_classes=10)
        assert count_batchnorms(model) == expected
        stats = BNStatistics(model)
        assert len(stats) == expected
        with stats.capture():
            model.eval()(torch.randn(2, 3, 32, 32))
        assert len(stats.terms) == expected   # every hook fired once


def test_hooks_find_onnx2torch_functional_batchnorm():
    net = _functional_bn_net()
    assert [n for n, _ in find_batchnorms(net)] == ["bn"]
    stats = BNStatistics(net)
    x = torch.randn(8, 3, 6, 6)
    with stats.capture():
        net(x)
    feat = net.conv(x)
    var, mean = torch.var_mean(feat, dim=(0, 2, 3), unbiased=False)
    expected = torch.linalg.vector_norm(net.rv - var) + torch.linalg.vector_norm(net.rm - mean)
    assert torch.allclose(stats.loss(), expected.detach(), atol=1e-5)


def test_bn_loss_is_zero_when_batch_matches_running_stats_and_hooks_idle_outside_capture():
    bn = nn.BatchNorm2d(3).eval()
    x = torch.randn(16, 3, 5, 5)
    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)
    stats = BNStatistics(bn)
    bn(x)
    assert stats.terms == []          # no capture: no work
    with stats.capture():
        bn(x)
    assert stats.loss().item() < 1e-5


def test_bn_momentum_blends_previous_batches():
    bn = nn.BatchNorm2d(2).eval()
    stats = BNStatistics(bn, momentum=0.9)
    a, b = torch.zeros(4, 2, 3, 3), torch.ones(4, 2, 3, 3)
    with stats.capture():
        bn(a)
    stats.update_ema()
    with stats.capture():
        bn(b)
    # blended mean = 0.1 * 1 + 0.9 * 0 = 0.1 per channel; running mean 0, var 1; blended var 0
    expected = torch.linalg.vector_norm(torch.ones(2)) + torch.linalg.vector_norm(torch.full((2,), 0.1))
    assert torch.allclose(stats.loss(), expected, atol=1e-6)
    restored = BNStatistics(bn, momentum=0.9)
    restored.load_state_dict(stats.state_dict())
    assert torch.equal(restored.hooks[0].ema[0], stats.hooks[0].ema[0])


def test_kl_terms():
    t = torch.randn(6, 5)
    assert torch.allclose(kl_per_sample(t, t), torch.zeros(6), atol=1e-6)
    # adversarial term only counts samples where student and teacher agree on the class
    s_agree = t.clone()
    s_agree[:, 0] -= 0.5
    disagree = torch.zeros(6, 5)
    disagree[torch.arange(6), (t.argmax(1) + 1) % 5] = 10
    assert adversarial_kl(disagree, t).item() == 0
    assert adversarial_kl(s_agree, t).item() <= 0


# --------------------------------------------------------------------------- fast moments and fused BN


@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_moments_match_var_mean_with_gradients(channels_last):
    x = torch.randn(6, 5, 7, 4) * 3 + 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w1, w2 = torch.randn(5), torch.randn(5)
    mean, var = channel_moments(x)
    (mean * w1 + var * w2).sum().backward()
    got = x.grad.clone()
    x.grad = None
    ref_var, ref_mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    (ref_mean * w1 + ref_var * w2).sum().backward()
    assert torch.allclose(mean, ref_mean, atol=1e-5) and torch.allclose(var, ref_var, rtol=1e-4, atol=1e-4)
    assert torch.allclose(got, x.grad, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_moments_in_bf16_stay_close_and_return_bf16_gradients(channels_last):
    x = torch.randn(8, 4, 6, 6)
    xb = x.bfloat16()
    if channels_last:
        xb = xb.contiguous(memory_format=torch.channels_last)
    xb.requires_grad_(True)
    mean, var = channel_moments(xb)
    assert mean.dtype == torch.float32
    (mean.sum() + var.sum()).backward()
    ref_var, ref_mean = torch.var_mean(xb.detach().float(), dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(mean, ref_mean, atol=1e-4) and torch.allclose(var, ref_var, rtol=1e-3)
    expected = (1 + 2 * (xb.detach().float() - ref_mean.view(1, -1, 1, 1))) / (8 * 36)
    assert xb.grad.dtype == torch.bfloat16
    assert torch.allclose(xb.grad.float(), expected, rtol=0.02, atol=1e-4)


def _teacher_with_random_bn_stats():
    torch.manual_seed(1)
    model = build_model("cifar_resnet8", num_classes=10).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_bn_path_equals_plain_hooks_in_output_loss_and_gradient(channels_last):
    model = _teacher_with_random_bn_stats()
    x = torch.randn(6, 3, 16, 16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def run(fused: bool):
        stats = BNStatistics(model, momentum=0.0)
        if not fused:
            for h in stats.hooks:
                h.install = lambda: None       # force the forward-hook path
        xi = x.clone().requires_grad_(True)
        with stats.capture():
            out = model(xi)
        loss = stats.loss()
        (out.square().mean() + loss).backward()
        stats.remove()
        return out.detach(), loss.detach(), xi.grad, len(stats.terms)

    fused, plain = run(True), run(False)
    assert fused[3] == plain[3] == count_batchnorms(model)
    assert torch.equal(fused[0], plain[0])                       # BN output bit-identical
    assert torch.allclose(fused[1], plain[1], rtol=1e-5)
    assert torch.allclose(fused[2], plain[2], rtol=1e-4, atol=1e-6)
    # the swap is undone after capture: the module's own forward is back
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_fused_path_serves_onnx2torch_functional_batchnorm():
    net = _functional_bn_net()
    stats = BNStatistics(net)
    x = torch.randn(8, 3, 6, 6, requires_grad=True)
    with stats.capture():
        assert "forward" in net.bn.__dict__          # the fused forward is swapped in
        out = net(x)
    assert len(stats.terms) == 1 and "forward" not in net.bn.__dict__
    feat = net.conv(x)
    var, mean = torch.var_mean(feat, dim=(0, 2, 3), unbiased=False)
    expected = torch.linalg.vector_norm(net.rv - var) + torch.linalg.vector_norm(net.rm - mean)
    assert torch.allclose(stats.loss(), expected, atol=1e-5)
    ref = F.batch_norm(feat, net.rm, net.rv, net.w, net.b, False, 0.0, 1e-5).mean((2, 3))
    assert torch.allclose(out, ref, atol=1e-6)


# --------------------------------------------------------------------------- priors without BN statistics


def test_total_variation_l2_and_class_balance_values():
    flat = torch.full((2, 3, 5, 5), 0.3)
    assert total_variation(flat).item() == 0
    stripes = torch.zeros(1, 1, 4, 4)
    stripes[..., ::2] = 1.0                         # columns alternate 0/1
    # horizontal: every pair differs (1); vertical: none (0); both diagonals: every pair (1)
    assert total_variation(stripes).item() == pytest.approx(3.0)
    assert l2_prior(torch.full((2, 3, 4, 4), 2.0)).item() == pytest.approx(4.0)
    uniform = torch.zeros(4, 10)
    assert class_balance(uniform).item() == pytest.approx(0.0, abs=1e-6)
    one_class = torch.zeros(4, 10)
    one_class[:, 3] = 50
    assert class_balance(one_class).item() == pytest.approx(math.log(10), abs=1e-3)
    assert activation_l1(torch.tensor([[1.0, -3.0]])).item() == -2.0


class _OutOfOrder(nn.Module):
    """The classifier Linear is registered before the hidden one but runs last."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(6, 3)
        self.hidden = nn.Linear(4, 6)

    def forward(self, x):
        return self.head(torch.relu(self.hidden(x)))


def test_penultimate_features_are_the_input_of_the_last_linear_to_run():
    net = _OutOfOrder()
    feats = PenultimateFeatures(net)
    x = torch.randn(5, 4)
    with feats.capture():
        net(x)
    assert torch.allclose(feats.features(), torch.relu(net.hidden(x)))
    net(x)                                    # outside capture: nothing recorded
    assert len(feats.fired) == 2
    feats.remove()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_penultimate_features_fall_back_to_the_last_conv_and_report_script_modules():
    conv_head = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 10, 1), nn.Flatten())
    feats = PenultimateFeatures(conv_head)
    x = torch.randn(2, 3, 3, 3)
    with feats.capture():
        conv_head(x)
    assert feats.available and feats.features().shape == (2, 4)
    scripted = torch.jit.script(nn.Sequential(nn.Linear(3, 2)))
    assert not PenultimateFeatures(scripted).available
