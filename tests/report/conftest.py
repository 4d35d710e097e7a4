"""One small compress run (with eval data) shared by the report tests."""
from __future__ import annotations

import pytest

from ..conftest import quick_recipe


@pytest.fixture(scope="session")
def report_run(tmp_path_factory, digits_teacher_onnx, digits_eval_npz):
    from dfkd_deploy import run as api

    out = tmp_path_factory.mktemp("report") / "run"
    return api.compress(digits_teacher_onnx, quick_recipe(), out, device="cpu", eval_data=digits_eval_npz,
                        show_progress=False)
