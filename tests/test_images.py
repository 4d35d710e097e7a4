"""The image contract: pixels <-> model space <-> uint8 storage <-> NHWC, in torch and numpy."""
import numpy as np
import pytest
import torch

from dfkd_deploy import images
from dfkd_deploy.teachers.spec import Normalizer, TeacherSpec

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.3, 0.4)


def _u8(shape=(2, 3, 4, 5), seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_uint8_pixels_uint8_round_trip_is_exact_in_torch_and_numpy():
    u8 = _u8()
    pixels = images.uint8_to_pixels(u8)
    assert pixels.dtype == torch.float32 and float(pixels.min()) >= 0 and float(pixels.max()) <= 1
    assert np.array_equal(images.pixels_to_uint8(pixels), u8)
    assert np.array_equal(images.pixels_to_uint8(pixels.numpy()), u8)
    assert np.array_equal(images.uint8_to_pixels(torch.from_numpy(u8)).numpy(), pixels.numpy())


def test_pixels_to_uint8_clamps_and_rounds_the_same_in_torch_and_numpy():
    x = torch.tensor([-0.5, 0.0, 0.5 / 255, 1.5 / 255, 0.5, 1.0, 2.0])
    want = np.array([0, 0, 0, 2, 128, 255, 255], np.uint8)       # round half to even: 0.5 -> 0, 1.5 -> 2
    assert np.array_equal(images.pixels_to_uint8(x), want)
    assert np.array_equal(images.pixels_to_uint8(x.numpy()), want)
    noisy = torch.rand(3, 3, 6, 6) * 1.2 - 0.1
    assert np.array_equal(images.pixels_to_uint8(noisy), images.pixels_to_uint8(noisy.numpy()))


def test_uint8_to_pixels_leaves_its_input_alone():
    u8 = _u8()
    before = u8.copy()
    images.uint8_to_pixels(u8).mul_(2)
    assert np.array_equal(u8, before)


@pytest.mark.parametrize("value_range", [1.0, 255.0])
def test_model_space_in_numpy_matches_the_normalizer(value_range):
    spec = TeacherSpec("onnx", "x", (3, 4, 5), mean=MEAN, std=STD, value_range=value_range)
    u8 = _u8()
    want = Normalizer(spec)(images.uint8_to_pixels(u8)).numpy()
    got = images.uint8_to_model(u8, MEAN, STD, value_range)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5 * value_range)
    # mean/std as read back from a bundle's .npz (float32 arrays) give the same numbers
    as_arrays = images.uint8_to_model(u8, np.asarray(MEAN, np.float32), np.asarray(STD, np.float32), value_range)
    assert np.array_equal(as_arrays, got)


def test_model_space_formula_and_defaults():
    pixels = torch.rand(2, 3, 4, 5)
    m, s = images.channel_tensors(MEAN, STD, 3)
    want = (pixels * 255.0 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(images.pixels_to_model(pixels, m, s, 255.0), want)
    # no mean/std declared: 0 and 1, so model space is pixels * value_range exactly
    m0, s0 = images.channel_tensors(None, None, 3)
    assert torch.equal(images.pixels_to_model(pixels, m0, s0, 1.0), pixels)
    nm, ns = images.channel_constants(None, None, 3)
    assert nm.shape == ns.shape == (1, 3, 1, 1) and not nm.any() and (ns == 1).all()
    u8 = _u8()
    assert np.array_equal(images.uint8_to_model(u8, None, None, 1.0), images.uint8_to_pixels(u8).numpy())


def test_model_space_is_differentiable():
    pixels = torch.rand(2, 3, 4, 5, requires_grad=True)
    m, s = images.channel_tensors(MEAN, STD, 3)
    images.pixels_to_model(pixels, m, s, 1.0).sum().backward()
    assert torch.allclose(pixels.grad, (1 / torch.tensor(STD)).view(1, 3, 1, 1).expand_as(pixels))


def test_nhwc_round_trip_in_torch_and_numpy():
    x = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    nhwc = images.to_layout(x, "NHWC")
    assert nhwc.shape == (2, 4, 5, 3) and nhwc[1, 2, 3, 0] == x[1, 0, 2, 3]
    assert np.array_equal(images.from_layout(nhwc, "nhwc"), x)
    t = torch.from_numpy(x)
    assert torch.equal(images.to_layout(t, "NHWC"), torch.from_numpy(np.ascontiguousarray(nhwc)))
    assert torch.equal(images.from_layout(images.to_layout(t, "NHWC"), "NHWC"), t)
    assert images.to_layout(x, "NCHW") is x and images.from_layout(t, "NCHW") is t
    with pytest.raises(ValueError, match="NCHW, NHWC"):
        images.to_layout(x, "CHWN")
