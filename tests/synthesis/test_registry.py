"""Synthesis methods by name, built from (Teacher, options, device, priors); priors resolved once."""
import dataclasses

import pytest
import torch

from dfkd_deploy.core.errors import UsageError
from dfkd_deploy.recipe import PriorOptions
from dfkd_deploy.synthesis import Priors, Synthesizer, build_synthesizer, register_synthesizer, synthesizer_names
from dfkd_deploy.synthesis.deepinversion import DeepInversionSynthesizer
from dfkd_deploy.synthesis.fast import FastSynthesizer
from dfkd_deploy.synthesis.priors import (BN_FREE_ADV, BN_FREE_PRIORS, PRIOR_NAMES, RANGE_PRIOR_AUTO,
                                          adversarial_weight, resolve_priors)
from tests.conftest import quick_recipe


def test_builtin_methods_are_registered_by_name():
    assert {"fastdfkd", "deepinversion"} <= set(synthesizer_names())
    assert FastSynthesizer.method == "fastdfkd" and DeepInversionSynthesizer.method == "deepinversion"


def test_build_synthesizer_constructs_the_named_method(digits_teacher):
    opts = quick_recipe().synthesis
    priors = Priors.for_teacher(digits_teacher.spec, opts.priors)
    synth = build_synthesizer("fastdfkd", digits_teacher, opts, "cpu", priors)
    assert isinstance(synth, FastSynthesizer) and synth.device == torch.device("cpu")
    assert synth.input_shape == digits_teacher.spec.input_shape and synth.num_classes == 10
    assert synth.loss.priors == priors.weights


def test_unknown_method_is_a_usage_error_naming_the_choices(digits_teacher):
    opts = quick_recipe().synthesis
    with pytest.raises(UsageError, match="deepinversion, fastdfkd"):
        build_synthesizer("nope", digits_teacher, opts, "cpu", Priors.for_teacher(digits_teacher.spec, opts.priors))


def test_a_registered_method_is_built_like_the_builtins(digits_teacher):
    @register_synthesizer("test-constant")
    class Constant(Synthesizer):
        def synthesize(self, student=None, *, adversarial=False, meta_update=True, batch_size=None):
            return torch.full((batch_size or 2, *self.input_shape), 0.5), None

    try:
        opts = quick_recipe().synthesis
        synth = build_synthesizer("test-constant", digits_teacher, opts, "cpu",
                                  Priors.for_teacher(digits_teacher.spec, opts.priors))
        assert synth.method == "test-constant" and synth.synthesize(batch_size=3)[0].shape == (3, 1, 8, 8)
        synth.reset_l0()                                   # the base class: nothing to re-initialise
        with pytest.raises(ValueError, match="registered twice"):
            register_synthesizer("test-constant")(Constant)
    finally:
        from dfkd_deploy.synthesis import registry
        registry._REGISTRY.pop("test-constant")


def test_rank_sync_hooks_are_called_on_the_meta_step_and_reset(digits_teacher):
    recipe = quick_recipe(**{"synthesis.g_steps": 1, "synthesis.batch_size": 8})
    opts = recipe.synthesis
    synth = build_synthesizer("fastdfkd", digits_teacher, opts, "cpu", Priors.for_teacher(digits_teacher.spec, opts.priors))
    synced, broadcast = [], []
    synth.set_rank_sync(lambda params: synced.append(len(list(params))), broadcast.append)
    synth.synthesize()
    assert synced == [len(list(synth.generator.parameters()))]
    synth.synthesize(meta_update=False)                  # probes: no meta step, nothing to sync
    assert len(synced) == 1
    synth.reset_l0()
    assert broadcast == [synth.generator]


def test_resolve_priors_auto_explicit_and_zero():
    assert resolve_priors(PriorOptions(), has_bn_statistics=True) == {k: 0.0 for k in PRIOR_NAMES}
    assert resolve_priors(PriorOptions(), has_bn_statistics=False) == {**BN_FREE_PRIORS, "ranges": 0.0}
    assert resolve_priors(PriorOptions(), True, has_activation_ranges=True)["ranges"] == RANGE_PRIOR_AUTO
    assert resolve_priors(PriorOptions(ranges=0.7), True)["ranges"] == 0.7
    mixed = resolve_priors(PriorOptions(tv=0.0, entropy=2.0), has_bn_statistics=False)
    assert mixed["tv"] == 0.0 and mixed["entropy"] == 2.0 and mixed["l2"] == BN_FREE_PRIORS["l2"]
    assert resolve_priors(PriorOptions(tv=0.3), has_bn_statistics=True)["tv"] == 0.3


def test_priors_for_teacher_follow_its_bn_statistics(digits_teacher):
    bn_free = dataclasses.replace(digits_teacher.spec, bn_layers=0)
    assert Priors.for_teacher(digits_teacher.spec, PriorOptions()).active() == {}
    auto = Priors.for_teacher(bn_free, PriorOptions())
    assert auto.weights == {**BN_FREE_PRIORS, "ranges": 0.0} and not auto.explicit_activation
    assert auto.active() == {k: v for k, v in BN_FREE_PRIORS.items() if v}
    assert Priors.for_teacher(bn_free, PriorOptions(activation=0.0)).explicit_activation


def test_adversarial_weight_is_lower_for_a_teacher_without_bn_statistics(digits_teacher):
    opts = quick_recipe().synthesis
    assert adversarial_weight(opts, has_bn_statistics=True) == opts.adv
    assert adversarial_weight(opts, has_bn_statistics=False) == min(opts.adv, BN_FREE_ADV)
    assert adversarial_weight(opts.model_copy(update={"adv": 0.0}), False) == 0.0
    assert adversarial_weight(opts.model_copy(update={"adv_bn_free": 0.8}), False) == 0.8
    assert adversarial_weight(opts.model_copy(update={"adv_bn_free": 0.8}), True) == opts.adv
    bn_free = dataclasses.replace(digits_teacher, spec=dataclasses.replace(digits_teacher.spec, bn_layers=0))
    synth = build_synthesizer("fastdfkd", bn_free, opts, "cpu", Priors.for_teacher(bn_free.spec, opts.priors))
    assert synth.adv == synth.loss.adv == min(opts.adv, BN_FREE_ADV)
    synth.close()


def test_a_closed_synthesizer_leaves_no_hook_on_the_teacher(digits_teacher):
    """Side-job synthesizers (probes, calibration, derived students' images) must not leave their
    BN-statistics and feature hooks on the run's teacher."""
    from dfkd_deploy.synthesis import make_synthesizer

    def hooks(module):
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())

    before = hooks(digits_teacher.module)
    # the feature and proxy-statistics hooks too
    recipe = quick_recipe(**{"synthesis.priors.activation": 0.1, "synthesis.priors.proxy": 1.0})
    with make_synthesizer(digits_teacher, recipe, "cpu") as synth:
        assert hooks(digits_teacher.module) > before
        synth.synthesize(None)
    assert hooks(digits_teacher.module) == before


def test_an_unresolved_auto_batch_synthesizes_in_rounds_of_the_default(digits_teacher):
    """A teacher-only synthesis has no student to resolve synthesis.batch_size: auto against; the
    synthesizer takes SYNTHESIS_BATCH and leaves the recipe as it was."""
    from dfkd_deploy.recipe import SYNTHESIS_BATCH
    from dfkd_deploy.synthesis import make_synthesizer

    recipe = quick_recipe(**{"synthesis.batch_size": "auto", "synthesis.g_steps": 1, "synthesis.nz": 8,
                             "synthesis.ngf": 4})
    with make_synthesizer(digits_teacher, recipe, "cpu") as synth:
        assert synth.opts.batch_size == SYNTHESIS_BATCH
        images, _ = synth.synthesize(None, meta_update=False, batch_size=4)
    assert images.shape[0] == 4 and recipe.synthesis.batch_size == "auto"
