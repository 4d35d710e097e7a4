"""The synthesis priors a run uses, resolved once from the recipe and the teacher.

``synthesis.priors.*`` left null means automatic: 0 when the teacher has BN statistics (the BN
term does the work), :data:`BN_FREE_PRIORS` when it has none. A number, 0 included, is used as
given. :class:`Priors` is the resolved value that the entry points (``compress``, ``--dry-run``,
``inspect``) compute and hand down; nothing below them resolves again.
"""
from __future__ import annotations

from dataclasses import dataclass

# Prior weights used when the teacher has no BN statistics and the recipe leaves a weight null.
# tv/l2: DeepInversion's priors, scaled to this module's definitions (pixel-space L1 TV, mean
# square of normalised pixels). entropy/activation: DAFL (Chen et al., ICCV 2019; beta=5 and
# alpha=0.1 there, the activation as a per-feature mean like the Fast-Datafree code), off by
# default. Chosen by benchmarks/bn_free_priors.py on the dynamo-exported (BN-fused) CIFAR-10
# ResNet-56, seeds 0 and 1: TV+L2 and the adversarial term alone tie on the student (14.6 vs
# 15.0 % mean top-1), TV+L2 makes pools whose feature statistics are closer to the real data's
# on both seeds (BN loss against the BN-kept teacher 799/788 vs 849/891), and adding the DAFL
# terms lowered the student on both seeds (14.3/13.2 vs 15.0/14.2 %).
# proxy: the stand-in statistics on 1/f noise (dfkd_deploy.synthesis.proxy_stats); with TV + L2 at
# the same budget, seeds 0 and 1: 16.8/20.8 % against 11.6/16.9 %, and the pool's feature
# statistics 399/362 from the real data's against 844/804 (BN-kept teacher's running statistics).
BN_FREE_PRIORS = {"tv": 0.5, "l2": 0.01, "entropy": 0.0, "activation": 0.0, "proxy": 2.0}
# The adversarial weight for a teacher without BN statistics when synthesis.adv_bn_free is null:
# min(synthesis.adv, BN_FREE_ADV) where the proxy prior is on (an MLP teacher keeps adv). Without the BN term to hold the images near the data, the
# adversarial term at the BN teachers' 1.33 drives them to where the teacher is unsure. Chosen by
# benchmarks/bn_free_priors.py with the proxy prior on: 24.0/21.1 % (seeds 0/1) at 0.3 against
# 16.8/20.8 % at 1.33; 0 tied with 0.3 on seed 0 (24.0 %), and 0.3 keeps some of the search.
BN_FREE_ADV = 0.3
# The activation-range prior of int8 teachers (keep every quantized activation inside the range the
# file records, and make the batch reach its top): its weight when a recipe leaves
# synthesis.priors.ranges null and the teacher has quantized activations. Chosen by
# benchmarks/int8_teacher_study.py: at 10 minutes on the int8 ResNet-8 it beat no prior on both
# seeds (22.1% vs 12.0%, 19.4% vs 16.7%; docs/teachers.md has the figures).
RANGE_PRIOR_AUTO = 1.0
RANGE_PRIOR_NAME = "ranges"
PRIOR_NAMES = tuple(BN_FREE_PRIORS) + (RANGE_PRIOR_NAME,)


def resolve_priors(priors, has_bn_statistics: bool, has_activation_ranges: bool = False) -> dict[str, float]:
    """Prior weights to use: the recipe's where set, else 0 (BN teacher) or the BN-free default;
    the range prior: :data:`RANGE_PRIOR_AUTO` for a teacher with quantized activations, else 0."""
    out = {}
    for name in PRIOR_NAMES:
        value = getattr(priors, name, None) if priors is not None else None
        if value is not None:
            out[name] = float(value)
        elif name == RANGE_PRIOR_NAME:
            out[name] = RANGE_PRIOR_AUTO if has_activation_ranges else 0.0
        else:
            out[name] = 0.0 if has_bn_statistics else BN_FREE_PRIORS[name]
    return out


def adversarial_weight(opts, has_bn_statistics: bool, proxy_on: bool = True) -> float:
    """The adversarial term's weight: ``synthesis.adv`` for a teacher with BN statistics; for one
    without, ``synthesis.adv_bn_free`` where set, else min(``synthesis.adv``, :data:`BN_FREE_ADV`)
    where the proxy-statistics prior is on (``proxy_on``; what was measured), else ``synthesis.adv``."""
    adv = float(opts.adv)
    if has_bn_statistics:
        return adv
    explicit = getattr(opts, "adv_bn_free", None)
    if explicit is not None:
        return float(explicit)
    return min(adv, BN_FREE_ADV) if proxy_on else adv


@dataclass(frozen=True)
class Priors:
    weights: dict[str, float]          # every name in PRIOR_NAMES
    explicit_activation: bool = False  # the recipe set synthesis.priors.activation itself
    explicit_ranges: bool = False      # the recipe set synthesis.priors.ranges itself
    explicit_proxy: bool = False       # the recipe set synthesis.priors.proxy itself

    @classmethod
    def for_teacher(cls, spec, options) -> "Priors":
        """From the teacher's spec (BN statistics: ``bn_layers > 0``) and ``synthesis.priors``
        (a :class:`~dfkd_deploy.recipe.PriorOptions` or None)."""
        return cls(resolve_priors(options, spec.bn_layers > 0, getattr(spec, "activation_ranges", 0) > 0),
                   explicit_activation=getattr(options, "activation", None) is not None,
                   explicit_ranges=getattr(options, RANGE_PRIOR_NAME, None) is not None,
                   explicit_proxy=getattr(options, "proxy", None) is not None)

    def active(self) -> dict[str, float]:
        """The priors that are on (weight > 0)."""
        return {k: v for k, v in self.weights.items() if v}


def synthesis_weights(teacher, synthesis_opts) -> dict:
    """What the synthesis loss will weigh for this teacher, as ``inspect`` and the plan show it:
    the active priors (the proxy prior dropped where the teacher cannot have it, as the loss
    drops it) and the adversarial weight. ``teacher``: a loaded Teacher (``.module``, ``.spec``)."""
    from dfkd_deploy.synthesis.proxy_stats import proxy_applicable

    spec = teacher.spec
    active = Priors.for_teacher(spec, synthesis_opts.priors).active()
    if "proxy" in active and not proxy_applicable(teacher.module, spec.input_shape):
        del active["proxy"]
    return {"priors": active,
            "adversarial_weight": adversarial_weight(synthesis_opts, spec.bn_layers > 0, "proxy" in active)}
