import numpy as np

from dfkd_deploy.deploy.compare import TOLERANCES, Comparison, Dataset, all_passed, compare_backends
from dfkd_deploy.report.deploy_md import comparison_markdown
from dfkd_deploy.runtime.base import Runner

W = np.random.default_rng(0).standard_normal((12, 5)).astype(np.float32)


def _ref(x):
    return x.reshape(len(x), -1) @ W


class Backend(Runner):
    """A stand-in back end: a function of the NCHW inputs."""

    def __init__(self, name, precision, fn):
        self.name, self.precision, self.fn = name, precision, fn

    def prepare(self, x_nchw):
        return x_nchw

    def run(self, prepared):
        return self.fn(prepared)


def test_presets_and_table():
    x = np.random.default_rng(1).standard_normal((40, 3, 2, 2)).astype(np.float32)
    labels = _ref(x).argmax(1)

    def flip_half(x):   # an int8 back end that gets half the decisions wrong
        out = _ref(x)
        out[::2] = -out[::2]
        return out

    others = [Backend("same", "fp32", _ref),
              Backend("noisy", "fp32", lambda x: _ref(x) + 1e-3),
              Backend("fp16ish", "fp16", lambda x: _ref(x) * (1 + 1e-3)),
              Backend("int8ok", "int8", lambda x: _ref(x) + 0.05),
              Backend("int8bad", "int8", flip_half),
              Backend("broken", "fp32", lambda x: 1 / 0)]
    rows = compare_backends(Backend("torch", "fp32", _ref), others, [Dataset("probes", x, labels)])
    got = {r.backend: r.passed for r in rows}
    assert got == {"torch": None, "same": True, "noisy": False, "fp16ish": True, "int8ok": True,
                   "int8bad": False, "broken": False}
    assert rows[0].accuracy == 1.0 and not all_passed(rows)
    comparison = Comparison(rows)
    assert not comparison.passed and comparison.accuracy("int8ok", "int8") == 1.0
    assert comparison.to_dict()["rows"][0] == rows[0].to_dict() and comparison.to_dict()["passed"] is False
    table = comparison_markdown(comparison.to_dict()["rows"]).splitlines()
    assert len(table) == 2 + len(rows)
    assert all(line.count("|") == 10 for line in table)   # no stray pipes break the table
    assert "FAIL" in table[-1] and "ZeroDivisionError" in table[-1]
    assert TOLERANCES["int8"].min_agreement == 0.9


def test_run_report_comparison(deploy_run):
    comp = deploy_run.report["comparison"]
    names = {(r["backend"], r["precision"], r["data"].split(" (")[0]) for r in comp["rows"]}
    assert ("onnxruntime", "fp32", "synthetic probes") in names and ("onnxruntime", "int8", "eval data") in names
    fp32 = [r for r in comp["rows"] if r["backend"] == "onnxruntime" and r["precision"] == "fp32"]
    assert all(r["passed"] for r in fp32)
    md = (deploy_run.run_dir / "report.md").read_text()
    assert "## Back-end comparison" in md and "## Latency and size" in md

