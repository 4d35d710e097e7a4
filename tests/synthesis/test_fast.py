"""FastDFKD: the reference's round timing in the Distiller, and the speed measures keeping results."""
import torch
import torch.nn.functional as F

from dfkd_deploy.run import build_student, make_synthesizer
from dfkd_deploy.distill.trainer import Distiller, seed_everything
from dfkd_deploy.models import build_model
from dfkd_deploy.models.generator import Generator
from dfkd_deploy.recipe import load_recipe
from dfkd_deploy.synthesis.losses import InversionLoss
from dfkd_deploy.synthesis.pool import ImagePool

from ..conftest import quick_recipe


class _Spy:
    """Wraps a synthesizer and records what the Distiller asked of it."""

    def __init__(self, synth):
        self.synth, self.calls, self.resets = synth, [], []

    def synthesize(self, student, **kw):
        self.calls.append(kw.get("adversarial"))
        return self.synth.synthesize(student, **kw)

    def reset_l0(self):
        self.resets.append(len(self.calls))

    def state_dict(self):
        return self.synth.state_dict()

    def load_state_dict(self, state):
        self.synth.load_state_dict(state)


def test_distiller_follows_the_reference_round_numbering(digits_teacher, tmp_path):
    # warm-up 3, reset 2 rounds after it: the reference resets in round 5 (1-based) and turns the
    # adversarial term on from round 3, one round before the first KD epoch
    recipe = quick_recipe(**{"distillation.epochs": 6, "distillation.warmup": 3, "distillation.kd_steps": 1,
                             "synthesis.g_steps": 1, "synthesis.reset_l0_after": 2})
    seed_everything(recipe.seed)
    spy = _Spy(make_synthesizer(digits_teacher, recipe, "cpu"))
    d = Distiller(digits_teacher.module, digits_teacher.normalizer(), build_student(recipe, digits_teacher), spy,
                  ImagePool(tmp_path / "pool"), recipe, tmp_path, "cpu", show_progress=False)
    d.run()
    assert spy.calls == [False, False, True, True, True, True]
    assert spy.resets == [4]                      # before the 5th round


def test_fast_round_leaves_the_student_as_it_was(digits_teacher):
    synth = make_synthesizer(digits_teacher, quick_recipe(), "cpu")
    student = build_student(quick_recipe(), digits_teacher).train()
    _, stats = synth.synthesize(student, adversarial=True)
    assert stats.adv <= 0
    assert student.training and all(p.requires_grad for p in student.parameters())
    assert all(p.grad is None for p in student.parameters())


def test_generator_bf16_convolutions_track_fp32():
    torch.manual_seed(0)
    g = Generator(32, 16, (12, 10), 3)
    z = torch.randn(16, 32)
    out32 = g(z)
    out32.square().sum().backward()
    grads32 = [p.grad.clone() for p in g.parameters()]
    g.zero_grad()
    g.bf16_convs = True
    out16 = g(z)
    out16.square().sum().backward()
    assert out16.dtype == torch.float32 and (out16 - out32).abs().max() < 0.01
    for a, (name, p) in zip(grads32, g.named_parameters()):
        assert p.grad.dtype == torch.float32
        assert F.cosine_similarity(a.flatten(), p.grad.flatten(), dim=0) > 0.99, name


def test_channels_last_changes_nothing_but_the_memory_format():
    torch.manual_seed(0)
    teacher = build_model("cifar_resnet8", num_classes=10).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    opts = load_recipe(None, {"synthesis.precision": "fp32", "synthesis.augment.crop_padding": 0,
                              "synthesis.augment.flip": False}).synthesis
    pixels = torch.rand(8, 3, 16, 16)
    targets = torch.randint(0, 10, (8,))
    results = []
    for cl in (False, True):
        loss = InversionLoss(teacher, torch.nn.Identity(), opts, {k: 0.0 for k in ("tv", "l2", "entropy", "activation")},
                             channels_last=cl)
        x = pixels.clone().requires_grad_(True)
        terms = loss(x, targets)
        terms.total.backward()
        results.append((terms.total.detach(), terms.bn.detach(), x.grad))
        loss.bn_stats.remove()
    (t0, b0, g0), (t1, b1, g1) = results
    assert torch.allclose(t0, t1, rtol=1e-4) and torch.allclose(b0, b1, rtol=1e-4)
    # Channels-last convolutions sum in another order; the BN-statistics term divides by small
    # standard deviations, which magnifies fp32 rounding in a few elements (measured up to 2e-3 of
    # the largest gradient on one CPU). Same direction, same scale: the memory format changed nothing else.
    assert F.cosine_similarity(g0.flatten(), g1.flatten(), dim=0) > 0.9999
    assert (g0 - g1).abs().max() <= 1e-2 * g0.abs().max()


def test_reused_fast_generator_gives_the_rounds_of_a_fresh_copy(digits_teacher, monkeypatch):
    # The fast generator is kept across rounds and reloaded from the meta generator; the rounds
    # must be those of a deep copy per round (the reference's clone), reset_l0 included.
    import copy

    def rounds(fresh: bool):
        recipe = quick_recipe(**{"synthesis.g_steps": 2, "synthesis.batch_size": 8})
        seed_everything(0)
        synth = make_synthesizer(digits_teacher, recipe, "cpu")
        if fresh:
            monkeypatch.setattr(synth, "_fast_copy", lambda: copy.deepcopy(synth.generator))
        student = build_student(recipe, digits_teacher)
        out = []
        for i in range(3):
            if i == 2:
                synth.reset_l0()
            x, st = synth.synthesize(student, adversarial=i > 0)
            out.append((x, st.loss, st.bn))
        return out, synth.generator.state_dict()

    (reused, g_reused), (fresh, g_fresh) = rounds(False), rounds(True)
    for (xa, la, ba), (xb, lb, bb) in zip(reused, fresh):
        assert torch.equal(xa, xb) and la == lb and ba == bb
    assert all(torch.equal(g_reused[k], g_fresh[k]) for k in g_fresh)
