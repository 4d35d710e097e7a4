"""The budget planner: a pure function from measured step costs to a run plan.

Given what one synthesis round, one KD step, one epoch's bookkeeping and the end of the run
(probes, export, INT8, validation, bundle, reports) cost, and what was spent before training
(loading, building the student, calibrating), it chooses the rounds (pool size), epochs, warm-up
and KD steps per epoch so that the estimated whole run ends inside the budget, a safety margin
short of it. The learning rate's cosine then runs over the planned KD epochs, i.e. over the real
budget, not over a long schedule cut short.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from dfkd_deploy.core.errors import UsageError
from dfkd_deploy.recipe import SYNTHESIS_SHARE

WARMUP_SHARE = 0.1        # of the epochs: synthesis only, the pool fills before KD starts
MAX_EPOCHS = 200          # rounds beyond this go several to an epoch (fewer checkpoints)
ROUNDS_KEPT = 0.97         # a plan makes at least this share of the rounds synthesis_share asks for
MARGIN = 0.04             # of the budget, kept back for what the estimates miss
PROBE_SHARE = 0.1         # of the budget, the most the held-out probes' synthesis may take
# Mid-run re-tuning (see retune): a plan whose remaining epochs, at the costs measured so far, miss
# what is left of the budget by more than this share of it gets new per-epoch counts.
RETUNE_TOLERANCE = 0.05
RETUNE_MAX_SCALE = 8.0    # the most the per-epoch counts may grow in one re-tune

@dataclass(frozen=True)
class Costs:
    synth_round_s: float      # one synthesis round (synthesis.batch_size images)
    kd_step_s: float          # one KD step (distillation.batch_size images)
    epoch_overhead_s: float   # checkpoint and pool bookkeeping, per epoch
    finish_s: float           # probes, export, INT8, validation, bundle, reports
    edge_s: float = 0.0       # the part of finish_s that converts, compares and times the edge runtimes
    probe_batch_s: float = 0.0  # one batch (synthesis.batch_size) of held-out probes, part of finish_s


@dataclass(frozen=True)
class Plan:
    budget_s: float
    spent_s: float            # before training (load, student, calibration)
    epochs: int
    warmup: int
    rounds_per_epoch: int
    kd_steps: int             # per KD epoch
    pool_images: int
    estimated_s: float        # the whole run, spent_s included
    costs: Costs
    edge_runtimes_dropped: bool = False   # the budget could not fit them: the run leaves them out
    probe_images: int | None = None       # held-out probes cut to fit PROBE_SHARE of the budget (None: as asked)

    @property
    def rounds(self) -> int:
        return self.epochs * self.rounds_per_epoch

    def to_dict(self) -> dict:
        out = asdict(self)
        # the counts of this plan over every epoch: after a re-tune, the epochs before it ran other
        # counts (report.json's synthesis.images and distillation.kd_steps say what ran)
        out["rounds"] = self.rounds
        out["kd_steps_total"] = self.kd_steps * (self.epochs - self.warmup)
        out["costs"] = {k: round(v, 4) for k, v in asdict(self.costs).items()}
        for k in ("budget_s", "spent_s", "estimated_s"):
            out[k] = round(out[k], 2)
        return out

    def apply(self, recipe):
        """The recipe with the planned synthesis/distillation counts."""
        s = recipe.synthesis.model_copy(update={"rounds_per_epoch": self.rounds_per_epoch})
        d = recipe.distillation.model_copy(update={"epochs": self.epochs, "warmup": self.warmup,
                                                   "kd_steps": self.kd_steps})
        if s.reset_l0_after is not None and self.warmup + s.reset_l0_after > self.epochs:
            s = s.model_copy(update={"reset_l0_after": None})   # would never happen inside this plan
        update = {"synthesis": s, "distillation": d}
        if self.edge_runtimes_dropped:
            update["deploy"] = recipe.deploy.model_copy(update={"edge_runtimes": []})
        if self.probe_images is not None:
            update["validation"] = recipe.validation.model_copy(update={"probe_images": self.probe_images})
        return recipe.model_copy(update=update)


def estimate(costs: Costs, *, spent_s: float, epochs: int, warmup: int, rounds_per_epoch: int, kd_steps: int) -> float:
    return (spent_s + epochs * rounds_per_epoch * costs.synth_round_s + (epochs - warmup) * kd_steps * costs.kd_step_s
            + epochs * costs.epoch_overhead_s + costs.finish_s)


def minimum_seconds(costs: Costs, spent_s: float = 0.0) -> float:
    """The shortest run there is: two epochs of one round, one of them with one KD step."""
    return (spent_s + estimate(costs, spent_s=0, epochs=2, warmup=1, rounds_per_epoch=1, kd_steps=1)) / (1 - MARGIN)


def synthesis_share(recipe) -> float:
    """The recipe's ``distillation.synthesis_share``; ``auto`` not yet resolved against a teacher
    (students/build.resolve_init does that) plans with SYNTHESIS_SHARE."""
    share = recipe.distillation.synthesis_share
    return SYNTHESIS_SHARE if share == "auto" else float(share)


def plan_budget(budget_s: float, costs: Costs, *, spent_s: float, synth_batch: int,
                synthesis_share: float = SYNTHESIS_SHARE, warmup_share: float = WARMUP_SHARE,
                max_epochs: int = MAX_EPOCHS, margin: float = MARGIN) -> Plan:
    """The plan that uses the budget: ``synthesis_share`` of the training time synthesizes, the rest
    trains; the estimated whole run is at most ``budget_s * (1 - margin)``."""
    target = budget_s * (1 - margin)
    train_s = target - spent_s - costs.finish_s
    need = minimum_seconds(costs, spent_s)
    if train_s <= 0 or need > budget_s:
        raise UsageError(f"a budget of {budget_s:.0f} s is too short for this teacher on this machine: the "
                         f"shortest run takes about {need:.0f} s (one synthesis round {costs.synth_round_s:.1f} s, "
                         f"one KD step {costs.kd_step_s:.2f} s, the end of the run {costs.finish_s:.0f} s, "
                         f"{spent_s:.0f} s already spent)")
    rounds = max(2, int(synthesis_share * train_s // costs.synth_round_s))
    candidates = []
    for epochs in range(2, max(2, min(rounds, max_epochs)) + 1):
        c = _candidate(costs, train_s, rounds, epochs, warmup_share)
        if c is not None:
            candidates.append(c)
    if not candidates:   # the shortest run (the budget check above guarantees it fits)
        candidates = [(2, 1, 1, 1)]
    # Plans that make about the synthesis rounds the share asks for: with cheap rounds (more than
    # max_epochs of them) the most epochs would otherwise be max_epochs x 1 round and the KD steps
    # would take the rest (a 30-minute Fashion-MNIST plan: 200 of 363 rounds, a synthesis share of
    # 29%), and the share is what moved accuracy most at equal wall time (docs/method.md).
    full = [c for c in candidates if c[0] * c[2] >= ROUNDS_KEPT * rounds]
    candidates = full or candidates
    best = max(estimate(costs, spent_s=0, epochs=e, warmup=w, rounds_per_epoch=r, kd_steps=k) for e, w, r, k in candidates)
    # of those, and of the plans that use the budget about as well as the best, the one with the
    # most epochs (synthesis and KD interleave more finely)
    epochs, warmup, rpe, kd_steps = max(
        (c for c in candidates if estimate(costs, spent_s=0, epochs=c[0], warmup=c[1], rounds_per_epoch=c[2],
                                           kd_steps=c[3]) >= 0.98 * best), key=lambda c: c[0])
    total = estimate(costs, spent_s=spent_s, epochs=epochs, warmup=warmup, rounds_per_epoch=rpe, kd_steps=kd_steps)
    return Plan(budget_s, spent_s, epochs, warmup, rpe, kd_steps, epochs * rpe * synth_batch, total, costs)


def _candidate(costs: Costs, train_s: float, rounds: int, epochs: int, warmup_share: float):
    """(epochs, warmup, rounds per epoch, KD steps per epoch) with ``epochs`` epochs, or None."""
    rpe = max(1, rounds // epochs)
    warmup = min(max(1, round(warmup_share * epochs)), epochs - 1)
    left = train_s - epochs * (rpe * costs.synth_round_s + costs.epoch_overhead_s)
    kd_steps = int(left // ((epochs - warmup) * costs.kd_step_s)) if left > 0 else 0
    return (epochs, warmup, rpe, kd_steps) if kd_steps >= 1 else None


def remaining_seconds(plan: Plan, done_epochs: int, *, rounds_per_epoch: int | None = None,
                      kd_steps: int | None = None) -> float:
    """What the epochs after ``done_epochs`` and the end of the run cost (optionally with other
    per-epoch counts)."""
    c = plan.costs
    rpe = plan.rounds_per_epoch if rounds_per_epoch is None else rounds_per_epoch
    kd = plan.kd_steps if kd_steps is None else kd_steps
    left = max(0, plan.epochs - done_epochs)
    kd_epochs = max(0, plan.epochs - max(done_epochs, plan.warmup))
    return left * (rpe * c.synth_round_s + c.epoch_overhead_s) + kd_epochs * kd * c.kd_step_s + c.finish_s


def replan_remaining(plan: Plan, done_epochs: int, left_s: float, *,
                     margin: float = MARGIN) -> tuple[Plan, str | None]:
    """A resumed budgeted run: the saved plan when its remaining epochs fit the time left, else the
    same epochs (so the cosine schedule the checkpoint is on stays as it is) with fewer synthesis
    rounds and KD steps per epoch, cut in the same proportion, so that the rest ends inside the
    budget. (plan, a note for report.json, or None when nothing changed.)"""
    target = left_s * (1 - margin)
    need = remaining_seconds(plan, done_epochs)
    if need <= target or done_epochs >= plan.epochs:
        return plan, None
    rpe, kd = _fit_counts(plan, done_epochs, target, 1.0)   # the largest common cut of both counts that fits
    new = _with_counts(plan, done_epochs, rpe, kd, plan.costs, need)
    after = remaining_seconds(new, done_epochs)
    note = (f"resumed at epoch {done_epochs} of {plan.epochs} with {left_s:.0f} s left, but the saved plan's rest "
            f"needs about {need:.0f} s: the remaining epochs run {rpe} synthesis round(s) (was "
            f"{plan.rounds_per_epoch}) and {kd} KD steps (was {plan.kd_steps}) each, about {after:.0f} s")
    if after > target:
        note += f"; even so the run overruns what is left by about {after - left_s:.0f} s"
    return new, note


def cap_probes(budget_s: float, costs: Costs, probes: int, batch: int,
               share: float = PROBE_SHARE) -> tuple[int, float]:
    """(probe images, seconds saved): the held-out probes as asked when synthesizing them takes at
    most ``share`` of the budget, else the whole batches that fit in it (at least one). At 224 px
    on 2 CPU cores, 512 probes took 1,130 s of a 60-minute run: time training did not get."""
    batches = math.ceil(probes / batch)
    if costs.probe_batch_s <= 0 or batches * costs.probe_batch_s <= share * budget_s:
        return probes, 0.0
    allowed = max(1, int(share * budget_s // costs.probe_batch_s))
    return allowed * batch, (batches - allowed) * costs.probe_batch_s


def _fit_counts(plan: Plan, done_epochs: int, target_s: float, max_scale: float,
                base: tuple[float, float] | None = None) -> tuple[int, int]:
    """(rounds per epoch, KD steps per epoch) for the epochs after ``done_epochs``: the largest
    common scale of ``base`` (default: the plan's counts) whose rest fits ``target_s``, neither
    count above ``max_scale`` times the plan's, then the KD steps that the time still left pays
    for. (1, 1) when nothing fits."""
    base_r, base_k = base or (plan.rounds_per_epoch, plan.kd_steps)
    best = (1, 1)
    lo, hi = 0.0, max_scale / max(base_r / plan.rounds_per_epoch, base_k / max(1, plan.kd_steps), 1e-9)
    for _ in range(40):
        mid = (lo + hi) / 2
        rpe, kd = max(1, int(base_r * mid)), max(1, int(base_k * mid))
        if remaining_seconds(plan, done_epochs, rounds_per_epoch=rpe, kd_steps=kd) <= target_s:
            lo, best = mid, (rpe, kd)
        else:
            hi = mid
    rpe, kd = best
    kd_epochs = max(0, plan.epochs - max(done_epochs, plan.warmup))
    if kd_epochs and plan.costs.kd_step_s > 0:
        spare = target_s - remaining_seconds(plan, done_epochs, rounds_per_epoch=rpe, kd_steps=kd)
        if spare > 0:
            kd = min(int(plan.kd_steps * max_scale) or 1,
                     kd + int(spare // (kd_epochs * plan.costs.kd_step_s)))
    return rpe, kd


def _with_counts(plan: Plan, done_epochs: int, rpe: int, kd: int, costs: Costs, before_s: float) -> Plan:
    """``plan`` from epoch ``done_epochs`` on with these counts and costs (``before_s``: what its
    rest was estimated to cost)."""
    rest = replace(plan, costs=costs)
    after = remaining_seconds(rest, done_epochs, rounds_per_epoch=rpe, kd_steps=kd)
    batch = plan.pool_images // max(1, plan.rounds)           # images per synthesis round
    pool = (done_epochs * plan.rounds_per_epoch + (plan.epochs - done_epochs) * rpe) * batch
    return replace(plan, rounds_per_epoch=rpe, kd_steps=kd, pool_images=pool, costs=costs,
                   estimated_s=plan.estimated_s - before_s + after)


def retune(plan: Plan, done_epochs: int, left_s: float, measured: Costs, *, margin: float = MARGIN,
           tolerance: float = RETUNE_TOLERANCE, max_scale: float = RETUNE_MAX_SCALE) -> tuple[Plan, str | None]:
    """Mid-run, with the synthesis round and KD step as measured over the epochs so far: the same
    epochs (the cosine schedule stays as it is) with the synthesis rounds and KD steps per remaining
    epoch that end the run inside what is left of the budget. More of both where the short
    calibration overestimated them (in the 60-minute ResNet-56 run it timed a KD step at 0.74 s
    and a round at 7.8 s that ran at 0.54 s and 6.5 s, leaving 23% of the hour unused), fewer
    where the machine got slower (another job beside the run); either way the epoch's time stays
    split between synthesis and KD as the plan split it (its synthesis share). (plan, a note for
    report.json, or None when the rest already fits within ``tolerance`` of the budget and the
    split holds to within a round.)"""
    if done_epochs >= plan.epochs:
        return plan, None
    target = left_s - margin * plan.budget_s
    rest = replace(plan, costs=measured)
    need = remaining_seconds(rest, done_epochs)
    # scaled from the counts that keep the plan's split at the measured costs, not from the counts
    # themselves: a calibration that timed a round of 64 at 2.33 s that ran at 1.48 s (KD steps
    # timed right) would otherwise have kept 3 rounds an epoch and given KD the time left, a
    # synthesis share of 18% where the plan asked for 30%
    c = plan.costs
    base = (plan.rounds_per_epoch * c.synth_round_s / measured.synth_round_s if measured.synth_round_s > 0
            else plan.rounds_per_epoch,
            plan.kd_steps * c.kd_step_s / measured.kd_step_s if measured.kd_step_s > 0 else plan.kd_steps)
    if abs(need - target) <= tolerance * plan.budget_s and abs(base[0] - plan.rounds_per_epoch) < 1:
        return plan, None
    rpe, kd = _fit_counts(rest, done_epochs, target, max_scale, base)
    if (rpe, kd) == (plan.rounds_per_epoch, plan.kd_steps):
        return plan, None
    before = remaining_seconds(plan, done_epochs)
    new = _with_counts(plan, done_epochs, rpe, kd, measured, before)
    after = remaining_seconds(new, done_epochs)
    c = plan.costs
    note = (f"re-tuned at epoch {done_epochs} of {plan.epochs} with {left_s:.0f} s left: a synthesis round took "
            f"{measured.synth_round_s:.2f} s (calibrated {c.synth_round_s:.2f}) and a KD step "
            f"{measured.kd_step_s:.3f} s (calibrated {c.kd_step_s:.3f}), so the remaining epochs run {rpe} "
            f"synthesis round(s) (was {plan.rounds_per_epoch}) and {kd} KD steps (was {plan.kd_steps}) each, "
            f"about {after:.0f} s")
    if after > left_s:
        note += f"; even so the run overruns what is left by about {after - left_s:.0f} s"
    return new, note
