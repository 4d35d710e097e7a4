"""MARS -> exact ReLU network: exactness, padding invariance, loud failure, CLI, head."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("pyearth")

from dfkd_deploy.core.errors import DataError  # noqa: E402
from dfkd_deploy.spline.construct import ConstructionError, build_network, check_network  # noqa: E402
from dfkd_deploy.spline.mars import fit_mars, terms_csv, terms_markdown  # noqa: E402


def _data(seed: int, n: int = 300, d: int = 3, k: int = 2):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    cols = [np.maximum(0, X[:, 0] - 0.2) * np.maximum(0, 0.5 - X[:, 1]) + X[:, 2],
            np.abs(X[:, 1]) - 0.5 * X[:, 0], np.maximum(0, X[:, 2])]
    Y = np.stack(cols[:k], 1) + 0.05 * rng.normal(size=(n, k))
    return X, Y


def _net_out(net, X):
    with torch.no_grad():
        return net(torch.as_tensor(X, dtype=torch.float32)).double().numpy()


@pytest.mark.parametrize("degree", [1, 2])
@pytest.mark.parametrize("seed,k", [(0, 1), (1, 2), (2, 3)])
def test_exact_construction(degree, seed, k):
    X, Y = _data(seed, k=k)
    model = fit_mars(X, Y, max_degree=degree, max_terms=15)
    if degree == 1:   # degree 1: the term table is pyearth's model itself
        np.testing.assert_allclose(model.predict(X), model.earth_predict(X), atol=1e-10)
    net = build_network(model, check_inputs=X)    # raises if it disagrees
    probe = np.random.default_rng(seed + 10).normal(scale=2.0, size=(500, X.shape[1]))
    assert np.abs(_net_out(net, probe) - model.predict(probe)).max() < 1e-5
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in net)
    if model.substituted:
        assert n_linear == 3      # min(h1, h2) = h1 - relu(h1 - h2): two hidden layers
    else:
        assert n_linear == 2


@pytest.mark.parametrize("pad", ["random", "duplicate"])
def test_padding_keeps_function(pad):
    X, Y = _data(3, k=2)
    for degree in (1, 2):
        model = fit_mars(X, Y, max_degree=degree, max_terms=12)
        small = build_network(model, check_inputs=X)
        wide = build_network(model, 48, pad=pad, check_inputs=X, seed=5)
        assert all(m.out_features == 48 for m in list(wide)[:-1] if isinstance(m, torch.nn.Linear))
        np.testing.assert_allclose(_net_out(wide, X), _net_out(small, X), atol=1e-5)


def test_width_too_small_is_a_usage_error():
    from dfkd_deploy.core.errors import UsageError

    X, Y = _data(4)
    model = fit_mars(X, Y, max_terms=15)
    with pytest.raises(UsageError, match="needs hidden widths"):
        build_network(model, 2)


def test_corrupted_network_fails_loudly():
    X, Y = _data(5)
    model = fit_mars(X, Y, max_terms=12)
    net = build_network(model, check_inputs=X)
    with torch.no_grad():
        net[0].weight[0, 0] += 1e-2
    with pytest.raises(ConstructionError, match="disagrees"):
        check_network(net, model.predict, X)


def test_term_tables():
    X, Y = _data(6, k=2)
    model = fit_mars(X, Y, max_degree=2, max_terms=12, feature_names=["a", "b", "c"])
    md, csv = terms_markdown(model), terms_csv(model)
    assert "intercept" in md and "min(" in md
    assert csv.splitlines()[0] == "term,kind,variable,knot,direction,coef_0,coef_1"


@pytest.fixture
def small_csv(tmp_path):
    rng = np.random.default_rng(0)
    lines = ["sex,length,weight,rings"]
    for _ in range(160):
        s, ln, w = rng.choice(["M", "F", "I"]), rng.uniform(0.1, 0.7), rng.uniform(0.0, 2.0)
        lines.append(f"{s},{ln:.3f},{w:.3f},{int(3 + 12 * ln + 3 * min(w, 1.0) + (s == 'I') + rng.normal())}")
    path = tmp_path / "small.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_fit_writes_artifacts(small_csv, tmp_path):
    import json

    from click.testing import CliRunner

    from dfkd_deploy.spline.tabular.cli import spline

    out = tmp_path / "run"
    res = CliRunner().invoke(spline, ["fit", str(small_csv), "--target", "rings", "--out", str(out),
                                      "--epochs", "3", "--hidden", "16"])
    assert res.exit_code == 0, res.output
    for name in ("curves.png", "metrics.json", "mars_terms.md", "mars_terms.csv"):
        assert (out / name).stat().st_size > 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["test"]) == {"mars", "he", "xavier"} and m["epochs"] == 3
    assert "sex=I" in m["features"]   # categorical one-hot encoded
    assert len(m["curves"]["mars"]["test_mse"]) == 4


def test_cli_missing_column_and_file(small_csv, tmp_path):
    from click.testing import CliRunner

    from dfkd_deploy.spline.tabular.cli import spline

    res = CliRunner().invoke(spline, ["fit", str(small_csv), "--target", "age", "--out", str(tmp_path / "r")])
    assert isinstance(res.exception, DataError) and "no column 'age'" in str(res.exception)
    assert res.exception.exit_code == 2   # what the main CLI exits with
    res = CliRunner().invoke(spline, ["fit", str(tmp_path / "nope.csv"), "--target", "rings"])
    assert isinstance(res.exception, DataError)


def test_mars_head_matches_mars_on_features():
    from dfkd_deploy.spline.head import fit_mars_head, mars_head

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(600, 40, generator=g) * torch.linspace(0.2, 3.0, 40)
    logits = torch.relu(feats[:, :5] - 0.3) * 2 - feats[:, 5:10]
    fit = fit_mars_head(feats, logits, hidden=32, temperature=2.0, max_terms=12, pca_dims=8)
    head = fit.head
    assert head[0].in_features == 40 and head[0].out_features == 32 and head[-1].out_features == 5
    X = feats.double().numpy()
    want = fit.mars.predict(X @ fit.A.T + fit.c)
    np.testing.assert_allclose(_net_out(head, X), want, atol=1e-5)
    # the fit is a real approximation of the tempered, centred logits
    target = ((logits - logits.mean(1, keepdim=True)) / 2.0).numpy()
    assert ((want - target) ** 2).mean() < target.var(0).mean()
    plain = mars_head(feats, logits, hidden=32, temperature=2.0, max_terms=12, pca_dims=None)
    assert isinstance(plain, torch.nn.Sequential)
