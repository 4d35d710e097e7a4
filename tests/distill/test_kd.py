import pytest
import torch
import torch.nn.functional as F

from dfkd_deploy.distill.kd import kd_kl


def test_kd_kl_is_hintons_loss_at_temperature_t():
    t, s = torch.randn(6, 5), torch.randn(6, 5)
    ref = F.kl_div(F.log_softmax(s / 4, 1), F.softmax(t / 4, 1), reduction="batchmean") * 16
    assert torch.allclose(kd_kl(s, t, 4.0), ref, atol=1e-5)
    assert torch.allclose(kd_kl(t, t, 2.0), torch.zeros(()), atol=1e-6)


def test_derived_students_are_fine_tuned_at_a_lower_lr():
    from dfkd_deploy.distill.trainer import kd_lr
    from dfkd_deploy.recipe import load_recipe

    base = {"distillation.lr": 0.2, "student.derived.lr_scale": 0.1}
    assert kd_lr(load_recipe(None, base)) == 0.2
    for init in ("prune", "depth"):
        assert kd_lr(load_recipe(None, {**base, "student.init": init})) == pytest.approx(0.02)
