import torch
import torch.nn.functional as F
from torch import nn

from dfkd_deploy.models import build_model
from dfkd_deploy.synthesis.losses import BNStatistics, adversarial_kl, kd_kl, kl_per_sample
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
    s = torch.randn(6, 5)
    ref = F.kl_div(F.log_softmax(s / 4, 1), F.softmax(t / 4, 1), reduction="batchmean") * 16
    assert torch.allclose(kd_kl(s, t, 4.0), ref, atol=1e-5)
    # adversarial term only counts samples where student and teacher agree on the class
    s_agree = t.clone()
    s_agree[:, 0] -= 0.5
    disagree = torch.zeros(6, 5)
    disagree[torch.arange(6), (t.argmax(1) + 1) % 5] = 10
    assert adversarial_kl(disagree, t).item() == 0
    assert adversarial_kl(s_agree, t).item() <= 0
