"""The crop + flip augmentation that synthesis and KD share."""
import torch

from dfkd_deploy.core.augment import crop_flip


def test_crop_flip_shapes_values_and_gradient():
    x = torch.rand(5, 3, 8, 6, requires_grad=True)
    y = crop_flip(x, padding=2, flip=True, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.equal(crop_flip(x, padding=0, flip=False), x)


def test_flip_only_mirrors_each_sample_or_leaves_it():
    x = torch.rand(16, 1, 4, 4)
    y = crop_flip(x, padding=0, flip=True, generator=torch.Generator().manual_seed(3))
    flipped = [torch.equal(y[i], x[i].flip(-1)) for i in range(16)]
    same = [torch.equal(y[i], x[i]) for i in range(16)]
    assert all(f or s for f, s in zip(flipped, same)) and any(flipped) and any(same)


def test_crop_is_a_translation_with_zero_fill():
    x = torch.ones(4, 1, 5, 5)
    y = crop_flip(x, padding=1, flip=False, generator=torch.Generator().manual_seed(1))
    for img in y[:, 0]:
        zeros = int((img == 0).sum())
        assert zeros in (0, 5, 9)        # no shift, shift along one axis, or both


def test_zoom_is_off_at_zero_keeps_constants_and_is_differentiable():
    from dfkd_deploy.core.augment import zoom

    x = torch.rand(6, 3, 8, 8, requires_grad=True)
    assert zoom(x, 0.0) is x
    y = zoom(x, 0.5, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape and not torch.allclose(y, x)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    flat = torch.full((4, 1, 8, 8), 0.3)
    assert torch.allclose(zoom(flat, 0.9), flat, atol=1e-6)   # a window of a constant image is constant


def test_zoom_magnifies_a_window_inside_the_image():
    from dfkd_deploy.core.augment import zoom

    # a horizontal ramp: a zoomed view spans a narrower range of it, inside the original range
    ramp = torch.linspace(0, 1, 16).expand(8, 1, 16, 16).contiguous()
    y = zoom(ramp, 0.8, generator=torch.Generator().manual_seed(2))
    spans = y.amax((1, 2, 3)) - y.amin((1, 2, 3))
    assert (spans < 1.0).all() and (spans > 0.1).all()
    assert y.min() >= -1e-6 and y.max() <= 1 + 1e-6


def test_color_shift_is_a_bounded_affine_map_per_sample_and_channel():
    from dfkd_deploy.core.augment import color_shift

    x = torch.randn(5, 3, 4, 4)
    assert color_shift(x, 0.0) is x
    a = 0.5
    y = color_shift(x, a, generator=torch.Generator().manual_seed(0))
    for i in range(5):
        for c in range(3):
            u, v = x[i, c].flatten(), y[i, c].flatten()
            scale = ((u - u.mean()) * (v - v.mean())).sum() / (u - u.mean()).square().sum()
            offset = v.mean() - scale * u.mean()
            assert torch.allclose(v, scale * u + offset, atol=1e-5)
            assert torch.exp(torch.tensor(-a)) - 1e-5 <= scale <= torch.exp(torch.tensor(a)) + 1e-5
            assert abs(float(offset)) <= a + 1e-5
