"""DeepInversion and the shared synthesizer interface, on the tiny digits teacher (onnx2torch)."""
import dataclasses

import pytest
import torch

from dfkd_deploy.run import build_student, make_probes, make_synthesizer, plan
from dfkd_deploy.distill.trainer import Distiller, seed_everything
from dfkd_deploy.core.errors import UsageError
from dfkd_deploy.models import build_model
from dfkd_deploy.synthesis.deepinversion import DeepInversionSynthesizer
from dfkd_deploy.synthesis.fast import FastSynthesizer
from dfkd_deploy.synthesis.priors import BN_FREE_PRIORS, PRIOR_NAMES
from dfkd_deploy.synthesis.pool import ImagePool
from dfkd_deploy.teachers.spec import Teacher

from ..conftest import quick_recipe


def _di_recipe(**extra):
    return quick_recipe(**{"synthesis.method": "deepinversion", "synthesis.g_steps": 30, "synthesis.lr_g": 0.1,
                           "synthesis.bn_mmt": 0.0, **extra})


def test_recipe_method_selects_the_synthesizer(digits_teacher):
    assert isinstance(make_synthesizer(digits_teacher, quick_recipe(), "cpu"), FastSynthesizer)
    synth = make_synthesizer(digits_teacher, _di_recipe(), "cpu")
    assert isinstance(synth, DeepInversionSynthesizer)
    assert synth.loss is not None and len(synth.bn_stats) > 0     # the shared loss, BN hooks on
    assert plan(digits_teacher, _di_recipe())["synthesis"]["method"] == "deepinversion"


def test_deepinversion_raises_teacher_confidence_from_noise(digits_teacher):
    c, h, w = digits_teacher.spec.input_shape
    runs = {}
    for steps in (1, 30):                  # 1 step: the starting noise, as evaluated before any update
        synth = make_synthesizer(digits_teacher, _di_recipe(**{"synthesis.batch_size": 48, "synthesis.g_steps": steps}), "cpu")
        torch.manual_seed(1)               # the same noise and labels
        runs[steps] = synth.synthesize(None)
    images, stats = runs[30]
    assert images.shape == (48, c, h, w) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    before = runs[1][1]
    assert stats.loss < before.loss / 3 and stats.bn < before.bn / 2
    # 30 steps at lr 0.1 raise the teacher's confidence in the sampled labels by about 80%
    # (0.125 -> 0.227 on an AVX2 CPU, a little more with AVX-512 kernels)
    assert stats.confidence > 1.5 * before.confidence
    assert stats.adv == 0                  # no student: no adversarial term


def test_deepinversion_interface_probes_state_and_student_untouched(digits_teacher):
    recipe = _di_recipe(**{"synthesis.g_steps": 3})
    synth = make_synthesizer(digits_teacher, recipe, "cpu")
    synth.reset_l0()                                    # no generator: a no-op
    probes = make_probes(synth, 40, 32, seed=0)
    assert probes.shape[0] == 40
    again = make_probes(make_synthesizer(digits_teacher, recipe, "cpu"), 40, 32, seed=0)
    assert torch.allclose(probes, again)                # probes are seeded
    student = build_student(recipe, digits_teacher).train()
    flags = [p.requires_grad for p in student.parameters()]
    before = [p.clone() for p in student.parameters()]
    _, stats = synth.synthesize(student, adversarial=True)
    assert stats.adv <= 0
    assert student.training and [p.requires_grad for p in student.parameters()] == flags
    assert all(p.grad is None for p in student.parameters())         # no weight gradients computed
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert set(synth.state_dict()) == {"bn_ema"}
    synth.load_state_dict(synth.state_dict())


def test_distiller_runs_deepinversion_end_to_end(digits_teacher, tmp_path):
    recipe = _di_recipe(**{"synthesis.g_steps": 4, "distillation.epochs": 3, "distillation.warmup": 1,
                           "distillation.kd_steps": 3})
    seed_everything(recipe.seed)
    student = build_student(recipe, digits_teacher)
    synth = make_synthesizer(digits_teacher, recipe, "cpu")
    d = Distiller(digits_teacher.module, digits_teacher.normalizer(), student, synth, ImagePool(tmp_path / "pool"),
                  recipe, tmp_path, "cpu", show_progress=False)
    result = d.run()
    assert result.images == 3 * recipe.synthesis.batch_size and "kd_loss" in result.history[-1]
    assert result.history[-1]["synth_confidence"] > 0


def test_bn_free_teacher_gets_prior_defaults_unless_the_recipe_sets_them(digits_teacher):
    bn_free = Teacher(digits_teacher.module, dataclasses.replace(digits_teacher.spec, bn_layers=0))
    synth = make_synthesizer(bn_free, quick_recipe(), "cpu")
    assert len(synth.bn_stats) == 0 and synth.loss.priors == {**BN_FREE_PRIORS, "ranges": 0.0}   # not int8
    assert BN_FREE_PRIORS["tv"] > 0 and BN_FREE_PRIORS["l2"] > 0          # the measured default: TV + L2
    assert synth.loss.features is None                                    # DAFL activation off: no hook
    images, stats = synth.synthesize(None)
    assert stats.bn == 0 and stats.prior != 0 and torch.isfinite(images).all()
    # explicit values win, 0 included; a BN teacher gets none by default
    synth = make_synthesizer(bn_free, quick_recipe(**{"synthesis.priors.tv": 0.0, "synthesis.priors.activation": 0.1}), "cpu")
    assert synth.loss.priors["tv"] == 0.0 and synth.loss.priors["activation"] == 0.1
    assert synth.loss.features is not None and synth.loss.features.available
    assert synth.loss.priors["entropy"] == BN_FREE_PRIORS["entropy"]
    assert synth.synthesize(None)[1].prior != 0
    assert make_synthesizer(digits_teacher, quick_recipe(), "cpu").loss.priors == {k: 0.0 for k in PRIOR_NAMES}
    di = make_synthesizer(bn_free, _di_recipe(**{"synthesis.g_steps": 2}), "cpu")
    assert di.loss.priors == {**BN_FREE_PRIORS, "ranges": 0.0}
    assert di.synthesize(None)[1].prior != 0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_explicit_activation_prior_on_an_unhookable_teacher_is_a_clear_error(digits_teacher, monkeypatch):
    scripted = torch.jit.trace(build_model("tiny_cnn", num_classes=10, in_channels=1).eval(), torch.zeros(2, 1, 8, 8))
    spec = dataclasses.replace(digits_teacher.spec, bn_layers=0)
    teacher = Teacher(scripted, spec)
    with pytest.raises(UsageError, match="synthesis.priors.activation"):
        make_synthesizer(teacher, quick_recipe(**{"synthesis.priors.activation": 0.1}), "cpu")
    auto = make_synthesizer(teacher, quick_recipe(), "cpu")   # the default has the activation term off
    assert auto.loss.priors["activation"] == 0 and not any("activation" in n for n in auto.loss.notes)
    assert auto.loss.priors["proxy"] == 0 and any("proxy" in n for n in auto.loss.notes)   # script: no hooks
    # were the automatic default on, it would be dropped with a note instead of an error
    monkeypatch.setitem(BN_FREE_PRIORS, "activation", 0.1)
    auto = make_synthesizer(teacher, quick_recipe(), "cpu")
    assert auto.loss.priors["activation"] == 0 and any("activation" in n for n in auto.loss.notes)


@pytest.mark.parametrize("method", ["fastdfkd", "deepinversion"])
def test_bf16_and_fp32_losses_agree_on_the_same_batch(digits_teacher, method):
    recipes = {p: (_di_recipe if method == "deepinversion" else quick_recipe)(**{"synthesis.precision": p})
               for p in ("fp32", "bf16")}
    synths = {p: make_synthesizer(digits_teacher, r, "cpu") for p, r in recipes.items()}
    assert synths["bf16"].precision == "bf16" and synths["fp32"].precision == "fp32"
    pixels = torch.rand(32, *digits_teacher.spec.input_shape)
    targets = torch.randint(0, 10, (32,))
    terms = {}
    for p, s in synths.items():
        torch.manual_seed(3)                       # same crop/flip draws
        terms[p] = s.loss(pixels, targets)
    assert terms["bf16"].total.item() == pytest.approx(terms["fp32"].total.item(), rel=0.05)
    assert terms["bf16"].bn.item() == pytest.approx(terms["fp32"].bn.item(), rel=0.05)
