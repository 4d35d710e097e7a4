"""Students: derived from the teacher (pruned, shallower) to a size target, and the student file
(student.pt) that rebuilds any of them without unpickling."""
from dfkd_deploy.students.build import BuiltStudent, build

__all__ = ["BuiltStudent", "build"]
