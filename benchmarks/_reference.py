"""Run the reference implementation's FastDFKD synthesizer (zju-vipa/Fast-Datafree,
``datafree/synthesis/fast_meta.py``, ``FastMetaSynthesizer``) on the CPU, from a checkout the
user fetched (``--reference DIR`` of synthesis_speed.py). Nothing of it is vendored: the modules
are imported from DIR at run time and run unmodified; this adapter only builds the synthesizer
with our teacher and student modules and works round what does not run on a CPU-only torch 2.x:

- The package ``__init__`` files of ``datafree`` and ``datafree.utils`` are skipped (they import
  datasets, model zoos and an Inception metric that need torchvision's compiled ops and
  ``torchvision.models.utils``, gone from torchvision); the modules FastMetaSynthesizer uses
  (``synthesis/base.py``, ``synthesis/fast_meta.py``, ``hooks.py``, ``criterions.py``,
  ``utils/_utils.py``, ``models/generator.py``) are loaded as they are.
- When torchvision cannot be imported (a CUDA build beside a CPU torch), ``torchvision.transforms``
  is stood in for by a ``Compose`` that applies its callables in order: the only torchvision name
  the synthesizer uses. The augmentation itself is kornia's, as in the reference.
- ``Generator.clone()`` and ``fomaml_grad`` call ``.cuda()``: the generator is the reference's
  class with a ``clone`` that stays on the CPU, and the meta optimizer's ``zero_grad`` keeps the
  gradients as zeros (``set_to_none=False``, torch 1.x's default, which the code was written for),
  so ``fomaml_grad`` never reaches its ``.cuda()`` branch.
- After the timed loop the reference saves the batch as PNGs and starts a 4-worker DataLoader for
  its KD; neither is synthesis, and the workers would load the CPU during the next rounds: the pool
  is a no-op and ``DataIter`` is not started. The reference's own timer (``time.time()`` around
  the loop, its second return value) excludes them too.
"""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import torch


class _Compose:
    """torchvision.transforms.Compose: apply the callables in order."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


def _torchvision_transforms() -> types.ModuleType | None:
    try:
        from torchvision import transforms  # noqa: F401
        return None
    except Exception:  # noqa: BLE001 - a torchvision whose compiled ops do not load
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        tv = types.ModuleType("torchvision")
        tr = types.ModuleType("torchvision.transforms")
        tr.Compose = _Compose
        tv.transforms = tr
        return tv


def _package(name: str, path: Path) -> types.ModuleType:
    """A package module whose ``__init__`` is not run (submodules load from ``path``)."""
    mod = types.ModuleType(name)
    mod.__path__ = [str(path)]
    mod.__package__ = name
    sys.modules[name] = mod
    return mod


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


class ReferenceModules(types.SimpleNamespace):
    fast_meta: types.ModuleType
    generator: types.ModuleType
    commit: str | None
    torchvision_stand_in: bool


def load_reference(root: Path) -> ReferenceModules:
    """Import FastMetaSynthesizer and the reference Generator from a Fast-Datafree checkout."""
    root = Path(root).resolve()
    pkg = root / "datafree"
    if not (pkg / "synthesis" / "fast_meta.py").is_file():
        raise FileNotFoundError(f"{root} is not a Fast-Datafree checkout (no datafree/synthesis/fast_meta.py)")
    try:
        import kornia  # noqa: F401
    except ImportError as e:
        raise ImportError("the reference needs kornia (pip install kornia, in a throwaway environment)") from e
    stand_in = _torchvision_transforms()
    if stand_in is not None:
        sys.modules["torchvision"] = stand_in
        sys.modules["torchvision.transforms"] = stand_in.transforms
    datafree = _package("datafree", pkg)
    datafree.synthesis = _package("datafree.synthesis", pkg / "synthesis")
    utils = _package("datafree.utils", pkg / "utils")
    datafree.models = _package("datafree.models", pkg / "models")
    datafree.hooks = _load("datafree.hooks", pkg / "hooks.py")
    datafree.criterions = _load("datafree.criterions", pkg / "criterions.py")
    _utils = _load("datafree.utils._utils", pkg / "utils" / "_utils.py")
    for k in dir(_utils):
        if not k.startswith("__"):
            setattr(utils, k, getattr(_utils, k))
    datafree.utils = utils
    _load("datafree.synthesis.base", pkg / "synthesis" / "base.py")
    fast_meta = _load("datafree.synthesis.fast_meta", pkg / "synthesis" / "fast_meta.py")
    generator = _load("datafree.models.generator", pkg / "models" / "generator.py")
    return ReferenceModules(fast_meta=fast_meta, generator=generator, commit=_commit(root),
                            torchvision_stand_in=stand_in is not None)


def _commit(root: Path) -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


class _NoPool:
    """Stands in for the reference's PNG pool: nothing written, a one-image dataset for its loader."""

    def add(self, imgs, targets=None):
        pass

    def get_dataset(self, transform=None, labeled=True):
        return torch.utils.data.TensorDataset(torch.zeros(1, 1))


def build_reference_synthesizer(ref: ReferenceModules, teacher: torch.nn.Module, student: torch.nn.Module,
                                normalizer, s, num_classes: int, img_size: int, batch: int, tmp_dir: Path):
    """The reference's FastMetaSynthesizer with the recipe's hyper-parameters ``s`` (RecipeSynthesis),
    fp32 and NCHW as it ships (no autocast), the adversarial term on from the first round."""
    base = ref.generator.Generator

    class CPUGenerator(base):
        def clone(self):
            c = type(self)(*self.params)
            c.load_state_dict(self.state_dict())
            return c.to(next(self.parameters()).device)

    generator = CPUGenerator(nz=s.nz, ngf=s.ngf, img_size=img_size, nc=3)
    synth = ref.fast_meta.FastMetaSynthesizer(
        teacher, student, generator, nz=s.nz, num_classes=num_classes, img_size=(3, img_size, img_size),
        iterations=s.g_steps, lr_g=s.lr_g, lr_z=s.lr_z, synthesis_batch_size=batch, sample_batch_size=batch,
        adv=s.adv, bn=s.bn, oh=s.oh, bn_mmt=s.bn_mmt, save_dir=str(tmp_dir), transform=None,
        normalizer=normalizer, device="cpu", warmup=0, reset_l0=0, reset_bn=0, is_maml=1)
    for p in synth.generator.parameters():
        p.grad = torch.zeros_like(p)
    zero_grad = synth.meta_optimizer.zero_grad
    synth.meta_optimizer.zero_grad = lambda set_to_none=False: zero_grad(set_to_none=False)
    synth.data_pool = _NoPool()
    ref.fast_meta.DataIter = lambda loader: None
    return synth
