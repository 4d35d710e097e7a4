"""Independent probe sources: what each yields, and that none of it comes from the training pool."""
import numpy as np
import pytest
import torch

from dfkd_deploy.validate.probes import (BOUNDARY_BAND, CONFIDENT_AT, ProbeBudget, confidence_split,
                                         independent_sources, mixtures, teacher_confidence, user_images)

from ..conftest import quick_recipe

SMALL = ProbeBudget(images=32, fresh_rounds=2, deepinversion_images=16, deepinversion_steps=5)


@pytest.fixture(scope="module")
def trained(digits_teacher, tmp_path_factory):
    """A short data-free run: its pool is what the student trained on."""
    from dfkd_deploy.run import distill, make_probes

    recipe = quick_recipe()
    run_dir = tmp_path_factory.mktemp("run")
    student, synth, _ = distill(digits_teacher, recipe, run_dir, torch.device("cpu"), show_progress=False)
    held_out = make_probes(synth, 32, recipe.synthesis.batch_size, recipe.seed)
    return recipe, run_dir / "pool", held_out


def test_sources_are_pixels_with_names(digits_teacher, trained):
    recipe, _, _ = trained
    sources = independent_sources(digits_teacher, recipe.synthesis, "cpu", seed=recipe.seed, budget=SMALL)
    assert [s.name for s in sources] == ["fresh", "deepinversion", "confident", "boundary"]
    assert len(sources[0]) == 32 and len(sources[1]) == 16
    for s in sources:
        assert s.pixels.shape[1:] == (1, 8, 8) and s.pixels.dtype == torch.float32
        if len(s):
            assert 0.0 <= float(s.pixels.min()) and float(s.pixels.max()) <= 1.0


def test_no_probe_comes_from_the_training_pool(digits_teacher, trained):
    from dfkd_deploy.synthesis.pool import ImagePool

    recipe, pool_dir, held_out = trained
    pool = ImagePool(pool_dir)
    pool_px = pool.get(np.arange(len(pool))).flatten(1)
    sources = independent_sources(digits_teacher, recipe.synthesis, "cpu", seed=recipe.seed, budget=SMALL)
    for name, px in [(s.name, s.pixels) for s in sources if len(s)] + [("held_out", held_out)]:
        quantised = (px.clamp(0, 1) * 255).round() / 255   # as the pool stores them
        nearest = torch.cdist(quantised.flatten(1), pool_px).min(1).values
        assert float(nearest.min()) > 0.05, f"{name}: an image equals a training-pool image"


def test_confidence_split_gives_what_it_asks_for(digits_teacher, digits_data):
    _, x_te, _, _ = digits_data
    real = torch.from_numpy(x_te[:200]).float().div(255).unsqueeze(1)
    candidates = torch.cat([real, mixtures(digits_teacher, real, seed=0, count=200)])
    confident, boundary = confidence_split(digits_teacher, candidates, count=64)
    assert len(confident) > 0 and len(boundary) > 0
    assert float(teacher_confidence(digits_teacher, confident.pixels).min()) >= CONFIDENT_AT
    conf = teacher_confidence(digits_teacher, boundary.pixels)
    assert float(conf.min()) >= BOUNDARY_BAND[0] and float(conf.max()) < BOUNDARY_BAND[1]


def test_mixtures_mix_images_of_different_teacher_classes(digits_teacher, digits_data):
    _, x_te, _, _ = digits_data
    real = torch.from_numpy(x_te[:100]).float().div(255).unsqueeze(1)
    mixed = mixtures(digits_teacher, real, seed=0, count=50)
    assert len(mixed) == 50
    # lower teacher confidence than the images they come from, on average
    assert float(teacher_confidence(digits_teacher, mixed).mean()) < float(teacher_confidence(digits_teacher, real).mean())


def test_user_images_ignore_labels(digits_teacher, tmp_path):
    from PIL import Image

    imgs = np.random.default_rng(0).integers(0, 256, (5, 16, 16), dtype=np.uint8)
    np.savez(tmp_path / "with_labels.npz", images=imgs, labels=np.arange(5))
    np.savez(tmp_path / "unlabelled.npz", images=imgs)
    folder = tmp_path / "flat"
    folder.mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(folder / f"{i}.png")
    spec = digits_teacher.spec
    a = user_images(tmp_path / "with_labels.npz", spec)
    b = user_images(tmp_path / "unlabelled.npz", spec)
    c = user_images(folder, spec)
    assert a.name == "user" and a.pixels.shape == (5, 1, 8, 8)
    assert torch.equal(a.pixels, b.pixels) and torch.equal(a.pixels, c.pixels)


def test_user_images_errors_are_data_errors(digits_teacher, tmp_path):
    from dfkd_deploy.core.errors import DataError

    np.savez(tmp_path / "x.npz", labels=np.arange(3))
    with pytest.raises(DataError, match="no 'images'"):
        user_images(tmp_path / "x.npz", digits_teacher.spec)
    with pytest.raises(DataError, match="not found"):
        user_images(tmp_path / "missing", digits_teacher.spec)
