"""Shared fixtures: a small real teacher (trained on scikit-learn's digits in seconds) and paths
to ../shared material, which tests skip without."""
from __future__ import annotations

import os

# Before torch loads OpenMP: on a machine busy with other work, spinning OpenMP workers starve each
# other (a 40-step conv training loop beside one busy process: 4.0 s spinning, 0.78 s passive), and
# the README's test command, unlike .ci/run, does not set the policy itself.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (shared material lives beside the repository)")
    return path


@pytest.fixture(scope="session")
def digits_data():
    from dfkd_deploy.demo import digits_split

    return digits_split()


@pytest.fixture(scope="session")
def digits_teacher_onnx(tmp_path_factory, digits_data) -> Path:
    """A BN teacher trained for a few epochs on 70% of the digits, exported to ONNX (BN kept)."""
    from dfkd_deploy.demo import export_teacher_onnx, train_digits_teacher

    x_tr, _, y_tr, _ = digits_data
    model = train_digits_teacher(x_tr, y_tr, epochs=8, seed=0)
    return export_teacher_onnx(model, tmp_path_factory.mktemp("teacher") / "digits.onnx")


@pytest.fixture(scope="session")
def digits_eval_npz(tmp_path_factory, digits_data) -> Path:
    _, x_te, _, y_te = digits_data
    path = tmp_path_factory.mktemp("eval") / "digits-test.npz"
    np.savez(path, images=x_te, labels=y_te)
    return path


@pytest.fixture(scope="session")
def digits_teacher(digits_teacher_onnx):
    from dfkd_deploy.teachers import load_teacher

    return load_teacher(digits_teacher_onnx)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def quick_recipe(**sections):
    """The demo recipe cut down to seconds; ``sections`` override whole-key values by dotted path."""
    from dfkd_deploy.demo import demo_recipe
    from dfkd_deploy.recipe import load_recipe

    base = demo_recipe().model_dump(mode="json")
    base["synthesis"].update(batch_size=32, g_steps=2)
    base["distillation"].update(epochs=4, warmup=1, kd_steps=5, batch_size=32)
    base["validation"].update(probe_images=32)
    base["deploy"]["edge_runtimes"] = []   # OpenVINO/ExecuTorch builds take tens of seconds: tests/deploy turns them on
    for dotted, value in sections.items():
        node = base
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    import tempfile

    import yaml

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        yaml.safe_dump(base, fh)
    return load_recipe(fh.name)
