"""`student.head: {type: mlp, init: mars}`: head surgery, the MARS fit inside distillation, and
student.pt round trips."""
import numpy as np
import pytest
import torch
from torch import nn

from dfkd_deploy.run import build_student, make_synthesizer
from dfkd_deploy.distill.trainer import Distiller, seed_everything
from dfkd_deploy.core.errors import RecipeError
from dfkd_deploy.models import build_model
from dfkd_deploy.models.heads import attach_mlp_head, head_config, head_name, penultimate_features
from dfkd_deploy.students.student_file import load_student, save_student
from dfkd_deploy.recipe import load_recipe
from dfkd_deploy.synthesis.pool import ImagePool

from ..conftest import quick_recipe

pytest.importorskip("pyearth")


@pytest.mark.parametrize("arch,expected", [("cifar_resnet8", "linear"), ("tiny_cnn", "linear"),
                                           ("resnet18", "fc"), ("mobilenet_v2", "classifier.1")])
def test_head_is_found_and_replaced_on_every_family(arch, expected):
    model = build_model(arch, num_classes=10, in_channels=3, input_size=(32, 32))
    assert head_name(model, 10) == expected
    x = torch.randn(2, 3, 32, 32)
    d = penultimate_features(model.eval(), x, 10).shape[1]
    attach_mlp_head(model, 10, hidden=24)
    head = model.get_submodule(expected)
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Linear]
    assert head[0].in_features == d and head[2].out_features == 10
    assert model(x).shape == (2, 10)
    assert head_config(model, 10) == {"type": "mlp", "hidden": 24}
    # the features are still read at the head's input after the swap
    assert penultimate_features(model, x, 10).shape == (2, d)


def test_recipe_rejects_inconsistent_head():
    with pytest.raises(RecipeError, match="init: mars needs type: mlp"):
        load_recipe(None, {"student.head.init": "mars"})
    with pytest.raises(RecipeError, match="hidden >= 64"):
        load_recipe(None, {"student.head": {"type": "mlp", "init": "mars", "hidden": 16, "max_terms": 32}})
    r = load_recipe(None, {"student.head": {"type": "mlp", "init": "mars", "hidden": 64}})
    assert r.student.head.max_terms == 32 and r.student.head.pca_dims == 32


def _recipe(init, **extra):
    return quick_recipe(**{"student.arch": "tiny_cnn",
                           "student.head": {"type": "mlp", "hidden": 32, "init": init, "max_terms": 12,
                                            "pca_dims": 8, "fit_images": 200},
                           "synthesis.batch_size": 64, "distillation.epochs": 5, "distillation.warmup": 3,
                           "distillation.kd_steps": 3, **extra})


def _run(teacher, recipe, run_dir):
    seed_everything(recipe.seed)
    student = build_student(recipe, teacher)
    synth = make_synthesizer(teacher, recipe, "cpu")
    dist = Distiller(teacher.module, teacher.normalizer(), student, synth, ImagePool(run_dir / "pool"),
                     recipe, run_dir, "cpu", show_progress=False)
    dist.run()
    return student, dist


def test_mars_head_is_fitted_once_at_the_end_of_warmup(digits_teacher, tmp_path):
    recipe = _recipe("mars")
    student, dist = _run(digits_teacher, recipe, tmp_path / "mars")
    fitted = [row for row in dist.history if "head_fit_seconds" in row]
    assert [row["epoch"] for row in fitted] == [recipe.distillation.warmup + 1]
    row = fitted[0]
    assert 1 <= row["head_terms"] and row["head_fit_images"] == 200   # fit_images cap (pool: 4 rounds of 64)
    # the fitted head agrees with the teacher far better than the random head it replaced
    assert row["head_agreement_after"] > row["head_agreement_before"] + 0.2
    assert row["head_agreement_after"] > 0.5
    head = student.linear
    assert head[0].out_features == 32   # the fit never outgrows the configured width
    terms = (tmp_path / "mars" / "head_mars_terms.md").read_text()
    assert "MARS terms" in terms and "class9" in terms

    # same recipe with a random head: same structure, no fit, different head weights
    rand_student, rand_dist = _run(digits_teacher, _recipe("random"), tmp_path / "random")
    assert not any("head_fit_seconds" in r for r in rand_dist.history)
    assert head_config(rand_student, 10) == head_config(student, 10) == {"type": "mlp", "hidden": 32}
    assert not torch.equal(rand_student.linear[0].weight, student.linear[0].weight)


def test_fitted_head_survives_student_pt_round_trip(digits_teacher, tmp_path):
    recipe = _recipe("mars", **{"distillation.epochs": 4})
    student, _ = _run(digits_teacher, recipe, tmp_path / "run")
    path = save_student(tmp_path / "student.pt", student, arch="tiny_cnn", num_classes=10,
                        input_shape=(1, 8, 8), teacher_spec={})
    loaded, meta = load_student(path)
    assert meta["head"] == {"type": "mlp", "hidden": 32}
    x = torch.rand(16, 1, 8, 8)
    student.eval()
    assert torch.allclose(loaded(x), student(x), atol=1e-6)


def test_fit_leaves_bn_buffers_and_resume_does_not_refit(digits_teacher, tmp_path):
    recipe = _recipe("mars")
    seed_everything(recipe.seed)
    student = build_student(recipe, digits_teacher)
    synth = make_synthesizer(digits_teacher, recipe, "cpu")
    run_dir = tmp_path / "r"
    dist = Distiller(digits_teacher.module, digits_teacher.normalizer(), student, synth,
                     ImagePool(run_dir / "pool"), recipe, run_dir, "cpu", show_progress=False)
    dist.run(until_epoch=3)
    buffers = {k: v.clone() for k, v in student.named_buffers()}
    dist.epoch_fit = dist._fit_head()     # the fit alone, outside KD
    assert all(torch.equal(buffers[k], v) for k, v in student.named_buffers())

    # a run stopped after the fit epoch and resumed does not fit again
    straight, d1 = _run(digits_teacher, recipe, tmp_path / "straight")
    seed_everything(recipe.seed)
    s2 = build_student(recipe, digits_teacher)
    first = Distiller(digits_teacher.module, digits_teacher.normalizer(), s2,
                      make_synthesizer(digits_teacher, recipe, "cpu"), ImagePool(tmp_path / "res" / "pool"),
                      recipe, tmp_path / "res", "cpu", show_progress=False)
    first.run(until_epoch=4)
    seed_everything(recipe.seed)
    s3 = build_student(recipe, digits_teacher)
    second = Distiller(digits_teacher.module, digits_teacher.normalizer(), s3,
                       make_synthesizer(digits_teacher, recipe, "cpu"), ImagePool(tmp_path / "res" / "pool"),
                       recipe, tmp_path / "res", "cpu", show_progress=False)
    second.resume()
    second.run()
    assert sum("head_fit_seconds" in r for r in second.history) == 1
    for a, b in zip(straight.state_dict().values(), s3.state_dict().values()):
        assert torch.equal(a, b)
    np.testing.assert_equal(len(second.pool), len(d1.pool))
