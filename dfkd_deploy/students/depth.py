"""``student.init: depth``: a shallower net of the teacher's residual family, initialised from a
subset of the teacher's blocks (ResNet-56 -> ResNet-20 keeps 3 of 9 blocks per stage).

The stem (conv1/bn1), the head (linear/fc) and block 0 of every stage are always kept: block 0 is
the only one whose shapes change (stride 2, more channels); the later blocks of a stage all map
C -> C, so any subset of them chains. Which of the rest to keep is ``student.depth_blocks``:
``spread`` (evenly spaced, e.g. 0, 4, 8 of 9) or ``last`` (0 then the last ones, e.g. 0, 7, 8).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from dfkd_deploy.core.errors import UsageError

BLOCK_CHOICES = ("spread", "last", "first")


@dataclass(frozen=True)
class Family:
    name: str
    stages: tuple[str, ...]
    members: dict            # zoo arch -> blocks per stage


FAMILIES = (
    Family("cifar_resnet", ("layer1", "layer2", "layer3"),
           {f"cifar_resnet{d}": ((d - 2) // 6,) * 3 for d in (8, 14, 20, 32, 44, 56)}),
    Family("torchvision_resnet", ("layer1", "layer2", "layer3", "layer4"),
           {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}),
)


def family_of(arch: str | None) -> Family | None:
    return next((f for f in FAMILIES if arch in f.members), None)


def shallower(arch: str) -> list[str]:
    """The family's members with fewer blocks than ``arch`` in no stage and fewer in all, deepest first."""
    fam = family_of(arch)
    if fam is None:
        return []
    mine = fam.members[arch]
    out = [a for a, b in fam.members.items() if a != arch and all(x <= y for x, y in zip(b, mine))]
    return sorted(out, key=lambda a: -sum(fam.members[a]))


def choose_blocks(teacher_blocks: int, student_blocks: int, how: str = "spread") -> list[int]:
    """Indices of the teacher's blocks (in one stage) the student keeps; always includes 0."""
    if not 1 <= student_blocks <= teacher_blocks:
        raise UsageError(f"a stage of {student_blocks} blocks cannot be taken from one of {teacher_blocks}")
    if student_blocks == 1:
        return [0]
    if how == "spread":
        step = (teacher_blocks - 1) / (student_blocks - 1)
        return sorted({round(i * step) for i in range(student_blocks)})
    if how == "last":
        return [0] + list(range(teacher_blocks - student_blocks + 1, teacher_blocks))
    if how == "first":
        return list(range(student_blocks))
    raise UsageError(f"student.depth_blocks {how!r}: choose one of {', '.join(BLOCK_CHOICES)}")


def block_map(teacher_arch: str, student_arch: str, how: str = "spread") -> dict[str, list[int]]:
    """``{"layer1": [0, 4, 8], ...}``: for each stage, the teacher blocks the student's blocks come from."""
    fam = family_of(teacher_arch)
    if fam is None or student_arch not in fam.members:
        raise UsageError(f"student.init: depth needs a student of the teacher's residual family; "
                         f"{student_arch!r} is not a shallower {teacher_arch!r}")
    t, s = fam.members[teacher_arch], fam.members[student_arch]
    if any(b > a for a, b in zip(t, s)):
        raise UsageError(f"{student_arch} is not shallower than {teacher_arch}")
    return {stage: choose_blocks(a, b, how) for stage, a, b in zip(fam.stages, t, s)}


_BLOCK_KEY = re.compile(r"^(layer\d+)\.(\d+)\.(.*)$")


def copy_blocks(teacher: nn.Module, student: nn.Module, blocks: dict[str, list[int]]) -> nn.Module:
    """Load the teacher's stem, head and the chosen blocks into ``student`` (block j of a stage
    <- teacher block ``blocks[stage][j]``); every student tensor must be covered."""
    src = teacher.state_dict()
    out = {}
    for key in student.state_dict():
        m = _BLOCK_KEY.match(key)
        if m:
            stage, j, rest = m.group(1), int(m.group(2)), m.group(3)
            key_t = f"{stage}.{blocks[stage][j]}.{rest}"
        else:
            key_t = key
        if key_t not in src:
            raise UsageError(f"the teacher has no {key_t} for the student's {key}")
        out[key] = src[key_t].clone()
    student.load_state_dict(out)
    return student


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: torch.Tensor, batch_size: int = 64,
                   preserve_function: bool = False) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics on ``images`` (model-space), a cumulative
    average over the batches. The weights are unchanged, unless ``preserve_function``: then each
    BN's scale and shift are re-expressed around the new statistics so that the eval-mode function
    stays what it was (scale * s'/s, shift + scale * (m' - m)/s), and a train-mode BN, which
    normalises by its batch, starts out computing nearly that function on such images. That is
    for BNs whose statistics are made up (a teacher whose BN was folded into its convs)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or len(images) < 2:
        return model
    old = [(m.running_mean.clone(), (m.running_var + m.eps).sqrt()) for m in bns] if preserve_function else None
    saved = [(m.momentum, m.training) for m in bns]
    was_training = model.training
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for chunk in images.split(batch_size):
        if len(chunk) > 1:
            model(chunk)
    for m, (momentum, _) in zip(bns, saved):
        m.momentum = momentum
    if old is not None:
        for m, (mean, std) in zip(bns, old):
            if m.affine:
                new_std = (m.running_var + m.eps).sqrt()
                m.bias.add_(m.weight * (m.running_mean - mean) / std)
                m.weight.mul_(new_std / std)
    model.train(was_training)
    return model
