"""The views the inversion loss shows the teacher: crop + flip, and the optional zoom and colour
shift of ``synthesis.augment``."""
import torch
from torch import nn

from dfkd_deploy.recipe import load_recipe
from dfkd_deploy.synthesis.losses import InversionLoss

NO_PRIORS = {"tv": 0.0, "l2": 0.0, "entropy": 0.0, "activation": 0.0, "proxy": 0.0, "ranges": 0.0}


class _Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 4)
        self.seen = None

    def forward(self, x):
        self.seen = x.detach().clone()
        return self.fc(x.flatten(1))


def _seen(augment: dict, pixels: torch.Tensor) -> torch.Tensor:
    opts = load_recipe(None, {f"synthesis.augment.{k}": v for k, v in augment.items()}).synthesis
    teacher = _Recorder()
    loss = InversionLoss(teacher, nn.Identity(), opts, dict(NO_PRIORS), use_bn_statistics=False)
    torch.manual_seed(0)
    loss(pixels, torch.zeros(len(pixels), dtype=torch.long))
    return teacher.seen


def test_views_default_to_crop_and_flip_only_and_add_zoom_and_colour_shift_when_asked():
    pixels = torch.rand(6, 3, 8, 8)
    plain = {"crop_padding": 0, "flip": False}
    assert torch.equal(_seen(plain, pixels), pixels)
    zoomed = _seen({**plain, "zoom": 0.5}, pixels)
    assert zoomed.shape == pixels.shape and not torch.allclose(zoomed, pixels)
    shifted = _seen({**plain, "color_shift": 1.0}, pixels)
    assert not torch.allclose(shifted, pixels)
    # a colour shift is affine per sample and channel: the spatial pattern's correlation stays 1
    a, b = pixels[0, 0].flatten(), shifted[0, 0].flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.9999


def test_recipe_takes_and_bounds_the_view_options():
    import pytest

    from dfkd_deploy.core.errors import RecipeError

    r = load_recipe(None, {"synthesis.augment.zoom": 0.4, "synthesis.augment.color_shift": 1.0})
    assert (r.synthesis.augment.zoom, r.synthesis.augment.color_shift) == (0.4, 1.0)
    with pytest.raises(RecipeError):
        load_recipe(None, {"synthesis.augment.zoom": 1.0})
