"""Spline (MARS) initialisation of fully connected ReLU layers; needs the optional py-earth2.

fit_mars -> MarsModel (CPWL term table) -> build_network (exact nn.Sequential, checked) ->
ordinary gradient-descent training. ``mars_head`` does the same for a distillation head.
Imports are lazy so ``import dfkd_deploy.spline`` works without py-earth2.
"""
from __future__ import annotations

__all__ = ["fit_mars", "build_network", "mars_head"]


def __getattr__(name):
    if name == "fit_mars":
        from dfkd_deploy.spline.mars import fit_mars
        return fit_mars
    if name == "build_network":
        from dfkd_deploy.spline.construct import build_network
        return build_network
    if name == "mars_head":
        from dfkd_deploy.spline.head import mars_head
        return mars_head
    raise AttributeError(name)
