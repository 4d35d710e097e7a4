"""The agreement estimator: statistics, fit, predict, interval, JSON storage."""
import json
import math

import numpy as np
import pytest
import torch

from dfkd_deploy.core.errors import DataError
from dfkd_deploy.validate.estimate import (DEFAULT_FILE, Estimator, conformal_half_width, loo_residuals,
                                           probe_statistics)

FEATURES = ["agree.fresh", "agree.boundary"]


def _stats(fresh, boundary):
    return {"agree.fresh": fresh, "agree.boundary": boundary, "agree.pooled": (fresh + boundary) / 2}


def _calibration(seed=0):
    rng = np.random.default_rng(seed)
    stats, real, groups = [], [], []
    for g in "abcd":
        for _ in range(6):
            f, b = rng.uniform(0.1, 0.9, 2)
            stats.append(_stats(f, b))
            real.append(float(np.clip(0.1 + 0.5 * f + 0.3 * b + rng.normal(0, 0.02), 0, 1)))
            groups.append(g)
    return stats, real, groups


def test_fit_recovers_a_known_monotone_relation():
    stats, real, groups = _calibration()
    est = Estimator.fit(stats, real, groups, features=FEATURES)
    assert est.coef == pytest.approx([0.5, 0.3], abs=0.05)
    assert est.intercept == pytest.approx(0.1, abs=0.05)
    assert 0 < est.half_width < 0.1
    assert est.calibration["pairs"] == 24 and est.calibration["teachers"] == list("abcd")


def test_weights_are_never_negative():
    stats, real, groups = _calibration()
    real = [1 - r for r in real]   # agreement going the wrong way: the fit may not follow it
    est = Estimator.fit(stats, real, groups, features=FEATURES)
    assert min(est.coef) >= 0


def test_monotone_in_agreement_and_interval_holds_the_estimate():
    est = Estimator(FEATURES, [0.6, 0.3], 0.05, 0.08)
    grid = np.linspace(0, 1, 11)
    values = [est.predict(_stats(f, 0.5)) for f in grid]
    assert all(b >= a for a, b in zip(values, values[1:]))
    for f in grid:
        lo, hi = est.interval(_stats(f, f))
        v = est.predict(_stats(f, f))
        assert 0 <= lo <= v <= hi <= 1


def test_json_round_trip(tmp_path):
    stats, real, groups = _calibration()
    est = Estimator.fit(stats, real, groups, features=FEATURES)
    path = est.save(tmp_path / "est.json")
    json.loads(path.read_text())   # plain JSON, no pickle
    back = Estimator.load(path)
    assert back.predict(stats[0]) == pytest.approx(est.predict(stats[0]))
    assert back.interval(stats[3]) == pytest.approx(est.interval(stats[3]))
    e = back.estimate(stats[0])
    assert e.low <= e.value <= e.high and "calibration pairs" in e.based_on


def test_bad_estimator_files_are_data_errors(tmp_path):
    (tmp_path / "a.json").write_text('{"features": ["x"], "coef": [1, 2], "intercept": 0, "half_width": 0.1}')
    with pytest.raises(DataError, match="coefficients"):
        Estimator.load(tmp_path / "a.json")
    (tmp_path / "b.json").write_text("{}")
    with pytest.raises(DataError):
        Estimator.load(tmp_path / "b.json")


def test_missing_source_falls_back_to_pooled_agreement():
    est = Estimator(FEATURES, [0.5, 0.5], 0.0, 0.1)
    assert est.predict({"agree.fresh": 0.8, "agree.boundary": float("nan"), "agree.pooled": 0.6}) == pytest.approx(0.7)
    with pytest.raises(DataError):
        est.predict({"agree.fresh": 0.8})


def test_shipped_estimator_loads_and_is_monotone():
    if not DEFAULT_FILE.is_file():
        pytest.skip("no estimator.json shipped")
    est = Estimator.load(DEFAULT_FILE)
    assert all(c >= 0 for c in est.coef) and 0 < est.half_width <= 1
    lo = est.predict({f: 0.2 for f in est.features})
    hi = est.predict({f: 0.9 for f in est.features})
    assert hi >= lo


def test_conformal_half_width_and_loo():
    assert conformal_half_width([0.1, 0.2, 0.3], 0.5) == pytest.approx(0.2)
    assert conformal_half_width([0.1], 0.9) == 1.0   # too few residuals for 90%
    stats, real, groups = _calibration()
    r = loo_residuals(stats, real, groups, features=FEATURES)
    assert r.shape == (24,) and np.all(np.isfinite(r)) and r.max() < 0.15
    with pytest.raises(DataError, match="two teachers"):
        loo_residuals(stats, real, ["a"] * 24, features=FEATURES)


def test_probe_statistics():
    t = {"fresh": torch.eye(4) * 5, "boundary": torch.zeros(0, 4), "held_out": torch.eye(4)}
    s = {"fresh": torch.eye(4)[[0, 1, 3, 2]], "boundary": torch.zeros(0, 4), "held_out": torch.eye(4)}
    st = probe_statistics(t, s)
    assert st["agree.fresh"] == pytest.approx(0.5)
    assert math.isnan(st["agree.boundary"]) and st["images.boundary"] == 0
    assert st["agree.held_out"] == 1.0
    assert st["agree.pooled"] == pytest.approx(0.5)   # held-out probes are not pooled
    assert st["kl"] > 0 and st["agree.conf_high"] == pytest.approx(0.5)


def test_sqrt_transform_is_monotone_and_unknown_transforms_are_refused():
    est = Estimator(["sqrt:agree.fresh"], [1.0], 0.0, 0.1)
    assert est.predict({"agree.fresh": 0.25}) == pytest.approx(0.5)
    assert est.predict({"agree.fresh": 0.36}) > est.predict({"agree.fresh": 0.25})
    with pytest.raises(DataError, match="transform"):
        Estimator(["log:agree.fresh"], [1.0], 0.0, 0.1).predict({"agree.fresh": 0.5})
