"""ImageNet-style eval data and recipe: synset folders in the standard class order, their names in
the bundle manifest, and recipes/imagenet.yaml valid for a 1000-class 224-px teacher."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dfkd_deploy.deploy.bundle import MANIFEST, StagedBundle, seal_bundle
from dfkd_deploy.models import build_model
from dfkd_deploy.recipe import load_recipe
from dfkd_deploy.teachers.spec import TeacherSpec
from dfkd_deploy.validate import load_eval_data
from exporters.tensorrt import TrtResult

from tests.conftest import shared_path

ROOT = Path(__file__).resolve().parents[2]
# Written out of order on disk on purpose; the ImageNet-1k index is the sorted synset ids.
SYNSETS = ["n01443537", "n01440764", "n15075141", "n01484850"]


def _synset_folder(root: Path) -> Path:
    for i, wnid in enumerate(SYNSETS):
        (root / wnid).mkdir(parents=True)
        img = np.full((6, 6, 3), 40 * i, np.uint8)
        Image.fromarray(img).save(root / wnid / f"{wnid}_{i}.png")
    return root


def test_synset_folders_map_to_sorted_index_with_names(tmp_path):
    data = load_eval_data(_synset_folder(tmp_path / "val"), input_shape=(3, 6, 6), num_classes=1000)
    assert data.class_names == sorted(SYNSETS)
    for img, label in zip(data.images, data.labels):
        written = SYNSETS.index(data.class_names[label])   # the folder the image came from
        assert int(img[0, 0, 0]) == 40 * written


def test_class_names_reach_the_bundle_manifest(tmp_path):
    data = load_eval_data(_synset_folder(tmp_path / "val"), input_shape=(3, 6, 6))
    spec = TeacherSpec("onnx", "t.onnx", (3, 6, 6), num_classes=len(SYNSETS))
    staged = StagedBundle(tmp_path / "bundle", [], TrtResult(available=False), has_int8=False)
    staged.path.mkdir()
    seal_bundle(staged, spec=spec, validation={}, class_names=data.class_names)
    classes = json.loads((staged.path / MANIFEST).read_text())["classes"]
    assert classes == {"count": 4, "names": sorted(SYNSETS)}


def test_shared_imagenet_sample_folders_are_the_1k_synsets_in_order():
    root = shared_path("data", "imagenet-sample-224")
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert len(names) == 1000 and names[0] == "n01440764" and names[-1] == "n15075141"  # tench ... toilet tissue
    assert all(len(n) == 9 and n[0] == "n" and n[1:].isdigit() for n in names)


def test_imagenet_recipe_loads_and_builds_its_student():
    recipe = load_recipe(ROOT / "recipes" / "imagenet.yaml")
    t = recipe.teacher
    assert t.input_shape == (3, 224, 224) and t.num_classes == 1000
    assert t.mean == pytest.approx([0.485, 0.456, 0.406]) and t.std == pytest.approx([0.229, 0.224, 0.225])
    student = build_model(recipe.student.arch, num_classes=1000, input_size=(224, 224))
    assert sum(p.numel() for p in student.parameters()) < 2.5e6   # width-reduced, below the teacher's 3.5M
