"""Corruptions in the style of MNIST-C / CIFAR-10-C: shapes, range, seeds, severity, identities."""

import numpy as np
import pytest
from sklearn import datasets

from fgjax import data


@pytest.fixture(scope="module")
def digits():
  images = datasets.load_digits().images[:64] / 16.0
  return images[..., None].astype(np.float32)  # (64, 8, 8, 1)


@pytest.mark.parametrize("name", data.CORRUPTIONS)
def test_every_corruption_keeps_shape_range_and_is_seeded(digits, name):
  out = data.corrupt(digits, name, severity=3, seed=1)
  assert out.shape == digits.shape and out.dtype == np.float32
  assert out.min() >= 0.0 and out.max() <= 1.0
  np.testing.assert_array_equal(out, data.corrupt(digits, name, severity=3, seed=1))
  assert not np.array_equal(out, digits)
  # Damage grows with severity (mean absolute change, 1 vs 5).
  mild = np.abs(data.corrupt(digits, name, 1, seed=1) - digits).mean()
  severe = np.abs(data.corrupt(digits, name, 5, seed=1) - digits).mean()
  assert severe > mild, (name, mild, severe)


def test_corruptions_have_their_documented_effect(digits):
  contrast = data.corrupt(digits, "contrast", severity=2)
  factor = data.SEVERITIES["contrast"][1]
  np.testing.assert_allclose(
    contrast.std(axis=(1, 2, 3)), factor * digits.std(axis=(1, 2, 3)), 1e-5
  )
  brightness = data.corrupt(digits, "brightness", severity=1)
  np.testing.assert_allclose(brightness, np.clip(digits + 0.1, 0, 1))
  noise = data.corrupt(np.full((200, 8, 8, 1), 0.5, np.float32), "gaussian_noise", severity=1)
  assert abs(noise.std() - data.SEVERITIES["gaussian_noise"][0]) < 0.005
  shot = data.corrupt(np.full((200, 8, 8, 1), 0.5, np.float32), "shot_noise", severity=3)
  assert abs(shot.mean() - 0.5) < 0.02  # Poisson noise is unbiased (away from the clip)
  # Rotation by +-d degrees: each image equals the rotate shift by one of the two angles.
  rotated = data.corrupt(digits[:4], "rotate", severity=3)
  for image, out in zip(digits[:4], rotated, strict=True):
    assert any(np.allclose(out, data.rotate(image[None], s * 30.0)[0], atol=1e-6) for s in (-1, 1))
  # Geometric shifts keep the (1-channel) image's batch and work on MNIST-sized inputs too.
  assert data.corrupt(np.zeros((2, 28, 28, 1)), "elastic", 5).shape == (2, 28, 28, 1)


@pytest.mark.parametrize(
  ("name", "severity"), [("fog", 3), ("rotate", 0), ("rotate", 6), ("rotate", 2.5)]
)
def test_bad_arguments_raise(digits, name, severity):
  with pytest.raises(ValueError):
    data.corrupt(digits, name, severity)
