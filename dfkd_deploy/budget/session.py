"""A budgeted run's bookkeeping: the plan (made once, kept in RUN/budget.json so ``--resume``
continues the same schedule) and the time used across sessions, for report.json's ``budget``."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from dfkd_deploy.budget.calibrate import calibrate
from dfkd_deploy.budget.planner import (PROBE_SHARE, Costs, Plan, cap_probes, plan_budget, replan_remaining, retune,
                                        synthesis_share)
from dfkd_deploy.core.units import parse_duration
from dfkd_deploy.core.errors import UsageError
from dfkd_deploy.core.io import write_json
from dfkd_deploy.recipe import synthesis_batch

BUDGET_FILE = "budget.json"
# A budgeted run re-tunes its per-epoch counts with the costs it measures (planner.retune) after
# this many KD epochs, and again at these fractions of its KD epochs, each time with the costs
# measured since the last check (a 10-minute run slowed by another job for a while was cut to one
# KD step per epoch half way; the check at three quarters gives the steps back once it is quiet).
RETUNE_AFTER_KD_EPOCHS = 2
RETUNE_AT_FRACTIONS = (0.5, 0.75)


@dataclass
class BudgetSession:
    requested_s: float
    plan: Plan
    started: float                 # this session's start (time.time())
    used_before_s: float = 0.0     # earlier sessions, up to their last checkpoint
    notes: list[str] = field(default_factory=list)

    def used_s(self) -> float:
        return self.used_before_s + (time.time() - self.started)

    def section(self) -> dict:
        """report.json ``budget``."""
        used = self.used_s()
        return {"budget": {"requested_s": round(self.requested_s, 2), "used_s": round(used, 2),
                           "used_fraction": round(used / self.requested_s, 4), "plan": self.plan.to_dict(),
                           "sessions_before_s": round(self.used_before_s, 2), "notes": self.notes}}


def plan_for(teacher, recipe, student, device, *, spent_s: float, eval_images: int = 0, ctx=None) -> Plan:
    """Calibrate, then plan; the calibration's own time counts as spent. When the budget is too
    short for the run with its edge runtimes but not without them, the plan leaves them out
    (``edge_runtimes_dropped``; the caller says so) rather than refusing the run.

    Under torchrun every rank calibrates its own share (its part of each synthesis round and KD
    batch, side by side as they will train), rank 0 plans with the slowest rank's costs and every
    rank takes rank 0's plan, so the ranks run one schedule."""
    from dfkd_deploy.core import distributed

    ctx = ctx or distributed.current()
    t0 = time.perf_counter()
    costs = calibrate(teacher, rank_share(recipe, ctx), student, device, eval_images=eval_images)
    if ctx.enabled:
        everyone = ctx.gather(asdict(costs))
        costs = ctx.broadcast(slowest(everyone) if ctx.is_main else None)
        costs = replace(costs, kd_step_s=costs.kd_step_s + collective_seconds(student, ctx))
    spent = spent_s + time.perf_counter() - t0
    if ctx.enabled:
        spent = ctx.broadcast(spent)
    budget_s = parse_duration(recipe.budget)
    probes, saved = cap_probes(budget_s, costs, recipe.validation.probe_images, synthesis_batch(recipe.synthesis))
    costs = replace(costs, finish_s=costs.finish_s - saved)   # (what the plan and a resume count on)

    def plan() -> Plan:
        kw = dict(spent_s=spent, synth_batch=synthesis_batch(recipe.synthesis),
                  synthesis_share=synthesis_share(recipe))
        cut = {"costs": costs, "probe_images": probes if probes < recipe.validation.probe_images else None}
        try:
            return replace(plan_budget(budget_s, costs, **kw), **cut)
        except UsageError:
            if costs.edge_s <= 0:
                raise
        lean = replace(costs, finish_s=costs.finish_s - costs.edge_s, edge_s=0.0)
        chosen = plan_budget(budget_s, lean, **kw)   # still too short: the error says so
        return replace(chosen, edge_runtimes_dropped=True, **cut)

    return ctx.on_main(plan)      # (an error there, "too short", reaches every rank)


def collective_seconds(student, ctx, repeats: int = 5) -> float:
    """What averaging the student's gradients over the ranks adds to each KD step (the median of a
    few all-reduces of a buffer that size, the slowest rank's figure): a 3-minute two-process run
    planned without it used 125% of its budget over 4,320 KD steps. 0 without a student."""
    if student is None or not ctx.enabled:
        return 0.0
    import statistics

    import torch

    params = [torch.nn.Parameter(p.detach().clone()) for p in student.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        ctx.average_gradients(params)
        times.append(time.perf_counter() - t0)
    mine = statistics.median(times[1:])             # (the first call sets the group's buffers up)
    return _slowest(ctx, mine)


def _slowest(ctx, value: float) -> float:
    gathered = ctx.gather(value)
    return ctx.broadcast(max(gathered) if ctx.is_main else None)


def rank_share(recipe, ctx):
    """The recipe one rank calibrates with: its share of each synthesis round and KD batch."""
    from dfkd_deploy.core import distributed

    if not ctx.enabled:
        return recipe
    local = distributed.rank_recipe(recipe, ctx)
    local.distillation.batch_size = distributed.per_rank(recipe.distillation.batch_size, ctx,
                                                         "distillation.batch_size")
    return local


def slowest(costs: list[dict]) -> Costs:
    """Each cost at its largest over the ranks (the ranks wait for each other every step)."""
    return Costs(**{k: max(c[k] for c in costs) for k in costs[0]})


def _checkpoint_epoch(path: Path) -> int:
    """The epochs a checkpoint has finished (0 when it cannot say)."""
    from dfkd_deploy.distill.checkpoint import load_checkpoint

    try:
        return int(load_checkpoint(path).get("epoch", 0))
    except Exception:  # noqa: BLE001 - the trainer's own resume reports a bad checkpoint in its words
        return 0


def start(teacher, recipe, student, run_dir: Path, device, *, started: float, resume: bool,
          eval_images: int = 0, ctx=None) -> BudgetSession:
    """A fresh run: calibrate and plan (the calibration's own time counts as spent). A resumed
    run: the saved plan, and the time the earlier sessions used up to their last checkpoint."""
    from dfkd_deploy.core import distributed

    ctx = ctx or distributed.current()
    requested = parse_duration(recipe.budget)
    path = Path(run_dir) / BUDGET_FILE
    if resume:
        if not path.is_file():
            raise UsageError(f"--resume with a budget: {path} is missing (the run was not started with one)")
        saved = json.loads(path.read_text(encoding="utf-8"))
        ckpt = Path(run_dir) / "checkpoints" / "last.pt"
        used = saved["used_before_s"] + max(0.0, ckpt.stat().st_mtime - saved["session_started"])
        plan = Plan(**{**{k: saved["plan"][k] for k in Plan.__dataclass_fields__ if k != "costs" and k in saved["plan"]},
                       "costs": Costs(**saved["plan"]["costs"])})
        def replan():      # on rank 0 alone under torchrun: the ranks must not cut differently
            left = max(0.0, requested - used - (time.time() - started))
            return replan_remaining(plan, _checkpoint_epoch(ckpt), left)

        plan, replanned = ctx.on_main(replan)
        session = BudgetSession(requested, plan, started, used,
                                [f"resumed with {max(0.0, requested - used):.0f} s of the budget left"]
                                + ([replanned] if replanned else []))
    else:
        plan = plan_for(teacher, recipe, student, device, spent_s=time.time() - started, eval_images=eval_images,
                        ctx=ctx)
        notes = []
        if plan.probe_images is not None:
            asked = recipe.validation.probe_images
            all_s = -(-asked // synthesis_batch(recipe.synthesis)) * plan.costs.probe_batch_s
            notes.append(f"held-out probes cut from {asked} to {plan.probe_images}: synthesizing them all would "
                         f"take about {all_s:.0f} s, over {PROBE_SHARE:.0%} of the budget (the data-free "
                         "estimate's interval is wider)")
        if plan.edge_runtimes_dropped:
            notes.append(f"the budget cannot also fit the edge runtimes ({', '.join(recipe.deploy.edge_runtimes)}: "
                         f"about {plan.costs.edge_s:.0f} s to convert, compare and time): this run leaves them out; "
                         "a longer budget keeps them, deploy.edge_runtimes: [] says so in the recipe")
        session = BudgetSession(requested, plan, started, notes=notes)
    if ctx.is_main:
        save(session, run_dir)
    ctx.barrier()     # (a no-op in one process)
    return session


def save(session: BudgetSession, run_dir: Path) -> None:
    """RUN/budget.json: what --resume continues from."""
    write_json(Path(run_dir) / BUDGET_FILE, {"requested_s": session.requested_s, "plan": session.plan.to_dict(),
                                             "session_started": session.started,
                                             "used_before_s": session.used_before_s})


class Retuner:
    """An epoch hook of a budgeted run (every rank): after RETUNE_AFTER_KD_EPOCHS KD epochs and
    again at RETUNE_AT_FRACTIONS of them, the synthesis round and KD step as measured since the
    last check go to :func:`planner.retune`; new per-epoch counts go into the distiller's recipe,
    the session's plan, budget.json and report.json's budget notes. Under torchrun each cost is
    the slowest rank's and rank 0 alone decides."""

    def __init__(self, session: BudgetSession, distiller, run_dir: Path, ctx=None):
        from dfkd_deploy.core import distributed

        self.session, self.distiller, self.run_dir = session, distiller, Path(run_dir)
        self.ctx = ctx or distributed.current()
        self.synth_s0, self.kd_s0 = distiller.synthesis_seconds, distiller.distillation_seconds
        self.rounds = self.steps = 0
        p = session.plan
        self.at = {p.warmup + RETUNE_AFTER_KD_EPOCHS} | {p.warmup + int(f * (p.epochs - p.warmup))
                                                         for f in RETUNE_AT_FRACTIONS}

    def __call__(self, row: dict, _batch) -> None:
        d = self.distiller
        if d.synth is not None:
            self.rounds += d.recipe.synthesis.rounds_per_epoch
        if "kd_loss" in row:
            self.steps += d.recipe.distillation.kd_steps
        plan = self.session.plan
        if d.epoch not in self.at or d.epoch >= plan.epochs - 1 or not self.steps:
            return
        synth = (d.synthesis_seconds - self.synth_s0) / self.rounds if self.rounds else plan.costs.synth_round_s
        kd = (d.distillation_seconds - self.kd_s0) / self.steps
        self.synth_s0, self.kd_s0 = d.synthesis_seconds, d.distillation_seconds   # the next window
        self.rounds = self.steps = 0
        if self.ctx.enabled:
            synth, kd = _slowest(self.ctx, synth), _slowest(self.ctx, kd)
        measured = replace(plan.costs, synth_round_s=synth, kd_step_s=kd)
        left = self.session.requested_s - self.session.used_s()
        new, note = self.ctx.on_main(lambda: retune(plan, d.epoch, left, measured))
        if note is None:
            return
        self.session.plan = new
        self.session.notes.append(note)
        d.recipe = new.apply(d.recipe)
        if self.ctx.is_main:
            save(self.session, self.run_dir)
            from dfkd_deploy.core.progress import console

            console.print(f"budget: {note}")
