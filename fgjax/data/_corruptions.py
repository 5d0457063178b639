"""Corruption benchmarks in the style of MNIST-C and CIFAR-10-C, for any image array (numpy).

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations" (ICLR 2019) define CIFAR-10-C / ImageNet-C: 15 corruptions (noise, blur, weather,
digital) at 5 severities; Mu & Gilmer, "MNIST-C" (2019) adapt the idea to digits (shear, scale,
rotation, translation, stripes, ...). Those sets are downloads; this module builds the same kind
of shift on the fly from any images in [0, 1] (scikit-learn's digits, the MNIST test set), so the
domain-shift study of Chen et al., "Stepping Forward on the Last Mile" (NeurIPS 2024) runs
offline. The parameters are ours (scaled to small grayscale images), not the published ones:
results are comparable between runs of this code, not with published MNIST-C numbers.

Every corruption takes images of shape (..., height, width, channels) with values in [0, 1], a
severity 1..5 and a seed, and returns float32 images of the same shape in [0, 1]; the same
(images, name, severity, seed) always gives the same result.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage

from fgjax.data import _shifts

# Per corruption: its parameter at severities 1..5 (increasing damage).
SEVERITIES: dict[str, tuple[float, ...]] = {
  "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),  # noise std
  "shot_noise": (60.0, 25.0, 12.0, 5.0, 3.0),  # photons at intensity 1 (Poisson)
  "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),  # fraction of salt-and-pepper pixels
  "gaussian_blur": (0.4, 0.6, 0.8, 1.0, 1.3),  # std in units of 1/8 of the image side
  "motion_blur": (1.0, 1.5, 2.0, 2.5, 3.0),  # blur length in units of 1/8 of the image side
  "contrast": (0.6, 0.45, 0.3, 0.2, 0.12),  # factor on the deviation from the mean
  "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),  # added to every pixel
  "rotate": (10.0, 20.0, 30.0, 40.0, 50.0),  # degrees, sign drawn per image
  "shear": (0.1, 0.2, 0.3, 0.4, 0.5),  # horizontal shear, sign drawn per image
  "scale": (0.9, 0.8, 0.7, 0.6, 0.5),  # zoom out about the centre
  "translate": (0.06, 0.1, 0.14, 0.18, 0.22),  # shift in units of the image side, random direction
  "pixelate": (0.8, 0.65, 0.5, 0.4, 0.3),  # downsampling factor (nearest up again)
  "stripe": (1.0, 2.0, 3.0, 4.0, 5.0),  # number of bright vertical stripes (MNIST-C's "stripe")
  "elastic": (0.5, 0.75, 1.0, 1.25, 1.5),  # displacement in units of 1/8 of the image side
}
CORRUPTIONS = tuple(SEVERITIES)


def _check(images, name: str, severity: int) -> np.ndarray:
  if name not in SEVERITIES:
    raise ValueError(f"name: unknown corruption {name!r}; valid: {', '.join(CORRUPTIONS)}.")
  if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
    raise ValueError(f"severity: expected an integer in 1..5, got {severity!r}.")
  images = np.asarray(images, np.float32)
  if images.ndim < 3:
    raise ValueError(f"images: expected (..., height, width, channels), got shape {images.shape}.")
  return images


def _per_image(images: np.ndarray, fn) -> np.ndarray:
  """Applies fn(image (h, w, c), index) to each image of (..., h, w, c)."""
  flat = images.reshape((-1, *images.shape[-3:]))
  out = np.stack([fn(image, i) for i, image in enumerate(flat)]) if len(flat) else flat
  return out.reshape(images.shape)


def _affine(image: np.ndarray, matrix: np.ndarray, shift=(0.0, 0.0)) -> np.ndarray:
  """Resamples image (h, w, c) at matrix @ (y, x) about the centre, plus shift (pixels)."""
  height, width = image.shape[:2]
  centre = np.array([(height - 1) / 2, (width - 1) / 2])
  offset = centre - matrix @ centre - np.asarray(shift)
  return np.stack(
    [
      scipy.ndimage.affine_transform(image[..., c], matrix, offset=offset, order=1, cval=0.0)
      for c in range(image.shape[-1])
    ],
    axis=-1,
  )


def corrupt(images, name: str, severity: int = 3, seed: int = 0) -> np.ndarray:
  """A corrupted copy of `images`, in the style of MNIST-C / CIFAR-10-C.

  Noise: "gaussian_noise" (x + σ n), "shot_noise" (Poisson(λ x) / λ), "impulse_noise" (salt and
  pepper). Blur: "gaussian_blur", "motion_blur" (a horizontal box of random sign of drift).
  Digital: "contrast" (m + f (x − m)), "brightness" (x + δ), "pixelate". Geometric (MNIST-C):
  "rotate", "shear", "scale", "translate", "elastic" (smoothed random displacement field).
  Occlusion: "stripe" (bright vertical lines). Parameters per severity are in `SEVERITIES`; sizes
  are relative to the image side, so 8x8 digits and 28x28 MNIST get the same relative damage.

  Args:
    images: (..., height, width, channels) in [0, 1].
    name: one of `CORRUPTIONS`.
    severity: 1 (mild) .. 5 (severe).
    seed: seeds every random choice (noise, signs, directions).

  Returns:
    float32 images of the same shape, clipped to [0, 1].

  Example:
    >>> blurred = fgjax.data.corrupt(x_test, "motion_blur", severity=3, seed=0)
  """
  images = _check(images, name, severity)
  value = SEVERITIES[name][severity - 1]
  rng = np.random.default_rng(seed)
  side = images.shape[-3]
  if name == "gaussian_noise":
    out = images + value * rng.standard_normal(images.shape).astype(np.float32)
  elif name == "shot_noise":
    out = rng.poisson(images * value).astype(np.float32) / value
  elif name == "impulse_noise":
    hit = rng.random(images.shape) < value
    salt = rng.random(images.shape) < 0.5
    out = np.where(hit, salt.astype(np.float32), images)
  elif name == "gaussian_blur":
    out = _shifts.gaussian_blur(images, value * side / 8)
  elif name == "motion_blur":
    length = max(2, int(round(value * side / 8)) + 1)
    kernel = np.zeros((1, length, 1), np.float32)
    kernel[0, :, 0] = 1.0 / length

    def blur(image, i):
      # Drift right or left per image: a one-sided box, as a moving camera smears one way.
      origin = (length - 1) // 2 if rng_signs[i] > 0 else -(length // 2)
      return scipy.ndimage.convolve(image, kernel, mode="constant", origin=(0, origin, 0))

    rng_signs = rng.choice([-1, 1], size=int(np.prod(images.shape[:-3], dtype=int)))
    out = _per_image(images, blur)
  elif name == "contrast":
    out = _shifts.adjust_contrast(images, value)
  elif name == "brightness":
    out = images + value
  elif name == "pixelate":
    small = max(1, int(round(side * value)))
    index = np.minimum((np.arange(side) * small) // side, small - 1)
    # Average over each block, then repeat it (nearest upsampling).
    blocks = np.stack([index == j for j in range(small)], 0).astype(np.float32)
    blocks /= blocks.sum(1, keepdims=True)
    pooled = np.einsum("ih,...hwc,jw->...ijc", blocks, images, blocks)
    out = pooled[..., index, :, :][..., :, index, :]
  elif name in ("rotate", "shear", "scale", "translate"):
    count = int(np.prod(images.shape[:-3], dtype=int))
    signs = rng.choice([-1.0, 1.0], size=count)
    angles = rng.uniform(0, 2 * np.pi, size=count)

    def transform(image, i):
      if name == "rotate":
        return _shifts.rotate(image[None], signs[i] * value)[0]
      if name == "shear":
        return _affine(image, np.array([[1.0, 0.0], [signs[i] * value, 1.0]]))
      if name == "scale":
        return _affine(image, np.eye(2) / value)
      shift = value * side * np.array([np.sin(angles[i]), np.cos(angles[i])])
      return _affine(image, np.eye(2), shift)

    out = _per_image(images, transform)
  elif name == "stripe":
    width = images.shape[-2]
    columns = rng.choice(width, size=min(int(value), width), replace=False)
    out = images.copy()
    out[..., :, columns, :] = 1.0
  else:  # elastic
    height, width = images.shape[-3:-1]
    grid = np.stack(np.meshgrid(np.arange(height), np.arange(width), indexing="ij"), 0)

    def deform(image, i):
      field = rng.standard_normal((2, height, width))
      field = scipy.ndimage.gaussian_filter(field, sigma=(0, side / 8, side / 8))
      field *= value * side / 8 / (np.abs(field).max() + 1e-12)
      coords = grid + field
      return np.stack(
        [
          scipy.ndimage.map_coordinates(image[..., c], coords, order=1, cval=0.0)
          for c in range(image.shape[-1])
        ],
        axis=-1,
      )

    out = _per_image(images, deform)
  return np.clip(out, 0.0, 1.0).astype(np.float32)
