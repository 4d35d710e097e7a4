"""KD batch mixing (``distillation.mix``): mixup blends pairs of images, cutmix pastes a box."""
from __future__ import annotations

import pytest
import torch

from dfkd_deploy.core.augment import mix_batch


def _batch():
    torch.manual_seed(0)
    return torch.rand(8, 3, 16, 16)


def test_none_is_the_batch_itself():
    x = _batch()
    assert mix_batch(x, "none") is x


def test_mixup_is_one_convex_blend_of_two_images_per_row():
    x = _batch()
    torch.manual_seed(1)
    out = mix_batch(x, "mixup", 1.0)
    assert out.shape == x.shape and not torch.equal(out, x)
    flat, src = out.flatten(1), x.flatten(1)
    for row in flat:   # row = lam x_i + (1 - lam) x_j for some i, j and one lam in [0, 1]
        best = min(float(torch.linalg.lstsq(torch.stack([src[i], src[j]], 1), row[:, None]).residuals.sum())
                   for i in range(8) for j in range(8))
        assert best < 1e-6


def test_cutmix_pastes_one_box_from_another_image():
    x = _batch()
    torch.manual_seed(2)
    out = mix_batch(x, "cutmix", 1.0)
    changed = (out != x).any(1).any(0)             # (H, W): where any image changed
    ys, xs = torch.nonzero(changed, as_tuple=True)
    assert len(ys), "no box was pasted"
    box = changed[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    assert box.all() and int(changed.sum()) == box.numel()     # one rectangle, the same for every image
    for i in range(8):   # the box of row i is some image's box, the rest is its own
        patch = out[i, :, ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        assert any(torch.equal(patch, x[j, :, ys.min():ys.max() + 1, xs.min():xs.max() + 1]) for j in range(8))


def test_mixing_follows_the_seed():
    x = _batch()
    torch.manual_seed(3)
    a = mix_batch(x, "cutmix", 0.5)
    torch.manual_seed(3)
    assert torch.equal(a, mix_batch(x, "cutmix", 0.5))


def test_mix_needs_recomputed_teacher_logits():
    from dfkd_deploy.core.errors import RecipeError
    from dfkd_deploy.recipe import load_recipe

    with pytest.raises(RecipeError, match="mix needs teacher_logits: recompute"):
        load_recipe(None, {"distillation.mix": "mixup", "distillation.teacher_logits": "cached"})


@pytest.mark.parametrize("sets, expected", [
    ({"budget": "10m"}, "cutmix"),                                              # the budgeted default
    ({}, "none"),                                                               # fixed-epoch recipes as before
    ({"budget": "10m", "distillation.teacher_logits": "cached"}, "none"),       # cached logits cannot mix
    ({"budget": "10m", "distillation.mix": "none"}, "none"),                    # the user's choice stands
    ({"distillation.mix": "mixup"}, "mixup"),
])
def test_auto_mix_resolves_when_the_recipe_loads(sets, expected):
    import yaml

    from dfkd_deploy.recipe import BUDGETED_MIX, load_recipe

    assert BUDGETED_MIX == "cutmix"
    recipe = load_recipe(None, sets)
    assert recipe.distillation.mix == expected
    # recipe.resolved.yaml (what a resume and a reader see) holds the value, never "auto"
    assert yaml.safe_load(recipe.resolved_yaml())["distillation"]["mix"] == expected
    assert load_recipe(None, {**sets, **{"distillation.mix": expected}}).distillation.mix == expected
