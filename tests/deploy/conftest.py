"""One quick compress run shared by the deployment tests (int8, bundle, comparison, latency)."""
from __future__ import annotations

import pytest

from ..conftest import quick_recipe


@pytest.fixture(scope="session")
def deploy_run(tmp_path_factory, digits_teacher_onnx, digits_eval_npz):
    from dfkd_deploy import run as api

    out = tmp_path_factory.mktemp("deploy") / "run"
    recipe = quick_recipe(**{"deploy.batch_profile": [2, 4, 16], "deploy.calibration_images": 48,
                             "deploy.edge_runtimes": ["openvino", "executorch"]})
    return api.compress(digits_teacher_onnx, recipe, out, device="cpu", eval_data=digits_eval_npz,
                        show_progress=False)


@pytest.fixture(scope="session")
def quick_recipe_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "quick.yaml"
    path.write_text(quick_recipe().resolved_yaml())
    return path
