"""One rank of the two-process tests in test_distributed.py.

The test starts two of these with the environment torchrun would give them (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT): ``python -m tests.resilience.ddp_worker OUT POOL``.
Everything here is small and random (no teacher file), so both ranks finish in seconds.
"""
from __future__ import annotations

import json
import sys
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


def main(out: Path, pool_dir: Path) -> None:
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

        torch.save({"kd_full": full.state_dict(), "kd_resumed": resumed.state_dict(),
                    "loop_full": loop_full.student.state_dict(), "loop_resumed": loop_resumed.student.state_dict(),
                    "gen_full": loop_full.synth.generator.state_dict(),
                    "gen_resumed": loop_resumed.synth.generator.state_dict()}, out / f"rank{ctx.rank}.pt")
        (out / f"rank{ctx.rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
