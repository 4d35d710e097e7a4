"""Eval data: npz and ImageFolder sources, conforming to the teacher's shape, clear errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dfkd_deploy.core.errors import DataError
from dfkd_deploy.validate import load_eval_data, to_pixels

SHARED_CIFAR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cifar10-test-jpeg.npz"


def _rgb(n=6, h=8, w=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _npz(tmp_path, name="data.npz", **arrays) -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_npz_rgb_at_teacher_shape(tmp_path):
    images, labels = _rgb(), np.arange(6) % 3
    data = load_eval_data(_npz(tmp_path, images=images, labels=labels), input_shape=(3, 8, 8))
    assert data.images.dtype == np.uint8 and data.images.shape == (6, 3, 8, 8)
    np.testing.assert_array_equal(data.images, images.transpose(0, 3, 1, 2))
    assert data.labels.dtype == np.int64 and data.labels.tolist() == labels.tolist()
    assert data.source.endswith("data.npz") and data.class_names is None and len(data) == 6


def test_npz_resize_is_pil_bilinear(tmp_path):
    images = _rgb(h=8, w=10)
    data = load_eval_data(_npz(tmp_path, images=images, labels=np.zeros(6, np.int64)), input_shape=(3, 16, 12))
    assert data.images.shape == (6, 3, 16, 12)
    want = np.asarray(Image.fromarray(images[2]).resize((12, 16), Image.BILINEAR))
    np.testing.assert_array_equal(data.images[2], want.transpose(2, 0, 1))


def test_npz_channel_conversion(tmp_path):
    rgb = _rgb()
    gray = load_eval_data(_npz(tmp_path, images=rgb, labels=np.zeros(6, np.int64)), input_shape=(1, 8, 8))
    assert gray.images.shape == (6, 1, 8, 8)
    np.testing.assert_array_equal(gray.images[0, 0], np.asarray(Image.fromarray(rgb[0]).convert("L")))

    # N,H,W grayscale: kept for 1-channel teachers, replicated for RGB ones.
    mono = rgb[..., 0]
    path = _npz(tmp_path, "mono.npz", images=mono, labels=np.zeros(6, np.int64))
    np.testing.assert_array_equal(load_eval_data(path, input_shape=(1, 8, 8)).images[:, 0], mono)
    as_rgb = load_eval_data(path, input_shape=(3, 8, 8)).images
    for c in range(3):
        np.testing.assert_array_equal(as_rgb[:, c], mono)


def _folder(tmp_path) -> Path:
    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for cls, sizes in {"dog": [(10, 12), (9, 9)], "cat": [(8, 8)], "bird": [(16, 8)]}.items():
        (root / cls).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / ".hidden.png").write_bytes(b"ignored")
    return root


def test_image_folder_sorted_classes_resized(tmp_path):
    data = load_eval_data(_folder(tmp_path), input_shape=(3, 8, 8))
    assert data.class_names == ["bird", "cat", "dog"]
    assert data.labels.tolist() == [0, 1, 2, 2]
    assert data.images.shape == (4, 3, 8, 8) and data.images.dtype == np.uint8


def test_image_folder_grayscale(tmp_path):
    root = _folder(tmp_path)
    data = load_eval_data(root, input_shape=(1, 8, 8))
    assert data.images.shape == (4, 1, 8, 8)
    want = np.asarray(Image.open(root / "cat" / "0.png").convert("L"))
    np.testing.assert_array_equal(data.images[1, 0], want)


def test_labels_outside_teacher_classes(tmp_path):
    path = _npz(tmp_path, images=_rgb(), labels=np.array([0, 1, 2, 3, 4, 10]))
    with pytest.raises(DataError, match=r"outside 0\.\.9"):
        load_eval_data(path, input_shape=(3, 8, 8), num_classes=10)


def test_to_pixels():
    px = to_pixels(np.array([[[[0, 255], [51, 102]]]], np.uint8))
    assert px.dtype == torch.float32
    torch.testing.assert_close(px, torch.tensor([[[[0.0, 1.0], [0.2, 0.4]]]]))


def _broken_png_folder(tmp_path):
    (tmp_path / "bad" / "cls").mkdir(parents=True)
    (tmp_path / "bad" / "cls" / "broken.png").write_bytes(b"\x89PNG not really")
    return tmp_path / "bad"


def _dir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _file(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


ZEROS6 = np.zeros(6, np.int64)
ERROR_CASES = {
    # case: (make the path under tmp_path, message pattern)
    "missing path": (lambda t: t / "nope.npz", "not found"),
    "npz without labels": (lambda t: _npz(t, images=_rgb()), "lacks key.*labels"),
    "npz without images": (lambda t: _npz(t, labels=ZEROS6), "lacks key.*images"),
    "length mismatch": (lambda t: _npz(t, images=_rgb(), labels=np.zeros(5, np.int64)), "6 images but 5 labels"),
    "float images": (lambda t: _npz(t, images=_rgb().astype(np.float32), labels=ZEROS6), "uint8"),
    "bad image shape": (lambda t: _npz(t, images=np.zeros((6, 8), np.uint8), labels=ZEROS6), "N,H,W"),
    "empty npz": (lambda t: _npz(t, images=np.zeros((0, 8, 8, 3), np.uint8), labels=np.zeros(0, np.int64)),
                  "empty"),
    "empty folder": (lambda t: _dir(t / "empty"), "no class sub-folders"),
    "folder without images": (lambda t: _dir(t / "noimg" / "cls").parent, "contains no images"),
    "unreadable image": (_broken_png_folder, r"cannot read image cls/broken\.png"),
    "unsupported file": (lambda t: _file(t / "x.csv", "1,2"), "unsupported eval data"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_data_error(tmp_path, case):
    make, match = ERROR_CASES[case]
    with pytest.raises(DataError, match=match) as err:
        load_eval_data(make(tmp_path), input_shape=(3, 8, 8))
    assert "\n" not in str(err.value)


@pytest.mark.shared
def test_shared_cifar10_test_set():
    if not SHARED_CIFAR.is_file():
        pytest.skip(f"shared CIFAR-10 test set not found at {SHARED_CIFAR}")
    data = load_eval_data(SHARED_CIFAR, input_shape=(3, 32, 32), num_classes=10)
    assert data.images.shape == (10_000, 3, 32, 32) and data.images.dtype == np.uint8
    assert data.labels.shape == (10_000,) and set(np.unique(data.labels).tolist()) == set(range(10))


def test_subset_is_seeded_and_not_the_first_images(tmp_path):
    # a class-sorted set, like the shared CIFAR-10 npz: its first images are all one class
    labels = np.repeat(np.arange(10), 50)
    images = np.random.default_rng(1).integers(0, 256, (500, 8, 8, 3), dtype=np.uint8)
    data = load_eval_data(_npz(tmp_path, images=images, labels=labels), input_shape=(3, 8, 8))
    part = data.subset(100)
    assert len(part) == 100 and part.images.shape == (100, 3, 8, 8)
    assert len(np.unique(part.labels)) == 10                 # every class drawn, not just class 0
    again = data.subset(100)
    np.testing.assert_array_equal(part.labels, again.labels)
    np.testing.assert_array_equal(part.images, again.images)
    assert not np.array_equal(data.subset(100, seed=1).images, part.images)
    # each kept image keeps its own label
    flat = data.images.reshape(500, -1)
    for img, lab in zip(part.images[:10], part.labels[:10]):
        assert labels[np.flatnonzero((flat == img.reshape(-1)).all(1))[0]] == lab
    assert data.subset(10_000) is data
