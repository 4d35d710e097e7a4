import math

import pytest
import torch

from dfkd_deploy.run import build_student, make_probes, make_synthesizer
from dfkd_deploy.distill.trainer import Distiller, seed_everything
from dfkd_deploy.core.errors import TrainingError
from dfkd_deploy.synthesis.pool import ImagePool
from dfkd_deploy.validate.metrics import predict, top1_agreement

from ..conftest import quick_recipe


def _distiller(teacher, recipe, run_dir):
    seed_everything(recipe.seed)   # as api.distill: same initial student and generator every time
    student = build_student(recipe, teacher)
    synth = make_synthesizer(teacher, recipe, "cpu")
    return Distiller(teacher.module, teacher.normalizer(), student, synth, ImagePool(run_dir / "pool"),
                     recipe, run_dir, "cpu", show_progress=False)


def _agreement(teacher, student, probes):
    norm = teacher.normalizer()
    return top1_agreement(predict(teacher.module, probes, normalizer=norm),
                          predict(student, probes, normalizer=norm))


def test_synthesis_raises_teacher_confidence_in_sampled_labels(digits_teacher):
    recipe = quick_recipe(**{"synthesis.batch_size": 64, "synthesis.g_steps": 5})
    torch.manual_seed(0)
    synth = make_synthesizer(digits_teacher, recipe, "cpu")
    first = [synth.synthesize(None)[1] for _ in range(2)]
    for _ in range(14):
        synth.synthesize(None)
    last = [synth.synthesize(None)[1] for _ in range(2)]
    chance = 1 / digits_teacher.spec.num_classes
    conf_first = sum(s.confidence for s in first) / 2
    conf_last = sum(s.confidence for s in last) / 2
    assert conf_last > conf_first + 0.03 and conf_last > 2 * chance
    assert sum(s.bn for s in last) < sum(s.bn for s in first)    # BN statistics matched better


def test_meta_update_changes_generator_and_probes_do_not(digits_teacher):
    recipe = quick_recipe()
    synth = make_synthesizer(digits_teacher, recipe, "cpu")
    before = [p.clone() for p in synth.generator.parameters()]
    make_probes(synth, 40, 32, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(before, synth.generator.parameters()))
    synth.synthesize(None)
    assert any(not torch.equal(a, b) for a, b in zip(before, synth.generator.parameters()))


def test_kd_raises_agreement_and_checkpoints_every_epoch(digits_teacher, tmp_path):
    recipe = quick_recipe(**{"distillation.epochs": 8, "distillation.kd_steps": 10})
    d = _distiller(digits_teacher, recipe, tmp_path)
    probes = make_probes(make_synthesizer(digits_teacher, recipe, "cpu"), 128, 64, seed=5)
    before = _agreement(digits_teacher, d.student, probes)
    result = d.run()
    after = _agreement(digits_teacher, d.student, probes)
    assert after > before + 0.1
    assert result.images == 8 * recipe.synthesis.batch_size == len(ImagePool(tmp_path / "pool"))
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
    assert [row["epoch"] for row in result.history] == list(range(1, 9))
    assert "kd_loss" not in result.history[0] and "kd_loss" in result.history[-1]   # warm-up only synthesizes


def test_resume_continues_to_the_same_student(digits_teacher, tmp_path):
    recipe = quick_recipe(**{"distillation.epochs": 4})
    full = _distiller(digits_teacher, recipe, tmp_path / "a")
    full.run()

    half = _distiller(digits_teacher, recipe, tmp_path / "b")
    half.run(until_epoch=2)             # as if killed after epoch 2
    resumed = _distiller(digits_teacher, recipe, tmp_path / "b")
    resumed.resume()
    assert resumed.epoch == 2
    result = resumed.run()
    # the steps run are counted over both sessions
    assert result.kd_steps == full.kd_steps_done == (4 - recipe.distillation.warmup) * recipe.distillation.kd_steps
    for (k, a), b in zip(full.student.state_dict().items(), resumed.student.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), k


def test_nan_loss_stops_with_the_step_and_keeps_checkpoint(digits_teacher, tmp_path, monkeypatch):
    recipe = quick_recipe(**{"distillation.epochs": 3})
    d = _distiller(digits_teacher, recipe, tmp_path)
    calls = {"n": 0}
    real_forward = d.student.forward

    def poisoned(x):
        calls["n"] += 1
        out = real_forward(x)
        return out * float("nan") if d.epoch >= 2 and d.student.training else out

    monkeypatch.setattr(d.student, "forward", poisoned)
    with pytest.raises(TrainingError) as err:
        d.run()
    ckpt = tmp_path / "checkpoints" / "last.pt"
    assert str(err.value) == ("KD loss is nan at epoch 3, step 1 (teacher logits finite, student logits NON-FINITE); "
                              f"the last good checkpoint (2 epoch(s) done) is kept: {ckpt} (continue with --resume); "
                              "lower distillation.lr")
    assert torch.load(ckpt, weights_only=False)["epoch"] == 2


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_kd_precision_keeps_fp32_weights_and_learns(digits_teacher, tmp_path, precision):
    """distillation.precision runs the KD forward passes under bf16 autocast (or not); weights,
    optimizer state and the loss stay fp32 either way, and the student learns either way."""
    recipe = quick_recipe(**{"distillation.epochs": 6, "distillation.kd_steps": 10,
                             "distillation.precision": precision})
    d = _distiller(digits_teacher, recipe, tmp_path)
    assert d.precision == precision
    probes = make_probes(make_synthesizer(digits_teacher, recipe, "cpu"), 128, 64, seed=5)
    before = _agreement(digits_teacher, d.student, probes)
    d.run()
    assert all(p.dtype == torch.float32 for p in d.student.parameters())
    losses = [r["kd_loss"] for r in d.history if "kd_loss" in r]
    assert len(losses) == 6 - recipe.distillation.warmup and all(map(math.isfinite, losses))
    assert _agreement(digits_teacher, d.student, probes) > before + 0.1


def test_kd_precision_auto_follows_the_device(digits_teacher, tmp_path):
    from dfkd_deploy.core.precision import bf16_native

    d = _distiller(digits_teacher, quick_recipe(**{"distillation.precision": "auto"}), tmp_path)
    assert d.precision == ("bf16" if bf16_native(torch.device("cpu")) else "fp32")


def _bn_free_student(teacher, scale: float) -> torch.nn.Module:
    """An MLP with no normalisation layer and weights ``scale`` times too large: at temperature 20
    its first KD gradients are huge, as a pruned BN-folded teacher's were."""
    c, h, w = teacher.spec.input_shape
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(c * h * w, 32), torch.nn.ReLU(),
                              torch.nn.Linear(32, teacher.spec.num_classes))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    return net


def test_grad_clip_auto_clips_only_students_without_normalization(digits_teacher):
    from dfkd_deploy.distill.trainer import kd_grad_clip
    from dfkd_deploy.recipe import AUTO_GRAD_CLIP

    recipe = quick_recipe()
    assert recipe.distillation.grad_clip == "auto"
    assert kd_grad_clip(recipe, build_student(recipe, digits_teacher)) is None       # the zoo student has BN
    assert kd_grad_clip(recipe, _bn_free_student(digits_teacher, 1.0)) == AUTO_GRAD_CLIP
    assert kd_grad_clip(quick_recipe(**{"distillation.grad_clip": 0}), _bn_free_student(digits_teacher, 1.0)) is None
    assert kd_grad_clip(quick_recipe(**{"distillation.grad_clip": 2.5}), build_student(recipe, digits_teacher)) == 2.5
    with pytest.raises(Exception, match="grad_clip"):
        quick_recipe(**{"distillation.grad_clip": -1})


def test_clipped_kd_step_moves_weights_at_most_lr_times_the_clip(digits_teacher, tmp_path):
    lr, clip = 0.05, 1.0
    recipe = quick_recipe(**{"distillation.epochs": 2, "distillation.warmup": 1, "distillation.kd_steps": 1,
                             "distillation.lr": lr, "distillation.momentum": 0.0,
                             "distillation.weight_decay": 0.0, "distillation.grad_clip": clip})
    seed_everything(recipe.seed)
    student = _bn_free_student(digits_teacher, 20.0)
    before = torch.cat([p.detach().flatten().clone() for p in student.parameters()])
    d = Distiller(digits_teacher.module, digits_teacher.normalizer(), student,
                  make_synthesizer(digits_teacher, recipe, "cpu"), ImagePool(tmp_path / "pool"), recipe, tmp_path,
                  "cpu", show_progress=False)
    result = d.run()
    after = torch.cat([p.detach().flatten() for p in student.parameters()])
    assert result.history[-1]["kd_clipped"] == 1.0          # the one step's gradient was over the clip
    assert float((after - before).norm()) <= lr * clip * (1 + 1e-4)


def _bn_free_run(teacher, run_dir, **over):
    recipe = quick_recipe(**{"distillation.epochs": 3, "distillation.kd_steps": 5, "distillation.lr": 1.0, **over})
    seed_everything(recipe.seed)
    d = Distiller(teacher.module, teacher.normalizer(), _bn_free_student(teacher, 20.0),
                  make_synthesizer(teacher, recipe, "cpu"), ImagePool(run_dir / "pool"), recipe, run_dir, "cpu",
                  show_progress=False)
    return [r for r in d.run().history if "kd_loss" in r]


def test_auto_clip_tames_a_bn_free_students_first_kd_steps(digits_teacher, tmp_path):
    clipped = _bn_free_run(digits_teacher, tmp_path / "auto")
    unclipped = _bn_free_run(digits_teacher, tmp_path / "off", **{"distillation.grad_clip": 0})
    assert clipped[0]["kd_clipped"] > 0 and "kd_clipped" not in unclipped[0]
    assert all(math.isfinite(r["kd_loss"]) for r in clipped)
    # unclipped, the first KD epoch's steps overshoot: its mean loss is ~40x the clipped run's
    assert clipped[0]["kd_loss"] * 5 < unclipped[0]["kd_loss"]


class _CountingTeacher(torch.nn.Module):
    """The teacher, counting the images it labels."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.images = inner, 0

    def forward(self, x):
        self.images += x.shape[0]
        return self.inner(x)


def test_cached_teacher_logits_label_each_pool_image_once(digits_teacher, tmp_path):
    """teacher_logits: cached: a KD step's targets are the teacher's logits of the un-augmented
    pool images, computed once per image however often it is drawn."""
    recipe = quick_recipe(**{"distillation.teacher_logits": "cached", "distillation.epochs": 3,
                             "distillation.kd_steps": 12, "distillation.precision": "fp32"})
    d = _distiller(digits_teacher, recipe, tmp_path)
    counting = _CountingTeacher(digits_teacher.module)
    d.run(until_epoch=1)                   # warm-up: the pool gets its first batch
    d.teacher = counting
    d.run()
    pool = ImagePool(tmp_path / "pool")
    # KD labelled each pool image at most once (the rest: the per-epoch agreement on the new batch)
    assert counting.images - 2 * 32 <= len(pool) < 2 * 12 * 32
    cached = torch.cat([d._logits[s["file"]] for s in pool.shards if s["file"] in d._logits])
    assert not torch.isnan(cached).all(1).any()
    idx = torch.arange(len(pool)).numpy()[:16]
    seen = [j for j, (name, i) in enumerate(pool.locate(idx)) if name in d._logits
            and not torch.isnan(d._logits[name][i, 0])]
    with torch.no_grad():
        want = digits_teacher.module(digits_teacher.normalizer()(pool.get(idx[seen])))
    assert torch.allclose(d._cached_logits(idx[seen], pool.get(idx[seen])), want, atol=1e-4)


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_mixed_kd_batches_train(digits_teacher, tmp_path, mix):
    recipe = quick_recipe(**{"distillation.mix": mix, "distillation.epochs": 3})
    result = _distiller(digits_teacher, recipe, tmp_path).run()
    assert math.isfinite(result.history[-1]["kd_loss"])
