"""Stand-in statistics on 1/f noise for teachers without BN statistics (synthesis.priors.proxy)."""
import pytest
import torch
from torch import nn

from dfkd_deploy.core.errors import UsageError
from dfkd_deploy.recipe import load_recipe
from dfkd_deploy.synthesis.losses import InversionLoss
from dfkd_deploy.synthesis.proxy_stats import ProxyStatistics, power_law_noise


class _ConvNet(nn.Module):
    """Six biased convolutions and no BN, like a folded export; optionally run in fixed chunks."""

    def __init__(self, chunk: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.convs = nn.ModuleList([nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1) for i in range(6)])
        self.fc = nn.Linear(8, 4)
        self.chunk = chunk

    def _forward(self, x):
        for c in self.convs:
            x = torch.relu(c(x))
        return self.fc(x.mean((2, 3)))

    def forward(self, x):
        if self.chunk is None:
            return self._forward(x)
        return torch.cat([self._forward(x[i:i + self.chunk]) for i in range(0, len(x), self.chunk)])


def _identity(x):
    return x


def test_power_law_noise_is_seeded_in_range_and_spatially_smooth():
    a = power_law_noise(8, (3, 32, 32), generator=torch.Generator().manual_seed(1))
    b = power_law_noise(8, (3, 32, 32), generator=torch.Generator().manual_seed(1))
    assert a.shape == (8, 3, 32, 32) and torch.equal(a, b)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    # neighbouring pixels of 1/f^1.5 noise are far more alike than those of white noise
    white = torch.rand(8, 3, 32, 32)
    tv = lambda x: (x[..., 1:] - x[..., :-1]).abs().mean()  # noqa: E731
    assert tv(a) < 0.3 * tv(white)


def test_targets_are_the_first_third_of_the_convolutions_in_call_order_and_match_the_noise():
    net = _ConvNet().eval()
    proxy = ProxyStatistics(net, _identity, (3, 16, 16), images=64, seed=3)
    assert proxy.available
    assert proxy.layer_names == ["convs.0", "convs.1"]
    noise = power_law_noise(64, (3, 16, 16), generator=torch.Generator().manual_seed(3))
    with proxy.capture():
        net(noise)
    assert float(proxy.loss().detach()) < 1e-3                 # the same images: the targets themselves
    with proxy.capture():
        net(torch.rand(64, 3, 16, 16))
    assert float(proxy.loss().detach()) > 0.1                  # white noise is not 1/f noise
    before = list(proxy.fired)
    with torch.no_grad():
        net(noise)                                    # outside capture: nothing recorded
    assert proxy.fired == before
    proxy.remove()
    assert all(not c._forward_hooks for c in net.convs)


def test_loss_gives_the_input_a_gradient_and_is_scale_free():
    net = _ConvNet().eval()
    proxy = ProxyStatistics(net, _identity, (3, 16, 16), images=32)
    x = torch.rand(16, 3, 16, 16, requires_grad=True)
    with proxy.capture():
        net(x)
    loss = proxy.loss()
    loss.backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    # a teacher whose first conv is 10x larger (an arbitrary folded scale) gets the same loss
    big = _ConvNet().eval()
    with torch.no_grad():
        big.convs[0].weight.mul_(10)
        big.convs[0].bias.mul_(10)
        big.convs[1].weight.div_(10)
    proxy_big = ProxyStatistics(big, _identity, (3, 16, 16), images=32)
    with torch.no_grad(), proxy.capture(), proxy_big.capture():
        y = torch.rand(16, 3, 16, 16)
        net(y)
        big(y)
    assert abs(float(proxy.loss().detach()) - float(proxy_big.loss())) < 1e-3


def test_a_teacher_run_in_chunks_has_its_chunks_pooled():
    whole, chunked = _ConvNet().eval(), _ConvNet(chunk=4).eval()
    p_whole = ProxyStatistics(whole, _identity, (3, 16, 16), images=32)
    p_chunked = ProxyStatistics(chunked, _identity, (3, 16, 16), images=32)
    for a, b in zip(p_whole.targets.values(), p_chunked.targets.values()):
        assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1], b[1], rtol=1e-4)
    x = torch.rand(16, 3, 16, 16)
    with torch.no_grad(), p_whole.capture(), p_chunked.capture():
        whole(x)
        chunked(x)
    assert abs(float(p_whole.loss()) - float(p_chunked.loss())) < 1e-4


def test_inversion_loss_adds_the_proxy_term_and_refuses_it_where_there_are_no_convolutions():
    opts = load_recipe(None, {"synthesis.priors.proxy": 2.0}).synthesis
    net = _ConvNet().eval()
    priors = {"tv": 0.0, "l2": 0.0, "entropy": 0.0, "activation": 0.0, "proxy": 2.0, "ranges": 0.0}
    loss = InversionLoss(net, _identity, opts, priors, use_bn_statistics=False, input_shape=(3, 16, 16))
    terms = loss(torch.rand(8, 3, 16, 16), torch.zeros(8, dtype=torch.long))
    assert float(terms.prior) > 0
    loss.remove()
    assert all(not c._forward_hooks for c in net.convs)

    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4))
    with pytest.raises(UsageError, match="synthesis.priors.proxy"):
        InversionLoss(mlp, _identity, opts, priors, use_bn_statistics=False, input_shape=(3, 16, 16),
                      explicit_proxy=True)
    auto = InversionLoss(mlp, _identity, opts, priors, use_bn_statistics=False, input_shape=(3, 16, 16))
    assert auto.proxy is None and auto.priors["proxy"] == 0.0
    assert any("proxy" in n for n in auto.notes)


def test_inspect_and_plan_weights_drop_the_proxy_where_the_teacher_cannot_have_it(digits_teacher):
    import dataclasses

    from dfkd_deploy.synthesis.priors import BN_FREE_ADV, synthesis_weights
    from dfkd_deploy.synthesis.proxy_stats import proxy_applicable
    from dfkd_deploy.teachers.spec import Teacher

    opts = load_recipe(None, {}).synthesis
    bn_free = dataclasses.replace(digits_teacher.spec, bn_layers=0)
    conv = Teacher(digits_teacher.module, bn_free)
    mlp = Teacher(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), bn_free)
    assert proxy_applicable(conv.module, bn_free.input_shape) and not proxy_applicable(mlp.module, bn_free.input_shape)
    on = synthesis_weights(conv, opts)
    assert on["priors"]["proxy"] > 0 and on["adversarial_weight"] == min(opts.adv, BN_FREE_ADV)
    off = synthesis_weights(mlp, opts)
    assert "proxy" not in off["priors"] and off["adversarial_weight"] == opts.adv   # as measured: MLPs keep adv
    with_bn = synthesis_weights(digits_teacher, opts)
    assert with_bn == {"priors": {}, "adversarial_weight": opts.adv}
