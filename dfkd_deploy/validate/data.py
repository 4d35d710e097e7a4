"""Real labelled images for validation, brought to the teacher's input shape.

Two sources are accepted: an ``.npz`` with ``images`` (N,H,W,C or N,H,W, uint8) and ``labels``,
or an ImageFolder directory (one sub-folder per class, classes in sorted name order, which
is then assumed to be the teacher's class order). Images stay uint8 NCHW until
:func:`to_pixels`, so a large set costs a quarter of the float memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from dfkd_deploy.core.errors import DataError
from dfkd_deploy.images import uint8_to_pixels

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass
class EvalData:
    images: np.ndarray                 # uint8, N x C x H x W, already at the teacher's shape
    labels: np.ndarray                 # int64, N
    source: str
    class_names: Optional[list[str]] = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int, seed: int = 0) -> "EvalData":
        """At most ``n`` images, drawn without replacement by a seeded shuffle (same ``seed``,
        same subset), keeping the data's order. Never the first ``n``: eval sets are often
        sorted by class (the CIFAR-10 test npz is), and their first images are all one class."""
        if n >= len(self):
            return self
        idx = np.sort(np.random.default_rng(seed).permutation(len(self))[:n])
        return EvalData(self.images[idx], self.labels[idx], self.source, self.class_names)


def load_eval_data(path: str | Path, *, input_shape: tuple[int, int, int],
                   num_classes: int | None = None, channel_order: str = "RGB") -> EvalData:
    """Read ``path`` (npz or ImageFolder) and conform it to ``input_shape`` (C, H, W).

    ``num_classes``, when given, rejects labels the teacher cannot predict, which would
    otherwise silently count as errors. Real images are RGB; ``channel_order="BGR"`` (a
    caffe-style teacher) flips the colour channels of 3-channel images to the teacher's order.
    """
    path = Path(path)
    c, h, w = (int(v) for v in input_shape)
    if c not in (1, 3):
        raise DataError(f"eval data can only be prepared for 1- or 3-channel teachers, not {c} channels")
    if not path.exists():
        raise DataError(f"eval data not found: {path}")
    if path.is_dir():
        images, labels, class_names = _read_folder(path, (c, h, w))
    elif path.suffix.lower() == ".npz":
        images, labels, class_names = _read_npz(path, (c, h, w))
    else:
        raise DataError(f"unsupported eval data {path.name}: expected an .npz file or an image folder")
    if num_classes is not None and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"eval data {path.name} has labels outside 0..{num_classes - 1} "
                        f"(found {labels.min()}..{labels.max()})")
    if channel_order == "BGR" and c == 3:
        images = np.ascontiguousarray(images[:, ::-1])
    return EvalData(images=images, labels=labels, source=str(path), class_names=class_names)


to_pixels = uint8_to_pixels   # uint8 NCHW -> float32 pixel space in [0, 1]


# --- npz -----------------------------------------------------------------------------------------

def _check_npz_container(path: Path) -> None:
    """An .npz is a zip of .npy files: say what the file is when it is not one (np.load would try
    to unpickle anything else and complain about "pickled data")."""
    import zipfile

    if zipfile.is_zipfile(path):
        return
    with open(path, "rb") as fh:
        head = fh.read(6)
    if head == b"\x93NUMPY":
        raise DataError(f"eval data {path.name} is a single .npy array, not an .npz archive: save it with "
                        "np.savez(path, images=..., labels=...)")
    raise DataError(f"eval data {path.name} is not an .npz archive (not a zip file); "
                    "expected np.savez(path, images=..., labels=...)")


def _npz_array(archive, key: str, name: str) -> np.ndarray:
    try:
        return archive[key]
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise DataError(f"eval data {name}: {key!r} is an object array (pickled Python objects, never "
                            "loaded); store images as uint8 and labels as integers") from None
        raise DataError(f"eval data {name}: cannot read {key!r}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a damaged member: zlib, EOF, bad header
        raise DataError(f"eval data {name}: cannot read {key!r}: {type(exc).__name__}: {exc}") from None


def _open_npz(path: Path):
    _check_npz_container(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - zip/format errors come in many types
        raise DataError(f"cannot read eval data {path.name}: {exc}") from None
    missing = [k for k in ("images", "labels") if k not in archive.files]
    if missing:
        archive.close()
        raise DataError(f"eval data {path.name} lacks key(s) {', '.join(missing)} "
                        f"(has: {', '.join(archive.files) or 'nothing'})")
    return archive


def _check_images(images_dtype, images_shape, name: str) -> None:
    if images_dtype != np.uint8:
        raise DataError(f"eval data {name}: images must be uint8, got {images_dtype}")
    shape = tuple(images_shape) + ((1,) if len(images_shape) == 3 else ())
    if len(shape) != 4 or shape[-1] not in (1, 3, 4):
        raise DataError(f"eval data {name}: images must be N,H,W,C (C in 1,3,4) or N,H,W; "
                        f"got shape {tuple(images_shape)}")
    if shape[1] == 0 or shape[2] == 0:
        raise DataError(f"eval data {name}: images are {shape[1]}x{shape[2]} pixels; nothing to evaluate")


def check_eval_data(path: str | Path) -> None:
    """Check, without reading the pixels, that ``path`` is eval data :func:`load_eval_data` can read:
    an .npz whose images/labels headers fit, or a folder of class sub-folders whose first image opens.
    For the start of a run, so a wrong path fails before hours of distillation."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"eval data not found: {path}")
    if path.is_dir():
        _probe_folder(path)
    elif path.suffix.lower() == ".npz":
        _probe_npz(path)
    else:
        raise DataError(f"unsupported eval data {path.name}: expected an .npz file or an image folder")


def _probe_npz(path: Path) -> None:
    import zipfile

    with _open_npz(path):
        pass
    try:
        with zipfile.ZipFile(path) as zf:
            headers = {}
            for key in ("images", "labels"):
                with zf.open(f"{key}.npy") as fh:
                    fmt = np.lib.format
                    read = fmt.read_array_header_1_0 if fmt.read_magic(fh) == (1, 0) else fmt.read_array_header_2_0
                    headers[key] = read(fh)   # (shape, fortran order, dtype)
    except Exception as exc:  # noqa: BLE001 - a damaged member header
        raise DataError(f"cannot read eval data {path.name}: {type(exc).__name__}: {exc}") from None
    for key, (_shape, _fortran, dtype) in headers.items():
        if dtype.hasobject:
            raise DataError(f"eval data {path.name}: {key!r} is an object array (pickled Python objects, never "
                            "loaded); store images as uint8 and labels as integers")
    _check_images(headers["images"][2], headers["images"][0], path.name)
    labels_shape, _, labels_dtype = headers["labels"]
    if len(labels_shape) != 1 or not np.issubdtype(labels_dtype, np.integer):
        raise DataError(f"eval data {path.name}: labels must be a 1-D integer array, "
                        f"got {labels_dtype} of shape {labels_shape}")
    if headers["images"][0][0] != labels_shape[0]:
        raise DataError(f"eval data {path.name}: {headers['images'][0][0]} images but {labels_shape[0]} labels")


def _probe_folder(root: Path) -> None:
    from PIL import Image

    files = _folder_files(root)[0]
    try:
        with Image.open(files[0]) as img:
            if 0 in img.size:
                raise DataError(f"image {files[0].relative_to(root)} in {root} is {img.size[0]}x{img.size[1]} pixels")
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError...
        raise DataError(f"cannot read image {files[0].relative_to(root)} in {root}: {exc}") from None


def _read_npz(path: Path, chw: tuple[int, int, int]):
    with _open_npz(path) as archive:
        images, labels = _npz_array(archive, "images", path.name), _npz_array(archive, "labels", path.name)
        class_names = ([str(s) for s in _npz_array(archive, "class_names", path.name)]
                       if "class_names" in archive.files else None)
    _check_images(images.dtype, images.shape, path.name)
    if images.ndim == 3:
        images = images[..., None]
    labels = _labels(labels, path.name)
    if len(images) != len(labels):
        raise DataError(f"eval data {path.name}: {len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise DataError(f"eval data {path.name} is empty")
    return _conform_batch(images, chw), labels, class_names


def _labels(labels: np.ndarray, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"eval data {name}: labels must be a 1-D integer array, "
                        f"got {labels.dtype} of shape {labels.shape}")
    return labels.astype(np.int64)


def _conform_batch(images_nhwc: np.ndarray, chw: tuple[int, int, int]) -> np.ndarray:
    c, h, w = chw
    n, ih, iw, ic = images_nhwc.shape
    if (ih, iw, ic) == (h, w, c):
        # Already right: a transpose, no per-image work (10,000 CIFAR images stay instant).
        return np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))
    out = np.empty((n, c, h, w), np.uint8)
    for i, img in enumerate(images_nhwc):
        out[i] = _conform(_to_pil(img), chw)
    return out


# --- ImageFolder ---------------------------------------------------------------------------------

def _folder_files(root: Path) -> tuple[list[Path], list[int], list[str]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"eval folder {root} has no class sub-folders")
    files, labels = [], []
    for idx, name in enumerate(classes):
        for f in sorted((root / name).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."):
                files.append(f)
                labels.append(idx)
    if not files:
        raise DataError(f"eval folder {root} contains no images "
                        f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return files, labels, classes


def _read_folder(root: Path, chw: tuple[int, int, int]):
    from PIL import Image

    files, labels, classes = _folder_files(root)
    images = np.empty((len(files), *chw), np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as img:
                img.load()
                images[i] = _conform(img, chw)
        except Exception as exc:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError...
            raise DataError(f"cannot read image {f.relative_to(root)} in {root}: {exc}") from None
    return images, np.asarray(labels, np.int64), classes


# --- per image -----------------------------------------------------------------------------------

def _to_pil(img_hwc: np.ndarray):
    from PIL import Image

    # PIL infers L / RGB / RGBA from a uint8 array's shape.
    return Image.fromarray(img_hwc[..., 0] if img_hwc.shape[-1] == 1 else img_hwc)


def _conform(img, chw: tuple[int, int, int]) -> np.ndarray:
    """PIL image -> uint8 C,H,W at the teacher's channels and size (PIL bilinear resize)."""
    from PIL import Image

    c, h, w = chw
    img = img.convert("L" if c == 1 else "RGB")   # also drops alpha and expands palettes
    if img.size != (w, h):
        img = img.resize((w, h), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
