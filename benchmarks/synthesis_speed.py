"""FastDFKD against DeepInversion on a real teacher: synthesis time, images/s, student accuracy.

The paper's protocol (Fang et al., AAAI 2022, Table 1) on the shared CIFAR-10 ResNet-56 teacher
(../shared/teachers/cifar10-resnet56.th) and a CIFAR ResNet-20 student: both methods synthesize
the same number of images with the same losses and then distil with the same KD schedule (the
library's Distiller: synthesis and KD interleaved epoch by epoch). Reported for each: synthesis
seconds, images per second, student top-1 on ../shared/data/cifar10-test-jpeg.npz, top-1
agreement with the teacher, and accuracy against cumulative synthesis seconds (the plot).

Two more measurements:
- ``speed``: Fast-5 rounds of 64 images with the ResNet-20 adversary, at the precision the
  synthesizer resolves to on this machine, each round's seconds and per-batch quality (teacher
  confidence on the sampled labels, BN loss; the same seed per round). Beside each round, the
  pieces of an inner step run bare (see ``BareSteps``), from which the minimum cost of a round
  is estimated (the ceiling) and our round reported as a fraction of it; then single KD steps
  against their own ceiling. With ``--reference DIR`` (a checkout of zju-vipa/Fast-Datafree
  that you fetched; kornia installed) the reference's ``FastMetaSynthesizer`` runs unmodified in
  the same process (benchmarks/_reference.py builds it with the same teacher weights and a
  ResNet-20 student), alternating with ours round by round, and the ratio of the medians is
  reported with the per-round spread. Without ``--reference`` no comparison is made.
- DeepInversion's cost per pixel step, from which DeepInversion-2k's synthesis time for the
  same images is extrapolated where the budget allows fewer steps (``--small``): the JSON labels
  every such figure ``extrapolated`` and keeps the measured one beside it.

    python benchmarks/synthesis_speed.py --small   # about 18 minutes on 2 idle CPU cores
    python benchmarks/synthesis_speed.py           # the paper's schedule: a GPU job
    python benchmarks/synthesis_speed.py --small --speed-only --reference ../Fast-Datafree
        # side by side: about 10 minutes on 2 loaded cores; writes synthesis_speed_side_by_side.json

The shared material is looked for beside the repository (``../shared``) or in ``$DFKD_SHARED``.
Writes benchmarks/results/synthesis_speed.json and synthesis_speed.png (``--out-dir`` to change).
``--setting key=value`` overrides one entry of the chosen settings (e.g. ``di_steps=100``).
"""
from __future__ import annotations

import argparse
import os

# Other jobs share the cores on the machines this runs on: OpenMP threads that spin while waiting
# (the default) then lose their time slices mid-barrier and a 0.1 s step can take 2 s. Passive
# waiting costs little on an idle machine; set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # this checkout's dfkd_deploy, whatever else is installed
SHARED = Path(os.environ.get("DFKD_SHARED", REPO.parent / "shared"))
TEACHER = SHARED / "teachers" / "cifar10-resnet56.th"
TEST_SET = SHARED / "data" / "cifar10-test-jpeg.npz"

SETTINGS = {
    # 2 CPU cores, about 18 minutes idle: 24 rounds of 64 images per method, KD from the
    # 5th round on (1000 KD steps of 64). DeepInversion gets 40 pixel steps per batch instead of
    # 2000 at the paper's lr (a larger lr matched the BN statistics worse in 40 steps); its cost
    # per step is measured and DeepInversion-2k's synthesis time extrapolated from it.
    "small": {"synth_batch": 64, "epochs": 24, "warmup": 4, "kd_steps": 50, "kd_batch": 64, "kd_lr": 0.1,
              "di_steps": 40, "di_lr": 0.1, "eval_every": 5, "eval_images": 2000,
              "speed_rounds": 8, "speed_warmup": 2, "speed_batch": 64, "kd_steps_timed": 10,
              "precision": "auto", "kd_precision": "auto", "seed": 0},
    # The paper's schedule (recipes/cifar-resnet20.yaml and cifar-resnet20-deepinversion.yaml).
    "full": {"synth_batch": 256, "epochs": 220, "warmup": 20, "kd_steps": 400, "kd_batch": 256, "kd_lr": 0.2,
             "di_steps": 2000, "di_lr": 0.1, "eval_every": 20, "eval_images": 10000,
             "speed_rounds": 20, "speed_warmup": 2, "speed_batch": 64, "kd_steps_timed": 20,
             "precision": "auto", "kd_precision": "auto", "seed": 0},
}
PAPER_DI_STEPS = 2000
PAPER_FAST_STEPS = 5


def shared_material_missing() -> bool:
    """Say so on stderr (and return True) if the shared teacher or test set is absent."""
    for path in (TEACHER, TEST_SET):
        if not path.exists():
            print(f"error: {path} is absent (the shared material lives beside the repository)", file=sys.stderr)
            return True
    return False


def reference_missing(root: Path | None) -> bool:
    """Say so on stderr (and return True) if ``--reference`` is not a Fast-Datafree checkout or
    kornia, which the reference needs, is not installed."""
    import importlib.util

    if root is None:
        return False
    if not (root / "datafree" / "synthesis" / "fast_meta.py").is_file():
        print(f"error: {root} is not a checkout of zju-vipa/Fast-Datafree (no datafree/synthesis/fast_meta.py)",
              file=sys.stderr)
        return True
    if importlib.util.find_spec("kornia") is None:
        print("error: the reference needs kornia: install it in a throwaway environment "
              "(python -m venv --system-site-packages /tmp/venv-ref; /tmp/venv-ref/bin/pip install kornia)",
              file=sys.stderr)
        return True
    return False


def chosen_settings(name: str, items: list[str]) -> dict | None:
    """SETTINGS[name] with ``key=value`` overrides (typed like the default); None, with the
    reason on stderr, for an unknown key."""
    s = dict(SETTINGS[name])
    for item in items:
        key, _, value = item.partition("=")
        if key not in s:
            print(f"error: unknown setting {key!r}; known: {', '.join(s)}", file=sys.stderr)
            return None
        s[key] = type(s[key])(value)
    return s


def eval_subset(num_images: int, n: int):
    """The seeded subset of test-image indices the accuracy curve is measured on."""
    import numpy as np
    import torch

    return torch.as_tensor(np.random.default_rng(0).permutation(num_images)[:n])


def machine() -> dict:
    import torch

    from dfkd_deploy.core.precision import bf16_native

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "bf16_native": bf16_native(torch.device("cpu")),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
            "load_average_start": [round(v, 2) for v in os.getloadavg()]}


def _median(values):
    return float(statistics.median(values)) if values else float("nan")


# --------------------------------------------------------------------------- speed


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


def spread(values: list[float]) -> dict:
    """Median, min, max and interquartile range of a list of figures."""
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "iqr": [float("nan")] * 2}
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {"median": _median(values), "min": min(values), "max": max(values), "iqr": [q[0], q[2]]}


class BareSteps:
    """The pieces of a Fast-5 inner step run bare: each module alone on a random batch, no
    augmentation, loss terms, BN statistics or optimiser. At the synthesizer's own precision and
    memory format (bf16 under autocast where it resolved to bf16, else fp32):

    - ``teacher``: teacher forward + backward to its input (weights frozen);
    - ``student``: the same for the ResNet-20 adversary (weights frozen, as in synthesis);
    - ``generator``: generator forward + backward to its weights and latent (the meta-gradient
      needs them), in the synthesizer's configuration (its _MixedConv2d path under bf16);
    - ``teacher_bf16_channels_last``: the bf16 channels-last teacher step, measured only where the
      CPU runs bf16 natively (elsewhere bf16 is emulated and 10x slower: not a ceiling);
    - for the KD step: ``teacher_forward`` (no grad) and ``student_train`` (forward + backward
      with weight gradients), at the distillation precision.
    """

    def __init__(self, teacher, student, synth, kd_precision: str, batch: int):
        import copy

        import torch

        from dfkd_deploy.core.precision import autocast_factory, bf16_native

        self.teacher, self.batch = teacher, batch
        self.student = copy.deepcopy(student).eval()
        for p in self.student.parameters():
            p.requires_grad_(False)
        self.student_train = copy.deepcopy(student).train()
        self.generator = copy.deepcopy(synth.generator).train()
        self.cl = synth.channels_last
        self.autocast = synth.autocast
        self.kd_autocast = autocast_factory(kd_precision, torch.device("cpu"))
        self.bf16_native = bf16_native(torch.device("cpu"))
        fmt = torch.channels_last if self.cl else torch.contiguous_format
        for m in (self.student, self.student_train):
            m.to(memory_format=fmt)
        self.nz = synth.opts.nz

    def _input(self, grad: bool):
        import torch

        x = torch.rand(self.batch, 3, 32, 32)
        if self.cl:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.requires_grad_(grad)

    def _input_step(self, module, autocast):
        x = self._input(True)

        def run():
            with autocast():
                out = module(x)
            out.float().sum().backward()
        return _timed(run)

    def teacher_step(self) -> float:
        return self._input_step(self.teacher, self.autocast)

    def student_step(self) -> float:
        return self._input_step(self.student, self.autocast)

    def generator_step(self) -> float:
        import torch

        z = torch.randn(self.batch, self.nz, requires_grad=True)
        self.generator.zero_grad(set_to_none=True)
        return _timed(lambda: self.generator(z).sum().backward())

    def teacher_bf16_step(self) -> float | None:
        import torch

        if not self.bf16_native:
            return None
        x = self._input(True)

        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = self.teacher(x)
            out.float().sum().backward()
        return _timed(run)

    def teacher_forward(self) -> float:
        import torch

        x = self._input(False)

        def run():
            with torch.no_grad(), self.kd_autocast():
                self.teacher(x)
        return _timed(run)

    def student_train_step(self) -> float:
        x = self._input(False)
        self.student_train.zero_grad(set_to_none=True)

        def run():
            with self.kd_autocast():
                out = self.student_train(x)
            out.float().sum().backward()
        return _timed(run)

    def measure(self) -> dict:
        out = {"teacher": self.teacher_step(), "student": self.student_step(), "generator": self.generator_step(),
               "teacher_forward": self.teacher_forward(), "student_train": self.student_train_step()}
        bf = self.teacher_bf16_step()
        if bf is not None:
            out["teacher_bf16_channels_last"] = bf
        return out


def ceiling(bare_rounds: list[dict], g_steps: int, kd_step_seconds: list[float], our_rounds: list[float]) -> dict:
    """The estimated minimum cost of a Fast-5 round and of a KD step, from the bare pieces, and
    our measured figures as fractions of it (estimate / measured: 1.0 would be no overhead)."""
    med = {k: _median([r[k] for r in bare_rounds if k in r]) for k in bare_rounds[0]}
    inner = med["generator"] + med["teacher"] + med["student"]
    round_min = g_steps * inner
    kd_min = med["teacher_forward"] + med["student_train"]
    return {
        "bare_seconds_median": med,
        "round_estimate": f"{g_steps} x (generator forward+backward + teacher forward+backward to the input + "
                          "student forward+backward to the input), each run bare at the synthesizer's precision "
                          "and memory format; medians over the measured rounds (one set measured beside each round)",
        "round_minimum_seconds": round_min,
        "round_fraction_of_ceiling": round_min / _median(our_rounds),
        "kd_estimate": "teacher forward (no grad) + student forward+backward with weight gradients, bare, at the "
                       "distillation precision",
        "kd_step_minimum_seconds": kd_min,
        "kd_step_fraction_of_ceiling": kd_min / _median(kd_step_seconds) if kd_step_seconds else None,
    }


def kd_steps(teacher, student, s: dict, tmp: Path) -> tuple[list[float], str]:
    """Seconds of single KD steps through the Distiller's own loop (pool read, crop+flip, teacher
    forward, student forward/backward, SGD step), batch ``speed_batch``, one step per call."""
    import copy

    import torch

    from dfkd_deploy.distill.trainer import Distiller
    from dfkd_deploy import load_recipe
    from dfkd_deploy.synthesis.pool import ImagePool

    bs = s["speed_batch"]
    recipe = load_recipe(REPO / "recipes" / "cifar-resnet20.yaml", {
        "distillation.batch_size": bs, "distillation.kd_steps": 1, "distillation.precision": s["kd_precision"]})
    pool = ImagePool(tmp / "kd-pool")
    for _ in range(4):
        pool.add(torch.rand(bs, 3, 32, 32))
    d = Distiller(teacher.module, teacher.normalizer(), copy.deepcopy(student), None, pool, recipe, tmp / "kd",
                  "cpu", show_progress=False)
    d._kd_epoch()   # warm-up
    return [_timed(d._kd_epoch) for _ in range(s["kd_steps_timed"])], d.precision


def _reference_side(reference_dir: Path, s: dict, tmp: Path):
    """The reference's FastMetaSynthesizer on its own copy of the teacher and its own student,
    both with trainable weights as its datafree_kd.py leaves them."""
    import torch

    from dfkd_deploy import build_model
    from dfkd_deploy.recipe import TeacherOptions, load_recipe
    from dfkd_deploy import load_teacher

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _reference

    ref = _reference.load_reference(reference_dir)
    t = load_teacher(TEACHER, TeacherOptions(arch="cifar_resnet56"))
    module = t.module.eval()
    for p in module.parameters():
        p.requires_grad_(True)
    recipe = load_recipe(REPO / "recipes" / "cifar-resnet20.yaml", {"synthesis.batch_size": s["speed_batch"]})
    torch.manual_seed(s["seed"])
    student = build_model("cifar_resnet20", num_classes=t.spec.num_classes)
    synth = _reference.build_reference_synthesizer(ref, module, student, t.normalizer(), recipe.synthesis,
                                                   t.spec.num_classes, t.spec.input_shape[-1], s["speed_batch"], tmp)
    info = {"source": str(reference_dir), "commit": ref.commit, "class": "datafree.synthesis.fast_meta.FastMetaSynthesizer",
            "precision": "fp32", "channels_last": False, "torchvision_transforms_stand_in": ref.torchvision_stand_in,
            "teacher_and_student_weights_trainable": True, "adapter": "benchmarks/_reference.py"}
    return synth, info


def summarize(rows: list[dict], kd_seconds: list[float], kd_precision: str, info: dict) -> dict:
    """The speed figures from the rounds measured so far (``rows``, warm-up rounds marked)."""
    timed = [r for r in rows if not r["warm_up"]]
    our_s = [r["ours_seconds"] for r in timed]
    out = dict(info, warm_up_rounds=sum(r["warm_up"] for r in rows), measured_rounds=len(timed), rounds=rows,
               ours_seconds=spread(our_s), load_average_now=[round(v, 2) for v in os.getloadavg()])
    out["kd_step"] = {"batch": info["batch"], "precision": kd_precision, "seconds": kd_seconds,
                      "spread": spread(kd_seconds),
                      "what": "one Distiller KD step: pool read, crop+flip, teacher forward (no grad), student "
                              "forward+backward, SGD step; ResNet-56 -> ResNet-20"}
    if not timed:
        return out
    out["ours_images_per_second_at_median"] = info["batch"] / _median(our_s)
    out["ours_teacher_confidence_mean"] = statistics.mean(r["ours_teacher_confidence"] for r in timed)
    out["ours_bn_loss_mean"] = statistics.mean(r["ours_bn_loss"] for r in timed)
    out["ceiling"] = ceiling([r["bare"] for r in timed], info["g_steps"], kd_seconds, our_s)
    if "reference" in info:
        ref_s = [r["reference_seconds"] for r in timed]
        out["reference_seconds"] = spread(ref_s)
        out["reference_images_per_second_at_median"] = info["batch"] / _median(ref_s)
        out["ratio_of_medians"] = _median(ref_s) / _median(our_s)
        out["ratio_per_round"] = spread([r["reference_seconds"] / r["ours_seconds"] for r in timed])
        out["ratio_basis"] = ("median reference seconds / median our seconds over the measured rounds of one run, "
                              "the two sides alternating round by round (reference first in odd rounds, ours first "
                              "in even ones); ratio_per_round is the same ratio within each round")
    return out


def speed_part(teacher, s: dict, reference_dir: Path | None = None, on_round=None) -> dict:
    """Fast-5 rounds of ``speed_batch`` images with the ResNet-20 adversary: ours, and the
    reference's in the same process when ``reference_dir`` is given, alternating round by round
    so that changing load hits both alike; a set of bare steps beside each round for the
    ceiling. KD steps are timed first. ``on_round`` gets the summary after every round (so a run
    cut short still leaves its rounds on disk)."""
    import torch

    from dfkd_deploy import build_model
    from dfkd_deploy import load_recipe
    from dfkd_deploy import make_synthesizer

    bs = s["speed_batch"]
    load_start = [round(v, 2) for v in os.getloadavg()]
    recipe = load_recipe(REPO / "recipes" / "cifar-resnet20.yaml", {
        "synthesis.batch_size": bs, "synthesis.precision": s["precision"]})
    torch.manual_seed(s["seed"])
    student = build_model("cifar_resnet20", num_classes=teacher.spec.num_classes)
    synth = make_synthesizer(teacher, recipe, torch.device("cpu"))
    bare = BareSteps(teacher.module, student, synth, s["kd_precision"], bs)
    info = {"batch": bs, "g_steps": recipe.synthesis.g_steps, "precision": synth.precision,
            "channels_last": synth.channels_last, "seed": s["seed"], "load_average_start": load_start}

    with tempfile.TemporaryDirectory(prefix="speed-") as tmp:
        kd_seconds, kd_precision = kd_steps(teacher, student, s, Path(tmp))
        print(f"speed: KD step {_median(kd_seconds):.3f} s ({kd_precision})", flush=True)
        ref_synth = None
        if reference_dir:
            ref_synth, info["reference"] = _reference_side(reference_dir, s, Path(tmp))

        def ours(i: int):
            torch.manual_seed(s["seed"] + i)   # the same latents and labels per round, whatever ran between
            t0 = time.perf_counter()
            _, st = synth.synthesize(student, adversarial=True)
            return time.perf_counter() - t0, st

        def theirs(i: int):
            torch.manual_seed(s["seed"] + 10_000 + i)
            t0 = time.perf_counter()
            _, own = ref_synth.synthesize()
            return time.perf_counter() - t0, own

        rows = []
        total = s["speed_warmup"] + s["speed_rounds"]
        for i in range(total):
            row = {"round": i + 1, "warm_up": i < s["speed_warmup"]}
            order = ("reference", "ours") if i % 2 == 0 else ("ours", "reference")
            for side in order:
                if side == "ours":
                    row["ours_seconds"], st = ours(i)
                    row["ours_teacher_confidence"], row["ours_bn_loss"] = st.confidence, st.bn
                elif ref_synth is not None:
                    row["reference_seconds"], row["reference_own_timer_seconds"] = theirs(i)
            row["bare"] = bare.measure()
            row["load_average"] = [round(v, 2) for v in os.getloadavg()]
            rows.append(row)
            print(f"speed: round {i + 1}/{total}{' (warm-up)' if row['warm_up'] else ''}: ours "
                  f"{row['ours_seconds']:.2f} s" + (f", reference {row['reference_seconds']:.2f} s"
                                                     if "reference_seconds" in row else "")
                  + f", bare teacher {row['bare']['teacher']:.2f} s, load {row['load_average'][0]}", flush=True)
            if on_round is not None:
                on_round(summarize(rows, kd_seconds, kd_precision, info))
    out = summarize(rows, kd_seconds, kd_precision, info)
    out["load_average_end"] = out.pop("load_average_now")
    return out


def print_speed(sp: dict) -> None:
    c = sp["ceiling"]
    print(f"ours: {sp['ours_seconds']['median']:.2f} s per Fast-{sp['g_steps']} round of {sp['batch']} "
          f"({sp['precision']}{', channels-last' if sp['channels_last'] else ''}; min {sp['ours_seconds']['min']:.2f}, "
          f"max {sp['ours_seconds']['max']:.2f}); estimated minimum {c['round_minimum_seconds']:.2f} s = "
          f"{100 * c['round_fraction_of_ceiling']:.0f}% of the ceiling; KD step {sp['kd_step']['spread']['median']:.3f} s "
          f"({100 * c['kd_step_fraction_of_ceiling']:.0f}% of its ceiling); load {sp['load_average_start']} -> "
          f"{sp['load_average_end']}", flush=True)
    if "ratio_of_medians" in sp:
        r = sp["ratio_per_round"]
        print(f"reference: {sp['reference_seconds']['median']:.2f} s per round; ratio of medians "
              f"{sp['ratio_of_medians']:.2f}x (per-round ratios {r['min']:.2f}-{r['max']:.2f}, "
              f"IQR {r['iqr'][0]:.2f}-{r['iqr'][1]:.2f})", flush=True)


def extras_part(teacher, s: dict, default_seconds: float) -> dict:
    """DeepInversion's cost per pixel step and the pool's cost per batch (the protocol's extras)."""
    import torch

    from dfkd_deploy import build_model
    from dfkd_deploy import load_recipe
    from dfkd_deploy import make_synthesizer
    from dfkd_deploy.synthesis.pool import ImagePool

    bs = s["speed_batch"]
    recipe = load_recipe(REPO / "recipes" / "cifar-resnet20-deepinversion.yaml", {
        "synthesis.batch_size": bs, "synthesis.g_steps": 10})
    torch.manual_seed(0)
    student = build_model("cifar_resnet20", num_classes=teacher.spec.num_classes)
    synth = make_synthesizer(teacher, recipe, torch.device("cpu"))
    synth.synthesize(student, adversarial=True, batch_size=bs)
    di_step = _timed(lambda: synth.synthesize(student, adversarial=True, batch_size=bs)) / 10
    with tempfile.TemporaryDirectory(prefix="pool-io-") as tmp:
        pool = ImagePool(Path(tmp))
        batch = torch.rand(bs, 3, 32, 32)
        adds = [_timed(lambda: pool.add(batch)) for _ in range(5)]
    return {"pool_add_seconds_per_batch": _median(adds), "deepinversion_seconds_per_step": di_step,
            "deepinversion_2k_seconds_per_round_extrapolated": di_step * PAPER_DI_STEPS,
            "speedup_fast5_vs_deepinversion_2k_per_round_extrapolated": di_step * PAPER_DI_STEPS / default_seconds}


# --------------------------------------------------------------------------- protocol


def run_method(method: str, teacher, s: dict, pixels, labels, t_logits, eval_idx, workdir: Path, *,
               recipe_file: str | None = None, extra: dict | None = None, name: str | None = None,
               after=None) -> dict:
    """Synthesize and distill with ``method``'s recipe at the budget ``s``; real-data top-1 along
    the way (subset ``eval_idx``) and at the end (all). ``extra`` overrides further recipe keys
    (e.g. synthesis priors); ``name`` labels the log lines and the run directory; ``after`` is
    called with the finished Distiller (its pool still on disk)."""
    import torch

    from dfkd_deploy import build_student, make_synthesizer
    from dfkd_deploy.distill.trainer import Distiller, seed_everything
    from dfkd_deploy import load_recipe
    from dfkd_deploy.synthesis.pool import ImagePool
    from dfkd_deploy.validate.metrics import predict, top1_accuracy, top1_agreement

    recipe_file = recipe_file or ("cifar-resnet20.yaml" if method == "fast" else "cifar-resnet20-deepinversion.yaml")
    name = name or method
    overrides = {"synthesis.batch_size": s["synth_batch"], "distillation.epochs": s["epochs"],
                 "distillation.warmup": s["warmup"], "distillation.kd_steps": s["kd_steps"],
                 "distillation.batch_size": s["kd_batch"], "distillation.lr": s["kd_lr"], "seed": s.get("seed", 0),
                 "synthesis.precision": s["precision"], "distillation.precision": s["kd_precision"]}
    if method == "deepinversion":
        overrides.update({"synthesis.g_steps": s["di_steps"], "synthesis.lr_g": s["di_lr"]})
    overrides.update(extra or {})
    recipe = load_recipe(REPO / "recipes" / recipe_file, overrides)
    seed_everything(recipe.seed)
    student = build_student(recipe, teacher)
    synth = make_synthesizer(teacher, recipe, torch.device("cpu"))
    run_dir = workdir / name
    distiller = Distiller(teacher.module, teacher.normalizer(), student, synth, ImagePool(run_dir / "pool"),
                          recipe, run_dir, "cpu", show_progress=False)
    norm = teacher.normalizer()
    curve = []
    t0 = time.perf_counter()
    stops = sorted({*range(s["warmup"] + s["eval_every"], s["epochs"], s["eval_every"]), s["epochs"]})
    for stop in stops:
        distiller.run(until_epoch=stop)
        logits = predict(student, pixels[eval_idx], normalizer=norm)
        curve.append({"epoch": stop, "images": len(distiller.pool), "synthesis_seconds": distiller.synthesis_seconds,
                      "top1_subset": top1_accuracy(logits, labels[eval_idx])})
        print(f"{name}: epoch {stop}: {len(distiller.pool)} images, synthesis {distiller.synthesis_seconds:.0f} s, "
              f"top-1 (subset of {len(eval_idx)}) {curve[-1]['top1_subset']:.3f}", flush=True)
    wall = time.perf_counter() - t0
    if after is not None:
        after(distiller)
    s_logits = predict(student, pixels, normalizer=norm)
    hist = distiller.history
    return {"recipe": recipe_file, "overrides": overrides, "g_steps": recipe.synthesis.g_steps, "lr_g": recipe.synthesis.lr_g,
            "precision": synth.precision, "channels_last": synth.channels_last, "kd_precision": distiller.precision,
            "images": len(distiller.pool), "synthesis_seconds": distiller.synthesis_seconds,
            "images_per_second": len(distiller.pool) / distiller.synthesis_seconds,
            "distillation_seconds": distiller.distillation_seconds, "wall_seconds": wall,
            "student_top1": top1_accuracy(s_logits, labels), "teacher_agreement": top1_agreement(s_logits, t_logits),
            "final_synth_confidence": hist[-1].get("synth_confidence"), "final_synth_bn": hist[-1].get("synth_bn"),
            "curve": curve, "load_average_end": [round(v, 2) for v in os.getloadavg()]}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dfkd_deploy.core.io import atomic_path

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, label, color in (("fast", "FastDFKD (Fast-5)", "tab:blue"),
                              ("deepinversion", f"DeepInversion-{report['deepinversion']['g_steps']}", "tab:orange")):
        r = report[key]
        xs = [p["synthesis_seconds"] for p in r["curve"]]
        ys = [100 * p["top1_subset"] for p in r["curve"]]
        ax.plot(xs, ys, "o-", color=color, label=f"{label}: {r['images']} images")
    di2k = report.get("deepinversion_2k_synthesis_seconds_extrapolated")
    if di2k:
        ax.axvline(di2k, color="tab:orange", ls="--", lw=1)
        ax.text(di2k, ax.get_ylim()[1] - 12, "DeepInversion-2k \nsynthesis time \n(extrapolated) ", color="tab:orange",
                fontsize=8, va="top", ha="right")
    ax.axhline(100 * report["teacher_top1"], color="gray", ls=":", lw=1, label="teacher")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative synthesis seconds (log)")
    n = min(report["settings"]["eval_images"], report["test_images"])
    ax.set_ylabel(f"student top-1 on {n} CIFAR-10 test images (%)")
    ax.set_title("Synthesis time vs student accuracy (ResNet-56 -> ResNet-20)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="the 2-CPU-core budget (under 20 minutes)")
    ap.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE",
                    help="override one entry of the chosen settings")
    ap.add_argument("--skip-speed", action="store_true", help="leave out the Fast-5 speed measurement")
    ap.add_argument("--speed-only", action="store_true",
                    help="only the speed measurement (a few minutes), written to synthesis_speed_rounds.json, "
                         "or synthesis_speed_side_by_side.json with --reference")
    ap.add_argument("--reference", type=Path, default=None, metavar="DIR",
                    help="a checkout of zju-vipa/Fast-Datafree: its FastMetaSynthesizer runs in the same process, "
                         "round by round alternating with ours (needs kornia; see benchmarks/_reference.py)")
    ap.add_argument("--methods", default="fast,deepinversion",
                    help="comma-separated subset of fast,deepinversion (both are needed for the JSON's comparison)")
    args = ap.parse_args(argv)

    import torch

    from dfkd_deploy.core.io import write_json
    from dfkd_deploy.recipe import TeacherOptions
    from dfkd_deploy import load_teacher
    from dfkd_deploy.validate.data import load_eval_data, to_pixels
    from dfkd_deploy.validate.metrics import predict, top1_accuracy

    name = "small" if args.small else "full"
    s = chosen_settings(name, args.setting)
    if s is None or shared_material_missing() or reference_missing(args.reference):
        return 2
    started = time.perf_counter()
    report = {"settings_name": name, "settings": s, "machine": machine(),
              "command": "python benchmarks/synthesis_speed.py" + (" --small" if args.small else "")
              + "".join(f" --setting {x}" for x in args.setting)}
    print(f"machine: {report['machine']}", flush=True)

    teacher = load_teacher(TEACHER, TeacherOptions(arch="cifar_resnet56"))
    if args.speed_only:   # no test data needed
        report["command"] += " --speed-only" + (f" --reference {args.reference}" if args.reference else "")
        args.out_dir.mkdir(parents=True, exist_ok=True)
        out = args.out_dir / ("synthesis_speed_side_by_side.json" if args.reference else "synthesis_speed_rounds.json")

        def partial(speed: dict) -> None:
            write_json(out, dict(report, speed=speed, complete=False))

        report["speed"] = speed_part(teacher, s, args.reference, on_round=partial)
        report["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
        report["complete"] = True
        write_json(out, report)
        print_speed(report["speed"])
        print(f"wrote {out}", flush=True)
        return 0
    data = load_eval_data(TEST_SET, input_shape=teacher.spec.input_shape)
    pixels, labels = to_pixels(data.images), torch.as_tensor(data.labels)
    t_logits = predict(teacher.module, pixels, normalizer=teacher.normalizer())
    report["teacher_top1"] = top1_accuracy(t_logits, labels)
    report["test_images"] = len(labels)
    eval_idx = eval_subset(len(labels), s["eval_images"])
    print(f"teacher top-1 {report['teacher_top1']:.4f} on {len(labels)} test images", flush=True)

    if not args.skip_speed:
        report["speed"] = speed_part(teacher, s, args.reference)
        report["speed"].update(extras_part(teacher, s, report["speed"]["ours_seconds"]["median"]))
        print_speed(report["speed"])
    with tempfile.TemporaryDirectory(prefix="synthesis-speed-") as tmp:
        for method in args.methods.split(","):
            report[method] = run_method(method, teacher, s, pixels, labels, t_logits, eval_idx, Path(tmp))
    if "fast" not in report or "deepinversion" not in report:
        # one method (e.g. the bf16-vs-fp32 student check): its own file, no comparison
        method = "fast" if "fast" in report else "deepinversion"
        report["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
        report["wall_seconds"] = time.perf_counter() - started
        out = args.out_dir / f"synthesis_speed_{method}_{report[method]['precision']}_kd_{report[method]['kd_precision']}.json"
        args.out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out, report)
        r = report[method]
        print(f"{method} ({r['precision']}): {r['images']} images in {r['synthesis_seconds']:.0f} s, "
              f"student {r['student_top1']:.4f}; one method only, no comparison; wrote {out}", flush=True)
        return 0

    fast, di = report["fast"], report["deepinversion"]
    rounds = s["epochs"]
    di_per_step = di["synthesis_seconds"] / (rounds * di["g_steps"])
    di["seconds_per_step_measured"] = di_per_step
    report["deepinversion_2k_synthesis_seconds_extrapolated"] = (
        di_per_step * PAPER_DI_STEPS * rounds if di["g_steps"] != PAPER_DI_STEPS else None)
    di_paper_seconds = di["synthesis_seconds"] if di["g_steps"] == PAPER_DI_STEPS else \
        report["deepinversion_2k_synthesis_seconds_extrapolated"]
    report["speedup"] = di_paper_seconds / fast["synthesis_seconds"]
    report["speedup_basis"] = ("measured: DeepInversion-2k vs Fast-5 synthesis seconds at equal images"
                               if di["g_steps"] == PAPER_DI_STEPS else
                               f"extrapolated: DeepInversion-2k = measured seconds per pixel step "
                               f"({di_per_step:.4f} s at batch {s['synth_batch']}) x 2000 steps x {rounds} batches, "
                               f"vs Fast-5 measured; DeepInversion ran {di['g_steps']} steps here")
    report["speedup_measured_at_run_steps"] = di["synthesis_seconds"] / fast["synthesis_seconds"]
    report["accuracy_gap"] = fast["student_top1"] - di["student_top1"]
    report["accuracy_gap_basis"] = (f"FastDFKD minus DeepInversion-{di['g_steps']} student top-1 on "
                                    f"{len(labels)} test images (positive: FastDFKD better)")
    report["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    report["wall_seconds"] = time.perf_counter() - started
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_json(args.out_dir / "synthesis_speed.json", report)
    plot(report, args.out_dir / "synthesis_speed.png")
    print(f"fast: {fast['images']} images in {fast['synthesis_seconds']:.0f} s, student {fast['student_top1']:.4f}; "
          f"deepinversion-{di['g_steps']}: {di['synthesis_seconds']:.0f} s, student {di['student_top1']:.4f}; "
          f"speed-up {report['speedup']:.0f}x ({'measured' if di['g_steps'] == PAPER_DI_STEPS else 'extrapolated'}); "
          f"wall {report['wall_seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
