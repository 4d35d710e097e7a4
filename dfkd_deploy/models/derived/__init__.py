"""Students derived from the teacher (pruned, shallower), size targets, and their descriptions."""
from dfkd_deploy.models.derived.build import BuiltStudent, build

__all__ = ["BuiltStudent", "build"]
