"""The budget planner with stubbed step costs: the plan's estimate fits the budget (a logic test,
nothing is timed)."""
from __future__ import annotations

import itertools

import pytest

from dfkd_deploy.budget.planner import MARGIN, Costs, estimate, minimum_seconds, plan_budget
from dfkd_deploy.core.units import parse_duration
from dfkd_deploy.core.errors import UsageError

COSTS = [Costs(synth_round_s=r, kd_step_s=k, epoch_overhead_s=o, finish_s=f)
         for r, k, o, f in itertools.product((0.5, 8.0, 40.0), (0.05, 1.2), (0.0, 0.5), (5.0, 60.0))]


@pytest.mark.parametrize("budget_s", [120, 600, 1800, 3600, 4 * 3600])
@pytest.mark.parametrize("costs", COSTS, ids=lambda c: f"r{c.synth_round_s}-k{c.kd_step_s}-o{c.epoch_overhead_s}-f{c.finish_s}")
def test_plan_fits_the_budget(budget_s, costs):
    spent = 10.0
    if minimum_seconds(costs, spent) > budget_s:
        with pytest.raises(UsageError, match="too short"):
            plan_budget(budget_s, costs, spent_s=spent, synth_batch=64)
        return
    plan = plan_budget(budget_s, costs, spent_s=spent, synth_batch=64)
    assert plan.estimated_s == pytest.approx(estimate(costs, spent_s=spent, epochs=plan.epochs, warmup=plan.warmup,
                                                      rounds_per_epoch=plan.rounds_per_epoch,
                                                      kd_steps=plan.kd_steps))
    assert plan.estimated_s <= budget_s * (1 - MARGIN) + 1e-6
    assert 1 <= plan.warmup < plan.epochs and plan.kd_steps >= 1 and plan.rounds_per_epoch >= 1
    assert plan.pool_images == plan.rounds * 64
    # it uses the budget: within 10% of it unless the shortest steps are coarser than that
    step = costs.synth_round_s + costs.epoch_overhead_s + costs.kd_step_s * plan.kd_steps
    if step < 0.05 * budget_s:
        assert plan.estimated_s >= 0.9 * budget_s - step


def test_a_budget_below_the_shortest_run_is_one_clear_error():
    costs = Costs(synth_round_s=30.0, kd_step_s=2.0, epoch_overhead_s=0.1, finish_s=40.0)
    with pytest.raises(UsageError, match=r"too short for this teacher.*shortest run takes about \d+ s"):
        plan_budget(60, costs, spent_s=5, synth_batch=256)


def test_the_plan_goes_into_the_recipe():
    from dfkd_deploy.recipe import load_recipe

    plan = plan_budget(1800, Costs(4.0, 0.5, 0.1, 30.0), spent_s=20, synth_batch=256)
    r = plan.apply(load_recipe(None))
    assert (r.distillation.epochs, r.distillation.warmup, r.distillation.kd_steps,
            r.synthesis.rounds_per_epoch) == (plan.epochs, plan.warmup, plan.kd_steps, plan.rounds_per_epoch)
    assert r.synthesis.reset_l0_after is None or plan.warmup + r.synthesis.reset_l0_after <= plan.epochs
    d = plan.to_dict()
    assert d["rounds"] == plan.rounds and d["kd_steps_total"] == plan.kd_steps * (plan.epochs - plan.warmup)


@pytest.mark.parametrize("text,seconds", [("30m", 1800), ("1h", 3600), ("90s", 90), ("1h30m", 5400), (45, 45),
                                          ("2.5m", 150)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "30x", "m30", "-5m", "0s", "thirty minutes"])
def test_parse_duration_refuses(text):
    with pytest.raises(UsageError, match="budget"):
        parse_duration(text)


def test_recipe_budget_and_target_keys():
    from dfkd_deploy.core.errors import RecipeError
    from dfkd_deploy.recipe import load_recipe

    r = load_recipe(None, {"budget": "30m", "student.target": "params=0.3", "student.init": "prune"})
    assert (r.budget, r.student.target, r.student.init) == ("30m", "params=0.3", "prune")
    with pytest.raises(RecipeError, match="budget"):
        load_recipe(None, {"budget": "soon"})
    with pytest.raises(RecipeError, match="student.target"):
        load_recipe(None, {"student.target": "flops=0.3"})


def test_finish_estimate_counts_eval_comparison_and_edge_runtimes():
    """The end-of-run estimate grows with the eval set, caps the back-end comparison at
    BUDGET_COMPARE_IMAGES, and adds each installed edge runtime's conversion (none when absent),
    as a multiple of the student's measured ONNX export, so it follows the machine's speed."""
    from dfkd_deploy.budget.calibrate import BUDGET_COMPARE_IMAGES, EDGE_PER_EXPORT, finish_seconds
    from dfkd_deploy.recipe import load_recipe

    def est(eval_images, runtimes, installed=lambda r: True, export_s=1.0):
        recipe = load_recipe(None, {"deploy.edge_runtimes": runtimes})
        return finish_seconds(recipe, round_s=10.0, export_s=export_s, teacher_img_s=0.003, student_img_s=0.001,
                              eval_images=eval_images, latency_s=2.0, installed=installed)

    base = est(0, [])
    assert est(10_000, []) - base == pytest.approx(10_000 * 0.005 + BUDGET_COMPARE_IMAGES * 0.001 * 3)
    assert est(20_000, []) - est(10_000, []) == pytest.approx(10_000 * 0.005)      # comparison capped
    et = est(0, ["executorch"]) - base
    assert et == pytest.approx(EDGE_PER_EXPORT["executorch"] * 1.0
                               + 2 * 0.001 * 512 + 2.0, rel=1e-6)   # conversion, 2 files compared on the probes, latency
    # a machine (or a student) whose export takes twice as long: twice the conversion
    assert (est(0, ["executorch"], export_s=2.0) - est(0, [], export_s=2.0)) - et == \
        pytest.approx(EDGE_PER_EXPORT["executorch"] * 1.0, rel=1e-6)
    assert est(0, ["executorch", "openvino"], installed=lambda r: False) == base


def test_a_budget_too_short_for_the_edge_runtimes_leaves_them_out(monkeypatch):
    """With stubbed costs: the run fits only without the edge runtimes' conversion, so the plan
    drops them (and the recipe it yields has none); too short even without them still refuses."""
    from dfkd_deploy.budget import session
    from dfkd_deploy.recipe import load_recipe

    recipe = load_recipe(None, {"budget": "60s", "deploy.edge_runtimes": ["openvino", "executorch"]})
    heavy = Costs(synth_round_s=1.0, kd_step_s=0.1, epoch_overhead_s=0.0, finish_s=70.0, edge_s=40.0)
    monkeypatch.setattr(session, "calibrate", lambda *a, **k: heavy)
    plan = session.plan_for(None, recipe, None, "cpu", spent_s=0.0)
    assert plan.edge_runtimes_dropped and plan.estimated_s <= 60
    assert plan.costs.finish_s == 70.0                        # the measured costs are what is reported
    assert plan.apply(recipe).deploy.edge_runtimes == []
    light = Costs(synth_round_s=1.0, kd_step_s=0.1, epoch_overhead_s=0.0, finish_s=20.0, edge_s=10.0)
    monkeypatch.setattr(session, "calibrate", lambda *a, **k: light)
    kept = session.plan_for(None, recipe, None, "cpu", spent_s=0.0)
    assert not kept.edge_runtimes_dropped and kept.apply(recipe).deploy.edge_runtimes == ["openvino", "executorch"]
    hopeless = Costs(synth_round_s=1.0, kd_step_s=0.1, epoch_overhead_s=0.0, finish_s=100.0, edge_s=10.0)
    monkeypatch.setattr(session, "calibrate", lambda *a, **k: hopeless)
    with pytest.raises(UsageError, match="too short"):
        session.plan_for(None, recipe, None, "cpu", spent_s=0.0)


@pytest.mark.parametrize("done", [0, 3, 7, 11])
@pytest.mark.parametrize("left_fraction", [1.0, 0.5, 0.2, 0.02])
def test_a_resumed_run_fits_what_is_left_with_the_same_epochs(done, left_fraction):
    """A run stopped at epoch ``done`` and resumed when only part of the time its plan needs is
    left: the epochs (and so the cosine schedule in the checkpoint) stay, the per-epoch counts
    shrink until the rest fits, or the note says by how much it cannot."""
    from dfkd_deploy.budget.planner import remaining_seconds, replan_remaining

    costs = Costs(synth_round_s=8.0, kd_step_s=1.2, epoch_overhead_s=0.5, finish_s=60.0)
    plan = plan_budget(1800, costs, spent_s=10, synth_batch=64)
    assert plan.epochs > 11
    need = remaining_seconds(plan, done)
    new, note = replan_remaining(plan, done, left_fraction * need / (1 - MARGIN))
    assert (new.epochs, new.warmup) == (plan.epochs, plan.warmup)
    if left_fraction == 1.0:
        assert new == plan and note is None
        return
    assert note and f"resumed at epoch {done} of {plan.epochs}" in note
    assert 1 <= new.rounds_per_epoch <= plan.rounds_per_epoch and 1 <= new.kd_steps <= plan.kd_steps
    after = remaining_seconds(new, done)
    shortest = remaining_seconds(plan, done, rounds_per_epoch=1, kd_steps=1)
    if shortest <= left_fraction * need:
        assert after <= left_fraction * need + 1e-6 and "overruns" not in note
    else:
        assert (new.rounds_per_epoch, new.kd_steps) == (1, 1) and "overruns" in note
    assert new.pool_images == (done * plan.rounds_per_epoch + (plan.epochs - done) * new.rounds_per_epoch) * 64


def test_a_replanned_resume_passes_the_recipe_check():
    from dfkd_deploy.distill.checkpoint import recipe_changes
    from dfkd_deploy.recipe import load_recipe

    saved = load_recipe(None, {"distillation.kd_steps": 40, "synthesis.rounds_per_epoch": 3}).model_dump(mode="json")
    now = load_recipe(None, {"distillation.kd_steps": 12, "synthesis.rounds_per_epoch": 1}).model_dump(mode="json")
    assert recipe_changes(saved, now) == []
    lr = load_recipe(None, {"distillation.lr": 0.5}).model_dump(mode="json")
    assert recipe_changes(saved, lr) != []


def test_resume_with_little_budget_left_replans_and_says_so(tmp_path):
    """session.start(resume=True) reads the saved plan and the checkpoint's epoch, and cuts the
    remaining epochs' counts to the time left (here: an earlier session used most of the budget)."""
    import json
    import time

    from dfkd_deploy.budget import session as budget_session
    from dfkd_deploy.distill.checkpoint import REQUIRED_KEYS, save_checkpoint
    from dfkd_deploy.recipe import load_recipe

    costs = Costs(synth_round_s=8.0, kd_step_s=1.2, epoch_overhead_s=0.5, finish_s=60.0)
    plan = plan_budget(1800, costs, spent_s=10, synth_batch=64)
    now = time.time()
    (tmp_path / "checkpoints").mkdir()
    state = {k: {} for k in REQUIRED_KEYS}
    state.update(epoch=4, world_size=1, ranks=[{"rng": {}, "pool_shards": 0, "pool_files": [], "synthesizer": {}}])
    save_checkpoint(tmp_path / "checkpoints" / "last.pt", state)
    json.dump({"requested_s": 1800, "plan": plan.to_dict(), "session_started": now - 60,
               "used_before_s": 1500.0}, (tmp_path / budget_session.BUDGET_FILE).open("w"))
    recipe = load_recipe(None, {"budget": "30m"})
    s = budget_session.start(None, recipe, None, tmp_path, "cpu", started=now, resume=True)
    assert s.used_before_s >= 1500
    assert (s.plan.epochs, s.plan.warmup) == (plan.epochs, plan.warmup)
    assert s.plan.kd_steps < plan.kd_steps and any("resumed at epoch 4" in n for n in s.notes)
    saved = json.loads((tmp_path / budget_session.BUDGET_FILE).read_text())
    assert saved["plan"]["kd_steps"] == s.plan.kd_steps      # a second resume starts from the cut plan


@pytest.mark.parametrize("budget_s", [600, 1800, 3600])
@pytest.mark.parametrize("probe_batch_s", [0.0, 5.0, 127.0, 400.0])
def test_probes_are_cut_to_a_share_of_the_budget(budget_s, probe_batch_s):
    from dfkd_deploy.budget.planner import PROBE_SHARE, cap_probes

    costs = Costs(synth_round_s=1.0, kd_step_s=0.1, epoch_overhead_s=0.0, finish_s=50.0, probe_batch_s=probe_batch_s)
    n, saved = cap_probes(budget_s, costs, 512, 64)
    batches = n // 64
    assert n % 64 == 0 and 64 <= n <= 512
    if 8 * probe_batch_s <= PROBE_SHARE * budget_s:
        assert (n, saved) == (512, 0.0)
    else:
        assert batches == 1 or batches * probe_batch_s <= PROBE_SHARE * budget_s   # one batch always stays
        assert saved == pytest.approx((8 - batches) * probe_batch_s)


def test_a_budgeted_plan_cuts_probes_that_would_eat_the_budget(monkeypatch):
    """The ImageNet case: 512 probes at 224 px, 127 s a batch of 64, in an hour."""
    from dfkd_deploy.budget import session
    from dfkd_deploy.recipe import load_recipe

    recipe = load_recipe(None, {"budget": "60m", "synthesis.batch_size": 64, "validation.probe_images": 512,
                                "deploy.edge_runtimes": []})
    costs = Costs(synth_round_s=181.0, kd_step_s=20.0, epoch_overhead_s=0.1, finish_s=1500.0, probe_batch_s=127.0)
    monkeypatch.setattr(session, "calibrate", lambda *a, **k: costs)
    plan = session.plan_for(None, recipe, None, "cpu", spent_s=300.0)
    assert plan.probe_images == 128 and plan.apply(recipe).validation.probe_images == 128
    assert plan.costs.finish_s == pytest.approx(1500.0 - 6 * 127.0)      # the time saved goes to training
    uncut = replace_probe(costs)
    monkeypatch.setattr(session, "calibrate", lambda *a, **k: uncut)
    assert session.plan_for(None, recipe, None, "cpu", spent_s=300.0).probe_images is None


def replace_probe(costs):
    from dataclasses import replace

    return replace(costs, probe_batch_s=10.0)


@pytest.mark.parametrize("kd_ratio,synth_ratio", [(0.47, 0.96), (0.5, 0.5), (1.0, 1.0), (1.6, 1.3), (3.0, 1.0)])
@pytest.mark.parametrize("done", [4, 20, 40])
def test_retune_fits_the_rest_to_the_measured_costs(kd_ratio, synth_ratio, done):
    """After some epochs the measured KD step and synthesis round (here ``kd_ratio`` and
    ``synth_ratio`` times the calibration's: 0.47/0.96 is what the 60-minute ResNet-56 run saw)
    give new per-epoch counts: the epochs stay, the rest at the measured costs ends inside what is
    left of the budget, using all but the margin and tolerance of it."""
    from dataclasses import replace

    from dfkd_deploy.budget.planner import RETUNE_TOLERANCE, remaining_seconds, retune

    costs = Costs(synth_round_s=7.8, kd_step_s=0.74, epoch_overhead_s=0.02, finish_s=127.0)
    plan = plan_budget(3600, costs, spent_s=24, synth_batch=256)
    measured = replace(costs, synth_round_s=7.8 * synth_ratio, kd_step_s=0.74 * kd_ratio)
    left = 3600 - 24 - done * (plan.rounds_per_epoch * measured.synth_round_s) \
        - max(0, done - plan.warmup) * plan.kd_steps * measured.kd_step_s
    new, note = retune(plan, done, left, measured)
    assert (new.epochs, new.warmup) == (plan.epochs, plan.warmup)
    rest = remaining_seconds(new if note else replace(plan, costs=measured), done)
    target = left - MARGIN * 3600
    if note is None:
        assert (kd_ratio, synth_ratio) == (1.0, 1.0) or abs(rest - target) <= RETUNE_TOLERANCE * 3600
        return
    assert f"re-tuned at epoch {done} of {plan.epochs}" in note and new.costs == measured
    assert rest <= target + 1e-6
    # the budget is used, not left idle: one more KD step in each remaining epoch would not fit
    assert remaining_seconds(new, done, kd_steps=new.kd_steps + 1) > target
    if kd_ratio < 1 and synth_ratio <= 1:
        assert new.kd_steps > plan.kd_steps
    if kd_ratio > 1:
        assert new.kd_steps < plan.kd_steps


@pytest.mark.parametrize("synth_ratio,kd_ratio", [(0.63, 0.97), (1.5, 1.0), (0.63, 0.63), (1.0, 0.5)])
def test_retune_keeps_the_plans_split_between_synthesis_and_kd(synth_ratio, kd_ratio):
    """A calibration that mis-times one cost more than the other (a round of 64 timed at 2.33 s
    that ran at 1.48 s, KD steps timed right, in a 60-minute dynamo ResNet-56 run) must not move
    the synthesis share the plan chose: the re-tuned counts split the rest of each epoch as the
    plan did, to within one synthesis round, and still fit what is left."""
    from dataclasses import replace

    from dfkd_deploy.budget.planner import remaining_seconds, retune

    costs = Costs(synth_round_s=2.33, kd_step_s=0.524, epoch_overhead_s=0.02, finish_s=150.0)
    plan = plan_budget(3600, costs, spent_s=40, synth_batch=64, synthesis_share=0.3)
    measured = replace(costs, synth_round_s=2.33 * synth_ratio, kd_step_s=0.524 * kd_ratio)
    done = plan.warmup + 2
    left = 3600 - 40 - done * plan.rounds_per_epoch * measured.synth_round_s \
        - 2 * plan.kd_steps * measured.kd_step_s

    def share(p, c):
        synth = p.rounds_per_epoch * c.synth_round_s
        return synth / (synth + p.kd_steps * c.kd_step_s)

    new, note = retune(plan, done, left, measured)
    assert note is not None and (new.epochs, new.warmup) == (plan.epochs, plan.warmup)
    assert remaining_seconds(new, done) <= left - MARGIN * 3600 + 1e-6
    one_round = measured.synth_round_s / (new.rounds_per_epoch * measured.synth_round_s
                                          + new.kd_steps * measured.kd_step_s)
    assert abs(share(new, measured) - share(plan, costs)) <= one_round + 0.01, (share(new, measured), share(plan, costs))
    if synth_ratio < kd_ratio:   # rounds cheaper than timed, relative to KD steps: more rounds an epoch
        assert new.rounds_per_epoch > plan.rounds_per_epoch


def test_retune_hook_changes_the_distillers_counts_and_budget_json(tmp_path):
    """The Retuner, called as the distiller's epoch hook, re-tunes once the warm-up and two KD
    epochs are done: the distiller's recipe, the session's plan and budget.json get the new counts."""
    import json
    import time
    from types import SimpleNamespace

    from dfkd_deploy.budget import session as budget_session
    from dfkd_deploy.recipe import load_recipe

    costs = Costs(synth_round_s=8.0, kd_step_s=1.0, epoch_overhead_s=0.0, finish_s=60.0)
    plan = plan_budget(1800, costs, spent_s=10, synth_batch=64)
    s = budget_session.BudgetSession(1800.0, plan, started=time.time() - 10)
    recipe = plan.apply(load_recipe(None, {"budget": "30m"}))
    distiller = SimpleNamespace(recipe=recipe, synth=object(), epoch=0, synthesis_seconds=0.0,
                                distillation_seconds=0.0)
    hook = budget_session.Retuner(s, distiller, tmp_path)
    for epoch in range(1, plan.warmup + budget_session.RETUNE_AFTER_KD_EPOCHS + 1):
        distiller.epoch = epoch
        distiller.synthesis_seconds += 8.0 * plan.rounds_per_epoch            # as calibrated
        row = {}
        if epoch > plan.warmup:
            distiller.distillation_seconds += 0.4 * distiller.recipe.distillation.kd_steps   # 2.5x faster
            row["kd_loss"] = 1.0
        s.started -= 8.0 * plan.rounds_per_epoch + ("kd_loss" in row) * 0.4 * plan.kd_steps   # the time passes
        hook(row, None)
    assert s.plan.kd_steps > plan.kd_steps and s.plan.costs.kd_step_s == pytest.approx(0.4)
    assert distiller.recipe.distillation.kd_steps == s.plan.kd_steps
    assert distiller.recipe.distillation.epochs == plan.epochs
    assert any("re-tuned at epoch" in n and "calibrated 1.000" in n for n in s.notes)
    saved = json.loads((tmp_path / budget_session.BUDGET_FILE).read_text())
    assert saved["plan"]["kd_steps"] == s.plan.kd_steps      # --resume continues the re-tuned plan


def test_the_synthesis_share_of_the_recipe_splits_the_training_time(monkeypatch):
    """distillation.synthesis_share: more of it buys synthesis rounds at the cost of KD steps; the
    plan fits the budget either way."""
    from dfkd_deploy.budget import session
    from dfkd_deploy.recipe import load_recipe

    costs = Costs(synth_round_s=6.0, kd_step_s=0.5, epoch_overhead_s=0.1, finish_s=60.0)
    monkeypatch.setattr(session, "calibrate", lambda *a, **k: costs)
    plans = {share: session.plan_for(None, load_recipe(None, {"budget": "30m", "distillation.synthesis_share": share}),
                                     None, "cpu", spent_s=0.0) for share in (0.3, 0.5, 0.7)}
    synth = {share: p.rounds * costs.synth_round_s for share, p in plans.items()}
    kd = {share: p.kd_steps * (p.epochs - p.warmup) * costs.kd_step_s for share, p in plans.items()}
    assert synth[0.3] < synth[0.5] < synth[0.7] and kd[0.3] > kd[0.5] > kd[0.7]
    for share, p in plans.items():
        assert p.estimated_s <= 1800 * (1 - MARGIN) + 1e-6
        assert synth[share] / (synth[share] + kd[share]) == pytest.approx(share, abs=0.08)


@pytest.mark.parametrize("budget_s", [600, 1800, 3600])
@pytest.mark.parametrize("share", [0.3, 0.5, 0.7])
def test_cheap_rounds_keep_the_synthesis_share(budget_s, share):
    """Rounds so cheap that more than MAX_EPOCHS of them fit go several to an epoch, so the plan
    still spends ``share`` of the training time on synthesis (a 30-minute Fashion-MNIST plan made
    200 of its 363 rounds before: a share of 29% instead of 50%)."""
    from dfkd_deploy.budget.planner import MAX_EPOCHS, ROUNDS_KEPT

    costs = Costs(synth_round_s=2.27, kd_step_s=0.005, epoch_overhead_s=0.01, finish_s=60.0)
    plan = plan_budget(budget_s, costs, spent_s=20.0, synth_batch=256, synthesis_share=share)
    train_s = budget_s * (1 - MARGIN) - 20.0 - costs.finish_s
    asked = int(share * train_s // costs.synth_round_s)
    assert asked > MAX_EPOCHS or budget_s == 600          # the case this is about (and one without it)
    assert plan.rounds >= ROUNDS_KEPT * asked and plan.epochs <= MAX_EPOCHS
    synth = plan.rounds * costs.synth_round_s
    kd = plan.kd_steps * (plan.epochs - plan.warmup) * costs.kd_step_s
    assert synth / (synth + kd) == pytest.approx(share, abs=0.05)
    assert plan.estimated_s <= budget_s * (1 - MARGIN) + 1e-6
