"""Data-free distillation: synthesis and KD interleaved epoch by epoch, as in the FastDFKD code.

Each epoch synthesizes ``rounds_per_epoch`` batches into the pool; after ``warmup`` epochs it also
runs ``kd_steps`` student steps on batches drawn from the whole pool (random crop + flip), with
KL at temperature T. SGD with a cosine schedule over the post-warm-up epochs. A checkpoint is
written after every epoch.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import TrainingError
from ..progress import task
from ..recipe import Recipe
from ..synthesis.augment import crop_flip
from ..synthesis.fast import FastSynthesizer
from ..synthesis.losses import kd_kl
from ..synthesis.pool import ImagePool
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state


@dataclass
class DistillResult:
    epochs: int
    synthesis_seconds: float
    distillation_seconds: float
    images: int
    history: list[dict] = field(default_factory=list)


def seed_everything(seed: int) -> np.random.Generator:
    random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


class Distiller:
    def __init__(self, teacher: nn.Module, normalizer: nn.Module, student: nn.Module,
                 synthesizer: FastSynthesizer | None, pool: ImagePool, recipe: Recipe,
                 run_dir: str | Path, device: torch.device | str = "cpu", show_progress: bool = True):
        self.teacher, self.student = teacher, student.to(device)
        self.normalizer = normalizer.to(device)
        self.synth, self.pool, self.recipe = synthesizer, pool, recipe
        self.device = torch.device(device)
        self.run_dir = Path(run_dir)
        self.ckpt_path = self.run_dir / "checkpoints" / "last.pt"
        self.show_progress = show_progress
        d = recipe.distillation
        self.optimizer = torch.optim.SGD(self.student.parameters(), lr=d.lr, momentum=d.momentum,
                                         weight_decay=d.weight_decay)
        kd_epochs = max(1, d.epochs - d.warmup)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, kd_epochs, eta_min=d.eta_min)
        self.np_rng = seed_everything(recipe.seed)
        self.epoch = 0
        self.synthesis_seconds = 0.0
        self.distillation_seconds = 0.0
        self.history: list[dict] = []

    # -- one epoch ---------------------------------------------------------------------------
    def _synthesize(self, epoch: int) -> dict:
        s, d = self.recipe.synthesis, self.recipe.distillation
        if s.reset_l0_after is not None and epoch == d.warmup + s.reset_l0_after:
            self.synth.generator.reset_l0()
        stats = []
        t0 = time.perf_counter()
        for _ in range(s.rounds_per_epoch):
            images, st = self.synth.synthesize(self.student, adversarial=epoch >= d.warmup)
            self.pool.add(images)
            stats.append(st)
        self.synthesis_seconds += time.perf_counter() - t0
        return {"synth_loss": float(np.mean([x.loss for x in stats])),
                "synth_bn": float(np.mean([x.bn for x in stats])),
                "synth_confidence": float(np.mean([x.confidence for x in stats]))}

    def _kd_epoch(self) -> dict:
        d, a = self.recipe.distillation, self.recipe.synthesis.augment
        self.student.train()
        total, agree, seen = 0.0, 0, 0
        t0 = time.perf_counter()
        for step in range(d.kd_steps):
            pixels = self.pool.sample(d.batch_size, self.np_rng).to(self.device)
            x = self.normalizer(crop_flip(pixels, a.crop_padding, a.flip))
            with torch.no_grad():
                t_out = self.teacher(x)
            s_out = self.student(x)
            loss = kd_kl(s_out, t_out, d.temperature)
            if not torch.isfinite(loss):
                raise TrainingError(f"KD loss is {loss.item()} at epoch {self.epoch + 1}, step {step + 1}; "
                                    f"the last good checkpoint is {self.ckpt_path}; lower distillation.lr")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += loss.item()
            agree += int((s_out.argmax(1) == t_out.argmax(1)).sum())
            seen += x.shape[0]
        self.scheduler.step()
        self.distillation_seconds += time.perf_counter() - t0
        return {"kd_loss": total / d.kd_steps, "train_agreement": agree / max(seen, 1),
                "lr": self.optimizer.param_groups[0]["lr"]}

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "student": self.student.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "synthesizer": self.synth.state_dict() if self.synth else None,
                "pool_shards": len(self.pool.shards), "rng": rng_state(self.np_rng),
                "synthesis_seconds": self.synthesis_seconds, "distillation_seconds": self.distillation_seconds,
                "history": self.history}

    def resume(self, path: str | Path | None = None) -> None:
        state = load_checkpoint(path or self.ckpt_path)
        self.epoch = state["epoch"]
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.synth and state["synthesizer"]:
            self.synth.load_state_dict(state["synthesizer"])
        self.pool.truncate(state["pool_shards"])
        set_rng_state(state["rng"], self.np_rng)
        self.synthesis_seconds = state["synthesis_seconds"]
        self.distillation_seconds = state["distillation_seconds"]
        self.history = state["history"]

    # -- the loop ----------------------------------------------------------------------------
    def run(self, until_epoch: int | None = None) -> DistillResult:
        """Train up to the recipe's last epoch (or ``until_epoch``, to stop early and resume later)."""
        d = self.recipe.distillation
        stop = d.epochs if until_epoch is None else min(until_epoch, d.epochs)
        with task("distill (epochs)", d.epochs, self.show_progress) as bar:
            bar.advance(self.epoch)
            while self.epoch < stop:
                row = {"epoch": self.epoch + 1}
                if self.synth is not None:
                    row.update(self._synthesize(self.epoch))
                if self.epoch >= d.warmup:
                    if len(self.pool) == 0:
                        raise TrainingError("the image pool is empty: nothing to distill on")
                    row.update(self._kd_epoch())
                self.epoch += 1
                row["pool_images"] = len(self.pool)
                self.history.append(row)
                save_checkpoint(self.ckpt_path, self.state_dict())
                info = " ".join(f"{k}={v:.3g}" for k, v in row.items() if k in ("kd_loss", "train_agreement", "synth_confidence"))
                bar.advance(1, info)
        return DistillResult(d.epochs, self.synthesis_seconds, self.distillation_seconds, len(self.pool), self.history)

