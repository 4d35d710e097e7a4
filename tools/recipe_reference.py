"""Writes docs/recipes.md, the recipe key reference, from the schema itself (dfkd_deploy/recipe.py:
every key's default, allowed values and description), so the page cannot drift from the code.

    python tools/recipe_reference.py --out docs/recipes.md
"""
from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path

from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfkd_deploy.recipe import Recipe  # noqa: E402

INTRO = """# Recipe reference

YAML, checked by a schema (`dfkd_deploy/recipe.py`): an unknown key or a bad value is an error
that names the key and the allowed values. Any key can be overridden on the command line with
`--set key=value` (e.g. `--set distillation.epochs=5`); `recipe.resolved.yaml` in a run directory
holds every value the run used. Shipped recipes:

- `recipes/tiny.yaml`: a few minutes on a CPU; a pipeline check, far too short for a good student.
- `recipes/cifar-resnet20.yaml`: the paper's CIFAR protocol (Fast-5, 220 epochs x 400 KD steps of 256; a GPU job).
- `recipes/resnet18.yaml`: torchvision ResNet-18 student for 224-px teachers (GPU).

This page is generated from the schema: `python tools/recipe_reference.py --out docs/recipes.md`.

| key | default | allowed | meaning |
|---|---|---|---|
"""


def _submodel(annotation):
    for t in (annotation, *typing.get_args(annotation)):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def _allowed(field) -> str:
    args = [a for a in typing.get_args(field.annotation) if a is not type(None)]
    for a in (field.annotation, *args):
        if typing.get_origin(a) is typing.Literal:
            words = " / ".join(f"`{v}`" for v in typing.get_args(a))
            numbers = [t for t in args if t in (int, float)]   # e.g. float | Literal["auto"]
            return f"{'an integer' if numbers == [int] else 'a number'} or {words}" if numbers else words
    bounds = []
    for m in field.metadata:
        for name, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            v = getattr(m, name, None)
            if v is not None:
                bounds.append(f"{sym} {v}")
    return ", ".join(bounds)


def _default(field) -> str:
    d = field.get_default(call_default_factory=True)
    return "null" if d is None else f"`{d}`"


def rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        sub = _submodel(field.annotation)
        if sub is not None:
            out += rows(sub, f"{prefix}{name}.")
            continue
        meaning = (field.description or "").replace("|", "\\|")
        out.append(f"| `{prefix}{name}` | {_default(field)} | {_allowed(field)} | {meaning} |")
    return out


def render() -> str:
    return INTRO + "\n".join(rows(Recipe)) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="write here (default: print)")
    args = ap.parse_args(argv)
    text = render()
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
