"""Data-free distillation: synthesis and KD interleaved epoch by epoch, as in the FastDFKD code.

Each epoch synthesizes ``rounds_per_epoch`` batches into the pool; after ``warmup`` epochs it also
runs ``kd_steps`` student steps on batches drawn from the whole pool (random crop + flip), with
KL at temperature T. SGD with a cosine schedule over the post-warm-up epochs. A checkpoint is
written after every epoch.

Under torch.distributed (see :mod:`dfkd_deploy.core.distributed`) the same loop runs on every rank:
each rank synthesizes its share into its own pool shards (build the synthesizer from
``distributed.rank_recipe(recipe, ctx)``), the generator's meta-gradients are averaged, KD runs
under DistributedDataParallel on slices of one global batch, and rank 0 alone writes the
checkpoint, which holds every rank's random and pool state so that ``resume`` is exact.
"""
from __future__ import annotations

import hashlib
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dfkd_deploy.core import distributed
from dfkd_deploy.core.errors import TrainingError, UsageError, one_line
from dfkd_deploy.core.io import OutputError
from dfkd_deploy.core.progress import task
from dfkd_deploy.recipe import AUTO_GRAD_CLIP, DERIVED_LR_SCALE, Recipe
from dfkd_deploy.core.augment import crop_flip, mix_batch
from dfkd_deploy.core.precision import autocast_factory, resolve_precision
from dfkd_deploy.distill.attention import AttentionTransfer
from dfkd_deploy.distill.kd import kd_kl
from dfkd_deploy.synthesis.base import Synthesizer
from dfkd_deploy.synthesis.pool import ImagePool
from dfkd_deploy.distill.checkpoint import (check_resume_recipe, load_checkpoint, rng_state, save_checkpoint,
                                            set_rng_state)
from dfkd_deploy.core.faults import reached

# Synthesizer state that the meta-gradient all-reduce keeps identical on every rank; the rest
# (e.g. FastDFKD's BN-statistics EMA) is per rank and checkpointed per rank.
SHARED_SYNTH_STATE = ("generator", "meta_optimizer")


@dataclass
class DistillResult:
    epochs: int
    synthesis_seconds: float
    distillation_seconds: float
    images: int
    history: list[dict] = field(default_factory=list)
    kd_steps: int = 0   # KD steps run, over every session of a resumed run (a re-tuned plan's counts vary by epoch)


def _params_sha(params) -> str:
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _finite(t: torch.Tensor) -> str:
    return "finite" if bool(torch.isfinite(t).all()) else "NON-FINITE"


def seed_everything(seed: int) -> np.random.Generator:
    random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def has_normalization(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) for m in model.modules())


def kd_grad_clip(recipe: Recipe, student: nn.Module) -> float | None:
    """The largest gradient norm of a KD step (distillation.grad_clip), None for no clipping. auto
    clips only a student without normalisation layers: nothing rescales its activations, so at
    temperature 20 the first steps' gradients are in the thousands (recipe.AUTO_GRAD_CLIP)."""
    c = recipe.distillation.grad_clip
    if c == "auto":
        return None if has_normalization(student) else AUTO_GRAD_CLIP
    return float(c) or None


def kd_lr(recipe: Recipe) -> float:
    """The KD learning rate: distillation.lr, times student.derived.lr_scale for a student derived
    from the teacher (prune, depth), which is fine-tuned rather than trained from scratch. A scale
    still ``auto`` (a recipe not resolved against its teacher, students.build.resolve_init) is the
    general derived-student scale."""
    lr = recipe.distillation.lr
    if recipe.student.init not in ("prune", "depth"):
        return lr
    scale = recipe.student.derived.lr_scale
    return lr * (DERIVED_LR_SCALE if scale == "auto" else scale)


def feature_weight(recipe: Recipe) -> float:
    """The weight of feature matching in the KD loss: distillation.features, or 0 while it is still
    ``auto`` (a recipe not resolved against its teacher, students.build.resolve_init)."""
    w = recipe.distillation.features
    return 0.0 if w == "auto" else float(w)


class Distiller:
    def __init__(self, teacher: nn.Module, normalizer: nn.Module, student: nn.Module,
                 synthesizer: Synthesizer | None, pool: ImagePool, recipe: Recipe,
                 run_dir: str | Path, device: torch.device | str = "cpu", show_progress: bool = True,
                 ctx: distributed.DistContext | None = None):
        self.ctx = ctx or distributed.current()
        self.teacher, self.student = teacher, student.to(device)
        self.normalizer = normalizer.to(device)
        self.synth, self.pool, self.recipe = synthesizer, pool, recipe
        self.device = torch.device(device)
        self.run_dir = Path(run_dir)
        self.ckpt_path = self.run_dir / "checkpoints" / "last.pt"
        self.show_progress = show_progress
        d = recipe.distillation
        self.precision = resolve_precision(d.precision, self.device)
        self._autocast = autocast_factory(self.precision, self.device)
        self.optimizer = torch.optim.SGD(self.student.parameters(), lr=kd_lr(recipe), momentum=d.momentum,
                                         weight_decay=d.weight_decay)
        self.grad_clip = kd_grad_clip(recipe, self.student)
        self.feature_weight = feature_weight(recipe)
        kd_epochs = max(1, d.epochs - d.warmup)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, kd_epochs, eta_min=d.eta_min)
        # torch/python streams (latents, labels, crops) are per rank; the numpy stream that draws
        # KD batches is shared, so the ranks' slices make up one global batch.
        seed_everything(distributed.rank_seed(recipe.seed, self.ctx.rank))
        self.np_rng = np.random.default_rng(recipe.seed)
        self.kd_batch = distributed.per_rank(d.batch_size, self.ctx, "distillation.batch_size")
        self._ddp: nn.Module | None = None
        self._ddp_params: list[int] = []
        self._saved_epoch: int | None = None
        if self.ctx.enabled and synthesizer is not None:
            # average the meta-gradients before every meta step; a generator re-initialisation
            # (reset_l0) takes rank 0's fresh weights everywhere
            synthesizer.set_rank_sync(self.ctx.average_gradients, self.ctx.broadcast_module)
        self.epoch = 0
        self.synthesis_seconds = 0.0
        self.distillation_seconds = 0.0
        self.kd_steps_done = 0
        self.history: list[dict] = []
        # Called with each finished epoch's row and its last synthesized batch (pixels, or None),
        # before the checkpoint (e.g. dfkd_deploy.distill.metrics_log.MetricsLog).
        self.epoch_hooks: list = []
        self._last_batch: torch.Tensor | None = None
        self._logits: dict[str, torch.Tensor] = {}    # teacher_logits: cached, by pool shard
        # distillation.attention or .features > 0: the stage-end hooks, set up at the first KD step
        self._attention: AttentionTransfer | None = None
        self.attention_note: str | None = None

    # -- one epoch ---------------------------------------------------------------------------
    def _synthesize(self, epoch: int) -> dict:
        s, d = self.recipe.synthesis, self.recipe.distillation
        # The reference counts synthesis rounds from 1: the generator's input layers are reset in
        # round warmup + reset_l0_after, and the adversarial term is on from round warmup, i.e.
        # one round before the first KD epoch (0-based epoch warmup - 1).
        if s.reset_l0_after is not None and epoch + 1 == d.warmup + s.reset_l0_after:
            self.synth.reset_l0()
        stats = []
        t0 = time.perf_counter()
        for _ in range(s.rounds_per_epoch):
            images, st = self.synth.synthesize(self.student, adversarial=epoch + 1 >= d.warmup)
            self.pool.add(images)
            stats.append(st)
        self._last_batch = images
        self.synthesis_seconds += time.perf_counter() - t0
        return {"synth_loss": float(np.mean([x.loss for x in stats])),
                "synth_bn": float(np.mean([x.bn for x in stats])),
                "synth_confidence": float(np.mean([x.confidence for x in stats]))}

    def _kd_model(self) -> nn.Module:
        """The student, under DistributedDataParallel when there are several ranks (wrapped again
        if its parameters were replaced, e.g. by a head initialisation)."""
        if not self.ctx.enabled:
            return self.student
        ids = [id(p) for p in self.student.parameters()]
        if self._ddp is None or ids != self._ddp_params:
            from torch.nn.parallel import DistributedDataParallel

            on_gpu = self.device.type == "cuda"
            self._ddp = DistributedDataParallel(self.student, device_ids=[self.device] if on_gpu else None)
            self._ddp_params = ids
        return self._ddp

    def _kd_batch(self) -> tuple[np.ndarray, torch.Tensor]:
        """(pool indices, images): this rank's slice of one global batch drawn uniformly from the
        whole pool."""
        d = self.recipe.distillation
        idx = self.np_rng.integers(0, len(self.pool), size=d.batch_size)
        r = self.ctx.rank
        mine = idx[r * self.kd_batch:(r + 1) * self.kd_batch]
        return mine, self.pool.get(mine)

    @torch.no_grad()
    def _cached_logits(self, idx: np.ndarray, pixels: torch.Tensor) -> torch.Tensor:
        """``distillation.teacher_logits: cached``: the teacher's logits of each pool image, computed
        (un-augmented) the first time it is drawn and kept in memory by (shard, row), so a KD step
        after that runs only the student. A resumed run computes them again as images are drawn."""
        where = self.pool.locate(idx)
        first = {}   # each missing image once, though a batch may draw it twice
        for j, (name, i) in enumerate(where):
            if name not in self._logits or bool(torch.isnan(self._logits[name][i, 0])):
                first.setdefault((name, i), j)
        missing = list(first.values())
        if missing:
            with self._autocast():
                fresh = self.teacher(self.normalizer(pixels[missing])).float().cpu()
            for j, row in zip(missing, fresh):
                name, i = where[j]
                if name not in self._logits:
                    self._logits[name] = torch.full((self.pool.shard_count(name), row.numel()), float("nan"))
                self._logits[name][i] = row
        return torch.stack([self._logits[name][i] for name, i in where]).to(self.device)

    def _kd_epoch(self) -> dict:
        d, a = self.recipe.distillation, self.recipe.synthesis.augment
        model = self._kd_model()
        self.student.train()
        total, agree, seen, clipped = 0.0, 0, 0, 0
        term_totals: dict[str, float] = {}   # the unweighted stage-end terms, by name
        t0 = time.perf_counter()
        cached = d.teacher_logits == "cached"
        for step in range(d.kd_steps):
            idx, pixels = self._kd_batch()
            pixels = pixels.to(self.device)
            if cached:
                t_out = self._cached_logits(idx, pixels)
            x = self.normalizer(mix_batch(crop_flip(pixels, a.crop_padding, a.flip), d.mix, d.mix_alpha))
            at = self._attention_transfer(x)
            with at.capture() if at else nullcontext():
                if not cached:
                    with torch.no_grad(), self._autocast():
                        t_out = self.teacher(x).float()
                with self._autocast():
                    s_out = model(x).float()
            loss = kd_kl(s_out, t_out, d.temperature)
            for name, (weight, term) in (at.terms(d.attention, self.feature_weight) if at else {}).items():
                term_totals[name] = term_totals.get(name, 0.0) + float(term.detach())
                loss = loss + weight * term
            bad = not bool(torch.isfinite(loss))
            if self.ctx.any(bad):   # every rank stops at the same step
                where = f"at epoch {self.epoch + 1}, step {step + 1}"
                what = (f"KD loss is {loss.item()} {where} (teacher logits {_finite(t_out)}, student logits "
                        f"{_finite(s_out)})" if bad else f"KD loss is non-finite on another process {where}")
                raise TrainingError(f"{what}; {self._kept()}; lower distillation.lr")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.grad_clip is not None:   # after DDP's all-reduce: every rank clips the same gradients
                norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.grad_clip)
                clipped += int(norm > self.grad_clip)
            self.optimizer.step()
            total += loss.item()
            agree += int((s_out.argmax(1) == t_out.argmax(1)).sum())
            seen += x.shape[0]
            reached(f"kd:{self.epoch + 1}:{step + 1}")
        self.scheduler.step()
        self.kd_steps_done += d.kd_steps
        if self.ctx.enabled:
            # DDP keeps the weights equal; BN running statistics follow rank 0 from here on.
            self.ctx.broadcast_module(self.student)
            total, agree, seen = self.ctx.sum([total / self.ctx.world_size, agree, seen])
        self.distillation_seconds += time.perf_counter() - t0
        row = {"kd_loss": total / d.kd_steps, "train_agreement": agree / max(seen, 1),
               "lr": self.optimizer.param_groups[0]["lr"], "kd_steps": d.kd_steps}
        if self.grad_clip is not None:   # the share of this epoch's steps whose gradient was clipped
            row["kd_clipped"] = clipped / d.kd_steps
        for name, term_total in term_totals.items():   # kd_attention, kd_features: unweighted, this rank's mean
            row[f"kd_{name}"] = term_total / d.kd_steps
        return row

    def _attention_transfer(self, x: torch.Tensor) -> AttentionTransfer | None:
        """The stage-end hooks of attention transfer (``distillation.attention`` > 0) and feature
        matching (``distillation.features`` > 0), probed on the first KD batch; None when both are
        off or the two nets share no feature-map resolution (said once, as is a feature matching
        that finds no stage of equal shape)."""
        d = self.recipe.distillation
        if (d.attention <= 0 and self.feature_weight <= 0) or self.attention_note is not None:
            return self._attention
        at = AttentionTransfer(self.teacher, self.student, x[:2])
        notes = []

        def sizes(resolutions):
            return ", ".join(f"{h}x{w}" for h, w in resolutions)

        if at.available:
            self._attention = at
            if d.attention > 0:
                notes.append(f"attention transfer at {sizes(at.resolutions)}")
            if self.feature_weight > 0:
                notes.append(f"feature matching at {sizes(at.feature_resolutions)}" if at.feature_resolutions else
                             "feature matching off: no stage end where teacher and student have the same shape")
        else:
            terms = (("attention transfer", d.attention), ("feature matching", self.feature_weight))
            what = " and ".join(n for n, w in terms if w > 0)
            notes.append(f"{what} off: teacher and student share no feature-map resolution (or refuse hooks)")
        self.attention_note = "; ".join(notes)
        if self.ctx.is_main:
            print(self.attention_note, flush=True)
        return self._attention

    @torch.no_grad()
    def _new_batch_agreement(self) -> dict:
        """Top-1 agreement on the epoch's last synthesized batch, before any KD step saw it: the
        per-epoch held-out figure (adversarial after warm-up, so lower than on the final probes)."""
        if self._last_batch is None or self.synth is None:
            return {}
        x = self.normalizer(self._last_batch.to(self.device))
        was_training = self.student.training
        self.student.eval()
        t, s = self.teacher(x).argmax(1), self.student(x).argmax(1)
        self.student.train(was_training)
        return {"new_batch_agreement": float((t == s).float().mean())}

    def _kept(self) -> str:
        if self._saved_epoch is not None and self.ckpt_path.is_file():
            return (f"the last good checkpoint ({self._saved_epoch} epoch(s) done) is kept: {self.ckpt_path} "
                    "(continue with --resume)")
        return "no checkpoint was written yet"

    # -- spline (MARS) head initialisation ----------------------------------------------------
    def _head_fit_due(self) -> bool:
        h = self.recipe.student.head
        return h.init == "mars" and self.epoch == self.recipe.distillation.warmup + h.fit_after

    def _fit_head(self) -> dict:
        """Replace the student's MLP head by the exact network of a MARS fit (student features ->
        teacher logits on pool images), then KD goes on. Runs once; a resumed run past this
        epoch has the fitted head in its checkpoint."""
        from dfkd_deploy.spline.head import init_student_head

        h, d = self.recipe.student.head, self.recipe.distillation
        rng = np.random.default_rng(self.recipe.seed + self.epoch)   # leaves the KD sampling stream alone
        n = min(h.fit_images, len(self.pool))
        pixels = self.pool.get(np.sort(rng.choice(len(self.pool), n, replace=False)))
        images = self.normalizer(pixels.to(self.device))
        num_classes = self.teacher(images[:2]).shape[1]
        fit = init_student_head(self.student, self.teacher, images, num_classes=num_classes, hidden=h.hidden,
                                temperature=d.temperature, max_terms=h.max_terms, pca_dims=h.pca_dims,
                                seed=self.recipe.seed)
        from dfkd_deploy.core.io import write_text

        if self.ctx.is_main:
            write_text(self.run_dir / "head_mars_terms.md", fit.terms_markdown)
        return {"head_fit_seconds": fit.fit_seconds, "head_fit_images": fit.images, "head_terms": fit.terms,
                "head_agreement_before": fit.agreement_before, "head_agreement_after": fit.agreement_after}

    # -- checkpoints -------------------------------------------------------------------------
    def rank_state(self) -> dict:
        """What differs between ranks: random streams, this rank's pool shards, per-rank synthesizer state."""
        synth = self.synth.state_dict() if self.synth else None
        local = {k: v for k, v in synth.items() if k not in SHARED_SYNTH_STATE} if synth and self.ctx.rank else None
        return {"rng": rng_state(self.np_rng), "pool_shards": len(self.pool.own),
                "pool_files": [s["file"] for s in self.pool.own], "synthesizer": local,
                "fingerprint": self._fingerprint() if self.ctx.enabled else None}

    def _fingerprint(self) -> dict:
        """Hashes of what must be identical on every rank (checked by rank 0 at each checkpoint)."""
        out = {"student": _params_sha(self.student.parameters())}
        gen = getattr(self.synth, "generator", None)
        if gen is not None:
            out["generator"] = _params_sha(gen.parameters())
        return out

    def state_dict(self, ranks: list[dict] | None = None) -> dict:
        """The checkpoint: rank 0's full state plus every rank's :meth:`rank_state` (``ranks``)."""
        return {"epoch": self.epoch, "world_size": self.ctx.world_size, "student": self.student.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "synthesizer": self.synth.state_dict() if self.synth else None,
                "ranks": ranks if ranks is not None else [self.rank_state()],
                "synthesis_seconds": self.synthesis_seconds, "distillation_seconds": self.distillation_seconds,
                "kd_steps_done": self.kd_steps_done, "history": self.history, "recipe": self.recipe.model_dump(mode="json")}

    def save(self) -> None:
        """Write the checkpoint (rank 0; every rank must call this, it gathers their state)."""
        ranks = self.ctx.gather(self.rank_state())

        def write():
            prints = [r["fingerprint"] for r in ranks]
            for rank, fp in enumerate(prints[1:], start=1):
                differs = [k for k in fp if fp[k] != prints[0].get(k)]
                if differs:
                    raise TrainingError(f"epoch {self.epoch}: rank {rank}'s {' and '.join(differs)} differ(s) from "
                                        "rank 0's; the processes are out of step (please report this)")
            try:
                save_checkpoint(self.ckpt_path, self.state_dict(ranks))
            except OutputError as exc:
                raise OutputError(f"{exc}; {self._kept()}") from None

        self.ctx.on_main(write)
        self._saved_epoch = self.epoch

    def resume(self, path: str | Path | None = None) -> None:
        state = load_checkpoint(path or self.ckpt_path)
        saved_world = state.get("world_size", 1)
        if saved_world != self.ctx.world_size:
            raise UsageError(f"the checkpoint was written by a run of {saved_world} process(es); resume it with "
                             f"the same number (this run has {self.ctx.world_size})")
        check_resume_recipe(state.get("recipe"), self.recipe.model_dump(mode="json"))
        mine = state["ranks"][self.ctx.rank]
        self.epoch = self._saved_epoch = state["epoch"]
        try:
            self.student.load_state_dict(state["student"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.synth and state["synthesizer"]:
                self.synth.load_state_dict({**state["synthesizer"], **(mine["synthesizer"] or {})})
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise TrainingError(f"{self.ckpt_path}: the checkpoint does not fit this run's models "
                                f"({one_line(exc, 160)}); start a new run in another --out") from None
        self.pool.truncate(mine["pool_shards"])
        missing = [f for f in mine["pool_files"] if not (self.pool.root / f).is_file()]
        if missing:
            raise TrainingError(f"the pool in {self.pool.root} lacks {len(missing)} shard(s) the checkpoint "
                                f"lists (e.g. {missing[0]}); it cannot be resumed exactly")
        self._sync_pool()
        set_rng_state(mine["rng"], self.np_rng)
        self.synthesis_seconds = state["synthesis_seconds"]
        self.distillation_seconds = state["distillation_seconds"]
        self.kd_steps_done = state.get("kd_steps_done", 0)   # 0: a checkpoint from before the count was kept
        self.history = state["history"]

    def _sync_pool(self) -> None:
        """After every rank wrote its shards: each sees the union."""
        if self.ctx.enabled:
            self.ctx.barrier()
            self.pool.refresh(every_rank=True)

    # -- the loop ----------------------------------------------------------------------------
    def run(self, until_epoch: int | None = None) -> DistillResult:
        """Train up to the recipe's last epoch (or ``until_epoch``, to stop early and resume later)."""
        d = self.recipe.distillation
        stop = d.epochs if until_epoch is None else min(until_epoch, d.epochs)
        with task("distill (epochs)", d.epochs, self.show_progress, every_step=True) as bar:
            bar.resume_at(self.epoch)
            while self.epoch < stop:
                row = {"epoch": self.epoch + 1}
                if self.synth is not None:
                    try:
                        row.update(self._synthesize(self.epoch))
                    except TrainingError as exc:
                        raise TrainingError(f"epoch {self.epoch + 1}: {exc}; {self._kept()}") from None
                    except OutputError as exc:
                        raise OutputError(f"{exc}; {self._kept()}") from None
                    self._sync_pool()
                if self.epoch >= d.warmup:
                    if len(self.pool) == 0:
                        raise TrainingError("the image pool is empty: nothing to distill on")
                    if self._head_fit_due():
                        row.update(self._fit_head())
                        self.ctx.broadcast_module(self.student)   # every rank continues from rank 0's fit
                    row.update(self._new_batch_agreement())
                    row.update(self._kd_epoch())
                self.epoch += 1
                row["pool_images"] = len(self.pool)
                self.history.append(row)
                for hook in self.epoch_hooks:
                    hook(row, self._last_batch)
                self.save()
                info = " ".join(f"{k}={v:.3g}" for k, v in row.items()
                                if k in ("synth_confidence", "kd_loss", "train_agreement", "new_batch_agreement", "lr"))
                bar.advance(1, info)
        if self.epoch >= d.epochs and self._attention is not None:   # the student leaves without our hooks
            self._attention.remove()
            self._attention, self.attention_note = None, None
        return DistillResult(d.epochs, self.synthesis_seconds, self.distillation_seconds, len(self.pool), self.history,
                             self.kd_steps_done)

