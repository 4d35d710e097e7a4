"""A budgeted compress end to end, with the calibration stubbed (so the plan is known, nothing is
timed): the run re-tunes its per-epoch counts to what it measures, and report.json, budget.json
and recipe.resolved.yaml agree on the counts it ended with."""
from __future__ import annotations

import json

import yaml

from dfkd_deploy.budget.planner import Costs

from ..conftest import quick_recipe


def test_a_budgeted_run_retunes_to_its_measured_costs(digits_teacher_onnx, digits_eval_npz, tmp_path, monkeypatch):
    from dfkd_deploy import compress
    from dfkd_deploy.budget import session as budget_session

    # A calibration that overestimates: a digits KD step of 32 images takes milliseconds here, not 0.5 s.
    stub = Costs(synth_round_s=0.5, kd_step_s=0.5, epoch_overhead_s=0.0, finish_s=2.0)
    monkeypatch.setattr(budget_session, "calibrate", lambda *a, **k: stub)
    recipe = quick_recipe(budget="40s")
    result = compress(digits_teacher_onnx, recipe, tmp_path / "run", device="cpu", eval_data=digits_eval_npz,
                      show_progress=False)
    budget = result.report["budget"]
    first = budget_session.RETUNE_AFTER_KD_EPOCHS
    retunes = [n for n in budget["notes"] if n.startswith("re-tuned at epoch")]
    assert retunes and "calibrated 0.500" in retunes[0], budget["notes"]
    plan = budget["plan"]
    assert plan["costs"]["kd_step_s"] < stub.kd_step_s           # the plan now holds the measured costs
    assert f"re-tuned at epoch {plan['warmup'] + first} of {plan['epochs']}" in retunes[0]
    saved = json.loads((tmp_path / "run" / budget_session.BUDGET_FILE).read_text())
    resolved = yaml.safe_load((tmp_path / "run" / "recipe.resolved.yaml").read_text())
    assert saved["plan"]["kd_steps"] == plan["kd_steps"] == resolved["distillation"]["kd_steps"]
    assert resolved["distillation"]["epochs"] == plan["epochs"]
    # the KD steps run: the plan's counts changed mid-run, so only the per-epoch record adds them up
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    per_epoch = [r["kd_steps"] for r in rows if "kd_steps" in r]
    assert len(set(per_epoch)) > 1 and per_epoch[-1] == plan["kd_steps"]
    assert result.report["distillation"]["kd_steps"] == sum(per_epoch)


def test_calibration_with_cached_logits_times_kd_steps_without_the_teacher(digits_teacher):
    """teacher_logits: cached: the timed KD steps run only the student (the teacher labels the
    batch once, charged to the round); with recompute every timed step runs the teacher. Counted
    in teacher calls, nothing timed."""
    import dataclasses

    import torch

    from dfkd_deploy.budget import calibrate as cal
    from dfkd_deploy.run import build_student

    class Counting(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, x):
            self.calls += 1
            return self.inner(x)

    calls = {}
    for mode in ("recompute", "cached"):
        recipe = quick_recipe(**{"distillation.teacher_logits": mode})
        counting = Counting(digits_teacher.module)
        teacher = dataclasses.replace(digits_teacher, module=counting)
        costs = cal.calibrate(teacher, recipe, build_student(recipe, digits_teacher), "cpu")
        assert costs.synth_round_s > 0 and costs.kd_step_s > 0
        calls[mode] = counting.calls
    # recompute: one teacher call per KD step (the warm-up step and the timed ones); cached: one in all
    assert calls["recompute"] - calls["cached"] == cal.KD_STEPS_TIMED


def test_calibration_times_the_kd_step_in_the_runs_precision(digits_teacher):
    """The trainer runs KD under bf16 autocast where the recipe (or ``auto`` on an AMX CPU) says so;
    the calibrated step must too, or the plan holds an fp32 step (1.8x slower here) and leaves
    budget unused. Checked by where the student's forward ran, nothing timed."""
    import torch

    from dfkd_deploy.budget import calibrate as cal
    from dfkd_deploy.run import build_student

    for precision in ("bf16", "fp32"):
        recipe = quick_recipe(**{"distillation.precision": precision})
        student = build_student(recipe, digits_teacher)
        seen = []   # the hook function (and this list) survive calibrate's deepcopy of the student
        student.register_forward_hook(lambda m, i, o: seen.append((m.training, torch.is_autocast_enabled("cpu"))))
        cal.calibrate(digits_teacher, recipe, student, "cpu")
        kd_forwards = [autocast for training, autocast in seen if training]
        assert kd_forwards and all(a == (precision == "bf16") for a in kd_forwards), (precision, seen)


def test_calibration_times_the_kd_step_with_its_stage_terms(digits_teacher, digits_teacher_onnx, monkeypatch):
    """With attention transfer or feature matching on, the trainer's KD step computes them, so the
    timed step must too (or the plan holds a step cheaper than the run's); the hooks leave the
    teacher and student afterwards. Counted in calls, nothing timed."""
    from dfkd_deploy.budget import calibrate as cal
    from dfkd_deploy.distill.attention import AttentionTransfer
    from dfkd_deploy.run import build_student
    from dfkd_deploy.teachers import load_teacher

    calls = {"loss": 0, "feature_loss": 0}
    for name in calls:
        original = getattr(AttentionTransfer, name)

        def counted(self, _original=original, _name=name):
            calls[_name] += 1
            return _original(self)

        monkeypatch.setattr(AttentionTransfer, name, counted)

    def hooks(*nets):
        return [sum(len(m._forward_hooks) for m in net.modules()) for net in nets]

    recipe = quick_recipe(**{"distillation.attention": 1000.0})
    student = build_student(recipe, digits_teacher)
    before = hooks(digits_teacher.module, student)
    cal.calibrate(digits_teacher, recipe, student, "cpu")
    assert calls == {"loss": 1 + cal.KD_STEPS_TIMED, "feature_loss": 0}
    assert hooks(digits_teacher.module, student) == before

    twin = load_teacher(digits_teacher_onnx).module.train()   # every stage has the teacher's shape
    for p in twin.parameters():
        p.requires_grad_(True)
    before = hooks(digits_teacher.module, twin)
    cal.calibrate(digits_teacher, quick_recipe(**{"distillation.features": 2.0}), twin, "cpu")
    assert calls == {"loss": 1 + cal.KD_STEPS_TIMED, "feature_loss": 1 + cal.KD_STEPS_TIMED}
    assert hooks(digits_teacher.module, twin) == before
