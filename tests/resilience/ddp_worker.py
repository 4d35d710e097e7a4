"""One rank of the two-process tests in test_distributed.py.

The test starts two of these with RANK, WORLD_SIZE and LOCAL_RANK as torchrun would set them,
and DFKD_TEST_FILE_STORE naming a file through which they meet (a FileStore: no TCP port chosen
in advance that another process could take first): ``python -m tests.resilience.ddp_worker OUT POOL``.
Everything here is small and random (no teacher file), so both ranks finish in seconds.
"""
from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dfkd_deploy.core import distributed
from dfkd_deploy.distill.trainer import Distiller, seed_everything
from dfkd_deploy.core.io import OutputError
from dfkd_deploy.models.small_cnn import SmallCNN
from dfkd_deploy.synthesis import Priors, build_synthesizer
from dfkd_deploy.synthesis.pool import ImagePool
from dfkd_deploy.teachers import Teacher, TeacherSpec, count_batchnorms

from ..conftest import quick_recipe

SHAPE = (1, 8, 8)


def make_teacher() -> nn.Module:
    torch.manual_seed(123)
    teacher = SmallCNN(10, 1, width=8)
    with torch.no_grad():   # BN statistics a synthesizer can aim at
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return teacher.eval().requires_grad_(False)


def make_student() -> nn.Module:
    """No BatchNorm: per-rank batch statistics are the one thing DDP does not make equal to one
    big batch, and this student is for checking that everything else is."""
    torch.manual_seed(7)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))


def kd_recipe(**over):
    base = {"synthesis.augment.crop_padding": 0, "synthesis.augment.flip": False, "distillation.warmup": 0,
            "distillation.epochs": 3, "distillation.kd_steps": 4, "distillation.batch_size": 32,
            "distillation.lr": 0.05,
            # the split-batch parity is a claim about gradient arithmetic, checked to 1e-6 in fp32;
            # under bf16 autocast a slice and the whole batch round differently (~1e-3)
            "distillation.precision": "fp32"}
    return quick_recipe(**{**base, **over})


def fill_pool(root: Path) -> ImagePool:
    pool = ImagePool(root)
    rng = np.random.default_rng(0)
    for _ in range(3):
        pool.add(torch.from_numpy(rng.random((40, *SHAPE), dtype=np.float32)))
    return pool


def kd_only(run_dir: Path, pool_dir: Path, ctx, *, stop=None, resume=False) -> nn.Module:
    """KD on a fixed pool (no synthesis)."""
    student = make_student()
    d = Distiller(make_teacher(), nn.Identity(), student, None, ImagePool(pool_dir), kd_recipe(), run_dir,
                  show_progress=False, ctx=ctx)
    if resume:
        d.resume()
    d.run(until_epoch=stop)
    return student


def full_loop(run_dir: Path, ctx, *, stop=None, resume=False) -> Distiller:
    """Synthesis + KD, each rank synthesizing its share into its own shards (as api.distill)."""
    recipe = kd_recipe(**{"synthesis.batch_size": 16, "distillation.warmup": 1, "distillation.epochs": 4,
                          "synthesis.reset_l0_after": 2})
    seed_everything(recipe.seed)
    student = make_student()
    local = distributed.rank_recipe(recipe, ctx)
    module = make_teacher()
    teacher = Teacher(module, TeacherSpec("torch", "ddp_worker", SHAPE, num_classes=10,
                                          bn_layers=count_batchnorms(module)))
    synth = build_synthesizer("fastdfkd", teacher, local.synthesis, "cpu",
                              Priors.for_teacher(teacher.spec, local.synthesis.priors))
    pool = ImagePool(run_dir / "pool", rank=ctx.rank, world_size=ctx.world_size)
    d = Distiller(synth.teacher, nn.Identity(), student, synth, pool, recipe, run_dir, show_progress=False, ctx=ctx)
    if resume:
        d.resume()
    d.run(until_epoch=stop)
    return d


def budget_plan(run_dir: Path, ctx) -> dict:
    """A budget under torchrun: each rank calibrates its share (stubbed here with rank-dependent
    costs, so nothing is timed), rank 0 plans with the slowest rank's costs, every rank gets that
    plan, and rank 0 alone writes budget.json."""
    from dfkd_deploy.budget import session as budget_session
    from dfkd_deploy.budget.planner import Costs

    seen = {}

    def calibrate(teacher, recipe, student, device, *, eval_images=0):
        seen.update(synthesis_batch=recipe.synthesis.batch_size, kd_batch=recipe.distillation.batch_size)
        return Costs(synth_round_s=2.0 + ctx.rank, kd_step_s=0.2 - 0.1 * ctx.rank, epoch_overhead_s=0.1,
                     finish_s=30.0)

    budget_session.calibrate = calibrate
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe = kd_recipe(**{"synthesis.batch_size": 16, "budget": "10m"})
    s = budget_session.start(None, recipe, None, run_dir, "cpu", started=time.time(), resume=False,
                             ctx=ctx)
    planned = s.plan.to_dict()
    # the re-tune hook: each rank "measured" its own KD step (rank 1 the slower), nothing is timed
    from types import SimpleNamespace

    fake = SimpleNamespace(recipe=s.plan.apply(recipe), synth=object(), epoch=0, synthesis_seconds=0.0,
                           distillation_seconds=0.0)
    hook = budget_session.Retuner(s, fake, run_dir, ctx)
    for epoch in range(1, s.plan.warmup + budget_session.RETUNE_AFTER_KD_EPOCHS + 1):
        fake.epoch = epoch
        fake.synthesis_seconds += 3.0 * fake.recipe.synthesis.rounds_per_epoch
        row = {}
        if epoch > s.plan.warmup:
            fake.distillation_seconds += (0.05 + 0.02 * ctx.rank) * fake.recipe.distillation.kd_steps
            row["kd_loss"] = 1.0
        hook(row, None)
    return {"plan": planned, "calibrated_with": seen, "retuned": s.plan.to_dict(), "notes": s.notes,
            "recipe_kd_steps": fake.recipe.distillation.kd_steps,
            "collective_s": budget_session.collective_seconds(make_student(), ctx),
            "budget_json": (run_dir / budget_session.BUDGET_FILE).is_file()}


# Long enough for a loaded 2-core machine, short enough that a rank whose peer died fails
# with an error instead of waiting for the library's default (two hours).
COLLECTIVE_TIMEOUT = timedelta(minutes=4)


def join_group() -> None:
    """Initialise the process group through the FileStore the test named; distributed.session
    then uses it as it is (as under any launcher that initialised torch.distributed itself)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = torch.distributed.FileStore(os.environ["DFKD_TEST_FILE_STORE"], world)
    torch.distributed.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                         timeout=COLLECTIVE_TIMEOUT)


def main(out: Path, pool_dir: Path) -> None:
    join_group()
    try:
        run_checks(out, pool_dir)
    finally:
        torch.distributed.destroy_process_group()


def run_checks(out: Path, pool_dir: Path) -> None:
    with distributed.session(torch.device("cpu")) as (ctx, _):
        assert ctx.world_size == 2
        results: dict = {"rank": ctx.rank}

        p = nn.Parameter(torch.zeros(3))
        p.grad = torch.full((3,), float(ctx.rank + 1))
        ctx.average_gradients([p])
        results["averaged_grad"] = p.grad.tolist()

        def fail():
            raise OutputError("cannot write x: no space left on the device")

        try:
            ctx.on_main(fail)
        except OutputError as exc:
            results["on_main_error"] = str(exc)

        full = kd_only(out / "kd_full", pool_dir, ctx)
        kd_only(out / "kd_half", pool_dir, ctx, stop=2)
        resumed = kd_only(out / "kd_half", pool_dir, ctx, resume=True)

        loop_full = full_loop(out / "loop_full", ctx)
        full_loop(out / "loop_half", ctx, stop=2)
        loop_resumed = full_loop(out / "loop_half", ctx, resume=True)
        results["pool_images"] = len(loop_full.pool)
        results["own_shards"] = [s["file"] for s in loop_full.pool.own]

        results["budget"] = budget_plan(out / "budget", ctx)

        torch.save({"kd_full": full.state_dict(), "kd_resumed": resumed.state_dict(),
                    "loop_full": loop_full.student.state_dict(), "loop_resumed": loop_resumed.student.state_dict(),
                    "gen_full": loop_full.synth.generator.state_dict(),
                    "gen_resumed": loop_resumed.synth.generator.state_dict()}, out / f"rank{ctx.rank}.pt")
        (out / f"rank{ctx.rank}.json").write_text(json.dumps(results))


def ping(out: Path) -> None:
    """The least a group does: meet, sum the ranks, write what came back."""
    join_group()
    try:
        t = torch.tensor([float(torch.distributed.get_rank())])
        torch.distributed.all_reduce(t)
        (out / f"ping{torch.distributed.get_rank()}.json").write_text(json.dumps(t.tolist()))
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "ping":
        ping(Path(sys.argv[2]))
    else:
        main(Path(sys.argv[1]), Path(sys.argv[2]))
