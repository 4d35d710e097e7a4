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
        key_t = _teacher_key(key, blocks)
        if key_t not in src:
            raise UsageError(f"the teacher has no {key_t} for the student's {key}")
        out[key] = src[key_t].clone()
    student.load_state_dict(out)
    return student


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics on ``images`` (model-space), a cumulative
    average over the batches, the weights unchanged. Each BN runs in train mode while it is
    measured, so a later layer sees the earlier ones normalised by their batch."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or len(images) < 2:
        return model
    saved = [m.momentum for m in bns]
    was_training = model.training
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for chunk in images.split(batch_size):
        if len(chunk) > 1:
            model(chunk)
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    model.train(was_training)
    return model


@torch.no_grad()
def match_teacher_bn(student: nn.Module, teacher: nn.Module, blocks: dict[str, list[int]],
                     images: torch.Tensor, batch_size: int = 64) -> nn.Module:
    """BN of a ``depth`` student whose teacher had its BN folded into the convs.

    The folded file keeps each channel's scale and shift only multiplied into the conv, so the
    copied BNs are identities (recognise.py) and a student missing the dropped blocks feeds them
    activations of other means and scales: it computes near chance. Here each student BN's scale
    and shift become the standard deviation and mean, per channel, of the teacher's output at the
    layer it was copied from (the teacher's identity BN, run on ``images``), and its statistics are
    then re-estimated on the same images (:func:`recalibrate_bn`): every layer of the student puts
    out what the teacher's layer puts out on those images, which is what recalibrating a BN with
    real scales does."""
    bns = {n: m for n, m in teacher.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    sums = {n: [0.0, 0.0, 0] for n in bns}

    def hook(name):
        def record(module, inputs, output):
            acc, dims = sums[name], [d for d in range(output.dim()) if d != 1]
            acc[0] = acc[0] + output.sum(dims)
            acc[1] = acc[1] + (output * output).sum(dims)
            acc[2] += output.numel() // output.shape[1]
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in bns.items()]
    was_training = teacher.training
    teacher.eval()
    try:
        for chunk in images.split(batch_size):
            teacher(chunk)
    finally:
        for h in handles:
            h.remove()
        teacher.train(was_training)
    for name, m in student.named_modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm) or not m.affine:
            continue
        t_name = _teacher_key(name, blocks)
        if t_name not in sums or not sums[t_name][2]:
            raise UsageError(f"the teacher has no BN {t_name} that ran, for the student's {name}")
        s1, s2, n = sums[t_name]
        mean = s1 / n
        m.weight.copy_((s2 / n - mean * mean).clamp_min(m.eps).sqrt())
        m.bias.copy_(mean)
    return recalibrate_bn(student, images, batch_size)


def _teacher_key(key: str, blocks: dict[str, list[int]]) -> str:
    """A student parameter or module name as the teacher's (block j of a stage <- ``blocks[stage][j]``)."""
    m = _BLOCK_KEY.match(key)
    return f"{m.group(1)}.{blocks[m.group(1)][int(m.group(2))]}.{m.group(3)}" if m else key
