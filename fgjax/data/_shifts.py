"""Domain shifts for adaptation: rotation, noise, contrast, brightness, blur (numpy, scipy)."""

from __future__ import annotations

import numpy as np
import scipy.ndimage

# Every function takes images of shape (..., height, width, channels) with values in [0, 1] and
# returns float32 of the same shape.


def _as_images(images: np.ndarray) -> np.ndarray:
  images = np.asarray(images, np.float32)
  if images.ndim < 3:
    raise ValueError(f"expected images (..., height, width, channels), got shape {images.shape}.")
  return images


def rotate(images: np.ndarray, degrees: float, *, order: int = 1) -> np.ndarray:
  """Rotates every image counterclockwise by `degrees` about its center (e.g. rotated MNIST).

  Uses `scipy.ndimage.rotate` (scipy comes with scikit-learn) with the output the same size as the
  input, spline interpolation of `order`, and zeros where the rotated image does not reach. Rotation
  by a multiple of 90 degrees equals `np.rot90` on square images.
  """
  images = _as_images(images)
  height_axis, width_axis = images.ndim - 3, images.ndim - 2
  rotated = scipy.ndimage.rotate(
    images, degrees, axes=(width_axis, height_axis), reshape=False, order=order, mode="constant"
  )
  return rotated.astype(np.float32)


def add_noise(images: np.ndarray, std: float, seed: int, *, clip: bool = True) -> np.ndarray:
  """Adds seeded i.i.d. Gaussian noise of standard deviation `std`; clips to [0, 1] if `clip`."""
  images = _as_images(images)
  noisy = images + std * np.random.default_rng(seed).standard_normal(images.shape).astype(
    np.float32
  )
  return np.clip(noisy, 0.0, 1.0) if clip else noisy


def adjust_contrast(images: np.ndarray, factor: float) -> np.ndarray:
  """Scales each image's deviation from its mean by `factor` (< 1: less contrast), clips."""
  images = _as_images(images)
  mean = images.mean(axis=(-3, -2, -1), keepdims=True)
  return np.clip(mean + factor * (images - mean), 0.0, 1.0).astype(np.float32)


def adjust_brightness(images: np.ndarray, delta: float) -> np.ndarray:
  """Adds `delta` to every pixel and clips to [0, 1]."""
  return np.clip(_as_images(images) + delta, 0.0, 1.0).astype(np.float32)


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
  """Blurs each image and channel with a Gaussian of std `sigma` pixels (edges reflect)."""
  images = _as_images(images)
  sigmas = [0.0] * (images.ndim - 3) + [sigma, sigma, 0.0]
  return scipy.ndimage.gaussian_filter(images, sigma=sigmas, mode="reflect").astype(np.float32)
