"""Peak resident memory of one KD step and one synthesis round for an ImageNet recipe, on CPU.

One process: load the teacher, then a KD step (student forward/backward, teacher forward without
gradients) at ``--kd-batch``, then one adversarial synthesis round at ``--synth-batch``;
``ru_maxrss`` is read after each. The KD step runs first, so the second reading is the synthesis
peak whenever synthesis needs more. Prints JSON.

    python benchmarks/imagenet_memory.py ../shared/teachers/imagenet-mobilenetv2-12-int8.onnx \\
        --recipe recipes/imagenet.yaml --kd-batch 32 --synth-batch 16
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def main() -> None:
    from dfkd_deploy.core.augment import crop_flip
    from dfkd_deploy.distill.kd import kd_kl
    from dfkd_deploy import load_recipe
    from dfkd_deploy import build_student, make_synthesizer
    from dfkd_deploy import load_teacher

    ap = argparse.ArgumentParser()
    ap.add_argument("teacher")
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--kd-batch", type=int, required=True)
    ap.add_argument("--synth-batch", type=int, required=True)
    ap.add_argument("--g-steps", type=int, default=1, help="inner steps of the round (the peak is per step)")
    a = ap.parse_args()

    recipe = load_recipe(a.recipe, {"synthesis.batch_size": a.synth_batch, "synthesis.g_steps": a.g_steps})
    teacher = load_teacher(a.teacher, recipe.teacher)
    out = {"teacher": a.teacher, "recipe": a.recipe, "after_load_mib": round(peak_mib())}
    print(json.dumps(out), flush=True)
    student = build_student(recipe, teacher)
    norm = teacher.normalizer()
    d, aug = recipe.distillation, recipe.synthesis.augment
    opt = torch.optim.SGD(student.parameters(), lr=d.lr, momentum=d.momentum)
    t0 = time.perf_counter()
    x = norm(crop_flip(torch.rand(a.kd_batch, *teacher.spec.input_shape), aug.crop_padding, aug.flip))
    with torch.no_grad():
        t_out = teacher.module(x).float()
    loss = kd_kl(student(x).float(), t_out, d.temperature)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    out.update(kd_batch=a.kd_batch, kd_step_seconds=round(time.perf_counter() - t0, 1),
               peak_after_kd_step_mib=round(peak_mib()))
    print(json.dumps(out), flush=True)
    synth = make_synthesizer(teacher, recipe, torch.device("cpu"))
    t0 = time.perf_counter()
    synth.synthesize(student, adversarial=True)
    out.update(synth_batch=a.synth_batch, g_steps=a.g_steps, synth_round_seconds=round(time.perf_counter() - t0, 1),
               peak_after_synthesis_round_mib=round(peak_mib()))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
