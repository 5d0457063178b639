"""Image helpers for the LUT papers' protocol: Y channel, bicubic ×s, Gaussian noise, PSNR/SSIM.

PSNR and SSIM are on the Y channel of YCbCr (ITU-R BT.601, Y in [16, 235]) with `s` border pixels
cropped, as SR-LUT / MuLUT / TinyLUT report them; SSIM is scikit-image's with the Gaussian
window of Wang et al. (2004) (σ = 1.5, as the authors' `cal_ssim`).
"""

from __future__ import annotations

import numpy as np
import skimage.metrics
import skimage.transform


def rgb_to_y(image: np.ndarray) -> np.ndarray:
  """Y of BT.601 YCbCr (MATLAB's `rgb2ycbcr`), float64 in [16, 235]; gray images are taken as Y."""
  image = np.asarray(image, np.float64)
  if image.ndim == 2:
    return image
  if image.ndim != 3 or image.shape[-1] < 3:
    raise ValueError(f"image: expected (H, W) or (H, W, 3), got {image.shape}.")
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  return 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0


def to_pixels(image: np.ndarray) -> np.ndarray:
  """uint8-range image -> int32 in [-128, 127] (the tables' input)."""
  return np.clip(np.round(np.asarray(image, np.float64)), 0, 255).astype(np.int32) - 128


def from_pixels(pixels) -> np.ndarray:
  """int in [-128, 127] -> uint8 image."""
  return (np.asarray(pixels).astype(np.int32) + 128).clip(0, 255).astype(np.uint8)


def bicubic_downscale(image: np.ndarray, upscale: int) -> np.ndarray:
  """Low-resolution input: crop to a multiple of s, bicubic (anti-aliased) ÷s, rounded to uint8."""
  h, w = image.shape[:2]
  image = image[: h - h % upscale, : w - w % upscale]
  shape = (image.shape[0] // upscale, image.shape[1] // upscale) + image.shape[2:]
  low = skimage.transform.resize(
    image.astype(np.float64), shape, order=3, anti_aliasing=True, preserve_range=True
  )
  return np.clip(np.round(low), 0, 255).astype(np.uint8)


def add_gaussian_noise(image: np.ndarray, sigma: float, seed: int) -> np.ndarray:
  """`clip(round(x + σ n), 0, 255)` with n ~ N(0, 1) from `seed` (σ in 8-bit units)."""
  noise = np.random.default_rng(seed).normal(size=np.shape(image)) * sigma
  return np.clip(np.round(np.asarray(image, np.float64) + noise), 0, 255).astype(np.uint8)


def _crop(y: np.ndarray, border: int) -> np.ndarray:
  return y[border:-border, border:-border] if border else y


def psnr_y(output: np.ndarray, target: np.ndarray, border: int = 0) -> float:
  """PSNR (dB) between the Y channels of two uint8-range images, `border` pixels cropped."""
  a, b = _crop(rgb_to_y(output), border), _crop(rgb_to_y(target), border)
  if a.shape != b.shape:
    raise ValueError(f"output/target: shapes differ, {a.shape} vs {b.shape}.")
  return float(skimage.metrics.peak_signal_noise_ratio(b, a, data_range=255))


def ssim_y(output: np.ndarray, target: np.ndarray, border: int = 0) -> float:
  """SSIM between the Y channels (Gaussian window σ = 1.5), `border` pixels cropped."""
  a, b = _crop(rgb_to_y(output), border), _crop(rgb_to_y(target), border)
  if a.shape != b.shape:
    raise ValueError(f"output/target: shapes differ, {a.shape} vs {b.shape}.")
  return float(
    skimage.metrics.structural_similarity(
      b, a, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
  )
