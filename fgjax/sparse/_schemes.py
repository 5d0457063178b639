"""Sparsity schemes: how a weight leaf is cut into the units a mask switches on and off.

A mask is kept per unit, not per element, so a structured scheme costs one bool per unit:
- "unstructured": every element is a unit (the highest accuracy at a given density, the hardest to
  speed up on real devices).
- "block": the kernel seen as a matrix (fan-in, out), cut into `block_shape` tiles (edge tiles are
  smaller); a dense tile is a small dense matmul, which vector units run at full speed (MEST's
  block-based sparsity; Yuan et al., NeurIPS 2021, Sec. 4.4).
- "channel": one unit per output channel (the last axis of a Flax kernel); a pruned channel is a
  narrower layer, which any device runs faster.

The importance of a unit is the sum of its elements' importance.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

SCHEMES = ("unstructured", "block", "channel")


@dataclasses.dataclass(frozen=True)
class UnitView:
  """How one leaf of shape `shape` maps to its units (static: built from shapes only)."""

  shape: tuple[int, ...]
  scheme: str
  block_shape: tuple[int, int] = (4, 4)

  @property
  def _matrix(self) -> tuple[int, int]:
    return math.prod(self.shape[:-1]), self.shape[-1]

  @property
  def unit_shape(self) -> tuple[int, ...]:
    if self.scheme == "unstructured":
      return self.shape
    if self.scheme == "channel":
      return (self.shape[-1],)
    rows, cols = self._matrix
    block_rows, block_cols = self.block_shape
    return (-(-rows // block_rows), -(-cols // block_cols))

  @property
  def num_units(self) -> int:
    return math.prod(self.unit_shape)

  def reduce(self, score: jnp.ndarray) -> jnp.ndarray:
    """Per-element scores (leaf shape) -> per-unit sums (unit shape)."""
    if self.scheme == "unstructured":
      return score
    if self.scheme == "channel":
      return jnp.sum(score.reshape(-1, self.shape[-1]), axis=0)
    rows, cols = self._matrix
    block_rows, block_cols = self.block_shape
    unit_rows, unit_cols = self.unit_shape
    padded = jnp.pad(
      score.reshape(rows, cols),
      ((0, unit_rows * block_rows - rows), (0, unit_cols * block_cols - cols)),
    )
    return padded.reshape(unit_rows, block_rows, unit_cols, block_cols).sum(axis=(1, 3))

  def expand(self, unit_mask: jnp.ndarray) -> jnp.ndarray:
    """Per-unit mask (unit shape) -> per-element mask (leaf shape)."""
    if self.scheme == "unstructured":
      return unit_mask
    if self.scheme == "channel":
      return jnp.broadcast_to(unit_mask, self.shape)
    rows, cols = self._matrix
    block_rows, block_cols = self.block_shape
    tiled = jnp.repeat(jnp.repeat(unit_mask, block_rows, axis=0), block_cols, axis=1)
    return tiled[:rows, :cols].reshape(self.shape)

  def unit_sizes(self) -> np.ndarray:
    """Elements per unit (edge blocks hold fewer), as a NumPy array of the unit shape."""
    return np.asarray(self.reduce(jnp.ones(self.shape, jnp.float32))).astype(np.int64)


def check_scheme(scheme: str, block_shape) -> tuple[int, int]:
  if scheme not in SCHEMES:
    raise ValueError(f"scheme: unknown {scheme!r}; expected one of {SCHEMES}.")
  block_shape = tuple(block_shape)
  if len(block_shape) != 2 or not all(isinstance(b, int) and b >= 1 for b in block_shape):
    raise ValueError(f"block_shape: expected two integers >= 1, got {block_shape!r}.")
  return block_shape
