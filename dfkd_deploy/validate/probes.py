"""Probe images the student never trained on, from sources independent of its training generator.

The held-out probes of a run (:func:`dfkd_deploy.run.make_probes`) come from the generator whose
images trained the student, so agreement on them measures how well the student learnt that
generator, not the teacher. The sources here do not share it:

- ``fresh``: a FastDFKD generator trained afresh, from another seed, with no adversarial term
  (it never saw the student);
- ``deepinversion``: DeepInversion batches optimised from noise (no generator at all);
- ``confident`` / ``boundary``: candidates (fresh, DeepInversion and mixtures of two images the
  teacher puts in different classes) selected by the teacher's max-softmax: high (``confident``)
  and medium (``boundary``, near a decision boundary);
- ``user``: unlabelled images the user passes (``validate --probe-data``), labels ignored;
- ``held_out``: the run's own held-out probes, kept for comparison only.

Every source returns pixel-space images ([0, 1], NCHW) and its name (:class:`ProbeSource`).
Each draws from its own random stream (a seed offset no training batch uses) and changes no
global random state.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dfkd_deploy.core.errors import DataError
from dfkd_deploy.synthesis import Priors, build_synthesizer
from dfkd_deploy.validate.metrics import predict

FRESH_SEED_OFFSET = 2_000_029
DEEPINVERSION_SEED_OFFSET = 3_000_017
MIX_SEED_OFFSET = 4_000_037
CONFIDENT_AT = 0.9               # teacher max-softmax at or above: "confident"
BOUNDARY_BAND = (0.35, 0.75)     # teacher max-softmax inside: "boundary"


@dataclass
class ProbeSource:
    name: str
    pixels: torch.Tensor               # float32 NCHW in [0, 1]
    description: str = ""
    details: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.pixels.shape[0])


@dataclass
class ProbeBudget:
    """How much synthesis the independent sources may spend (kept small: validate runs in CI)."""
    images: int = 256                  # per generated source
    fresh_rounds: int = 5              # warm-up rounds of the fresh generator before it makes probes
    deepinversion_images: int = 64
    deepinversion_steps: int = 20

    @classmethod
    def for_probes(cls, images: int) -> "ProbeBudget":
        """The calibrated budget (256 images) scaled to ``images`` probes per generated source."""
        images = max(16, int(images))
        return cls(images=images, deepinversion_images=max(16, images // 4))


def _sample(synth, count: int, batch_size: int) -> torch.Tensor:
    """``count`` images from ``synth`` without changing it (no adversarial term, no meta update)."""
    batches, made = [], 0
    while made < count:
        images, _ = synth.synthesize(None, adversarial=False, meta_update=False,
                                     batch_size=max(2, min(batch_size, count - made)))
        batches.append(images.detach().cpu())
        made += images.shape[0]
    return torch.cat(batches)[:count]


def fresh_generator(teacher, synthesis_options, device, *, seed: int, count: int = 256,
                    rounds: int = 5, seed_offset: int = FRESH_SEED_OFFSET) -> ProbeSource:
    """A FastDFKD generator trained from scratch on the teacher alone (adversarial term off,
    another seed), then sampled with fresh latents."""
    opts = synthesis_options.model_copy(update={"method": "fastdfkd", "adv": 0.0})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + seed_offset)
        with build_synthesizer("fastdfkd", teacher, opts, device,
                               Priors.for_teacher(teacher.spec, opts.priors)) as synth:
            for _ in range(rounds):
                synth.synthesize(None, adversarial=False)
            pixels = _sample(synth, count, synth.opts.batch_size)
    return ProbeSource("fresh", pixels,
                       f"fresh FastDFKD generator (seed +{seed_offset}, {rounds} rounds, no adversarial term)",
                       {"rounds": rounds})


def deepinversion(teacher, synthesis_options, device, *, seed: int, count: int = 64, steps: int = 20,
                  lr: float = 0.1, seed_offset: int = DEEPINVERSION_SEED_OFFSET) -> ProbeSource:
    """DeepInversion batches optimised from Gaussian noise for ``steps`` steps (the registered
    ``deepinversion`` method, adversarial term off)."""
    opts = synthesis_options.model_copy(update={"method": "deepinversion", "adv": 0.0, "g_steps": steps,
                                                "lr_g": lr, "bn_mmt": 0.0})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + seed_offset)
        with build_synthesizer("deepinversion", teacher, opts, device,
                               Priors.for_teacher(teacher.spec, opts.priors)) as synth:
            pixels = _sample(synth, count, synth.opts.batch_size)
    return ProbeSource("deepinversion", pixels,
                       f"DeepInversion from noise ({steps} steps, lr {lr:g})", {"steps": steps})


def teacher_confidence(teacher, pixels: torch.Tensor, device="cpu") -> torch.Tensor:
    """The teacher's max-softmax for each image."""
    logits = predict(teacher.module, pixels, normalizer=teacher.normalizer(), device=device)
    return torch.softmax(logits.float(), 1).max(1).values


def mixtures(teacher, pixels: torch.Tensor, *, seed: int, count: int, device="cpu") -> torch.Tensor:
    """Convex mixtures (weight in [0.3, 0.7]) of two images the teacher puts in different classes:
    candidates for the boundary between those classes."""
    if len(pixels) < 2:
        return pixels[:0]
    labels = predict(teacher.module, pixels, normalizer=teacher.normalizer(), device=device).argmax(1)
    g = torch.Generator().manual_seed(seed + MIX_SEED_OFFSET)
    a = torch.randint(0, len(pixels), (4 * count,), generator=g)
    b = torch.randint(0, len(pixels), (4 * count,), generator=g)
    keep = labels[a] != labels[b]
    a, b = a[keep][:count], b[keep][:count]
    w = torch.empty(len(a), 1, 1, 1).uniform_(0.3, 0.7, generator=g)
    return (w * pixels[a] + (1 - w) * pixels[b]).clamp(0, 1)


def confidence_split(teacher, candidates: torch.Tensor, *, count: int, device="cpu",
                     confident_at: float = CONFIDENT_AT,
                     band: tuple[float, float] = BOUNDARY_BAND) -> tuple[ProbeSource, ProbeSource]:
    """(``confident``, ``boundary``): up to ``count`` candidates each whose teacher max-softmax is
    at least ``confident_at``, and inside ``band``. Either may hold fewer (even none) when the
    candidates do not have them: the caller reports the counts."""
    conf = teacher_confidence(teacher, candidates, device)
    hi = torch.nonzero(conf >= confident_at).flatten()
    mid = torch.nonzero((conf >= band[0]) & (conf < band[1])).flatten()
    hi = hi[torch.argsort(conf[hi], descending=True)][:count]
    mid = mid[torch.argsort((conf[mid] - sum(band) / 2).abs())][:count]
    return (ProbeSource("confident", candidates[hi], f"teacher max-softmax >= {confident_at:g}",
                        {"min_confidence": confident_at}),
            ProbeSource("boundary", candidates[mid], f"teacher max-softmax in [{band[0]:g}, {band[1]:g})",
                        {"band": list(band)}))


def user_images(path: str | Path, spec, *, limit: int = 2000, seed: int = 0) -> ProbeSource:
    """Unlabelled images the user passes: an .npz with ``images`` (labels, if any, are ignored),
    an ImageFolder or a flat folder of image files; a seeded random subset of at most ``limit``."""
    from dfkd_deploy.validate.data import IMAGE_SUFFIXES, _check_images, _conform_batch
    from dfkd_deploy.images import uint8_to_pixels

    path = Path(path)
    chw = tuple(int(v) for v in spec.input_shape)
    if not path.exists():
        raise DataError(f"probe data not found: {path}")
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                       and not f.name.startswith("."))
        if not files:
            raise DataError(f"probe folder {path} contains no images")
        images = np.stack([_read_image(files[i], chw) for i in _pick(len(files), limit, seed)])
    elif path.suffix.lower() == ".npz":
        raw = _npz_images(path)
        _check_images(raw.dtype, raw.shape, path.name)
        raw = raw[..., None] if raw.ndim == 3 else raw
        if len(raw) == 0:
            raise DataError(f"probe data {path.name} is empty")
        images = _conform_batch(raw[_pick(len(raw), limit, seed)], chw)
    else:
        raise DataError(f"unsupported probe data {path.name}: expected an .npz file or an image folder")
    if getattr(spec, "channel_order", "RGB") == "BGR" and chw[0] == 3:
        images = np.ascontiguousarray(images[:, ::-1])
    return ProbeSource("user", uint8_to_pixels(torch.from_numpy(images)), f"user images from {path.name} "
                       "(labels ignored)", {"source": str(path)})


def _read_image(path: Path, chw) -> np.ndarray:
    from PIL import Image

    from dfkd_deploy.validate.data import _conform

    try:
        with Image.open(path) as img:
            return _conform(img.copy(), chw)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types
        raise DataError(f"cannot read probe image {path}: {exc}") from None


def _npz_images(path: Path) -> np.ndarray:
    from dfkd_deploy.validate.data import _check_npz_container, _npz_array

    _check_npz_container(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - zip/format errors come in many types
        raise DataError(f"cannot read probe data {path.name}: {exc}") from None
    with archive:
        if "images" not in archive.files:
            raise DataError(f"probe data {path.name} has no 'images' array (has: {', '.join(archive.files) or 'nothing'})")
        return _npz_array(archive, "images", path.name)


def _pick(n: int, limit: int, seed: int) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def independent_sources(teacher, synthesis_options, device, *, seed: int,
                        budget: Optional[ProbeBudget] = None) -> list[ProbeSource]:
    """fresh, deepinversion, confident, boundary: the sources every estimate is based on."""
    budget = budget or ProbeBudget()
    fresh = fresh_generator(teacher, synthesis_options, device, seed=seed, count=budget.images,
                            rounds=budget.fresh_rounds)
    di = deepinversion(teacher, synthesis_options, device, seed=seed, count=budget.deepinversion_images,
                       steps=budget.deepinversion_steps)
    base = torch.cat([fresh.pixels, di.pixels])
    candidates = torch.cat([base, mixtures(teacher, base, seed=seed, count=2 * len(base), device=device)])
    confident, boundary = confidence_split(teacher, candidates, count=budget.images // 2, device=device)
    return [fresh, di, confident, boundary]
