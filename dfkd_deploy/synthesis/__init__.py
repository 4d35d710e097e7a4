"""Image synthesis from the teacher alone: the methods (by name, see :mod:`.registry`), their
shared loss, and the on-disk image pool."""
from dfkd_deploy.synthesis import deepinversion, fast  # noqa: F401  (registers the methods)
from dfkd_deploy.synthesis.base import RoundStats, Synthesizer
from dfkd_deploy.synthesis.priors import Priors
from dfkd_deploy.synthesis.registry import build_synthesizer, make_synthesizer, register_synthesizer, synthesizer_names

__all__ = ["Priors", "RoundStats", "Synthesizer", "build_synthesizer", "make_synthesizer", "register_synthesizer", "synthesizer_names"]
