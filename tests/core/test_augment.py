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
