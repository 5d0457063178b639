"""Integer look-up tables of a TinyLUT network: conversion, inference by indexing, storage.

`convert` evaluates each trained scalar MLP on every integer that can reach it and rounds: the
depth tables have 9 × 64 (H6) or 9 × 4 (L2) rows of C entries; a point-wise or up-sampling table
of channel c has only the rows `round(α_c [lo, hi])` that the learned clipping lets through, and
the C tables of a stage are stored one after the other (the authors' ragged layout, so their
`*.npy` files load as they are). `lut_apply` runs the network with gathers, integer adds, shifts
and clips only: no multiplication, no float (checked in the tests on its jaxpr).
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fgjax.lut import _network, _pipeline
from fgjax.lut._pipeline import BRANCHES, PIXEL_MAX, PIXEL_MIN, WINDOW, Branch

STAGES = ("depth", "point", "up")


@flax.struct.dataclass
class TinyLUT:
  """A TinyLUT network as tables.

  Attributes:
    tables: `{"high"|"low": {"depth": int8 (9, R, C), "point": int8 (rows₁, C),
      "up": int8 (rows₂, s²)}}`, R = 64 (H6) or 4 (L2); the trainable entries.
    requant: `{"high"|"low": int8 (2, C, R)}`: `clip(round(α_c v), lo, hi)` for v in [lo, hi],
      the learned clipping after the depth (0) and point-wise (1) stage, as tables.
    segments: `{"high"|"low": int32 (2, C, 2)}`: for the point-wise (0) and up-sampling (1)
      tables, the value of channel c's first row and its number of rows, `round(α_c [lo, hi])`
      before clipping (the authors' layout; equal to the range of `requant` when α ≤ 1).
    upscale: s (1 for denoising).
    up_residual: the authors' residual of the requantized channels in the up-sampling stage.
    global_residual: add the nearest-upsampled input to the rotation-ensemble sum.
  """

  tables: dict
  requant: dict
  segments: dict
  upscale: int = flax.struct.field(pytree_node=False, default=2)
  up_residual: bool = flax.struct.field(pytree_node=False, default=False)
  global_residual: bool = flax.struct.field(pytree_node=False, default=True)


def segments_of(rounded: np.ndarray) -> np.ndarray:
  """(…, C, R) values `round(α_c v)` -> (…, C, 2) int32 `[first row's value, number of rows]`."""
  q = np.asarray(rounded).astype(np.int64)
  return np.stack([q.min(-1), q.max(-1) - q.min(-1) + 1], -1).astype(np.int32)


def segment_rows(lut: TinyLUT, branch: str, stage: int) -> np.ndarray:
  """Rows of each channel's point-wise (stage 0) or up-sampling (1) table, shape (C,)."""
  return np.asarray(lut.segments[branch][stage][:, 1]).astype(np.int64)


def _requant_table(alpha: np.ndarray, branch: Branch) -> np.ndarray:
  values = np.arange(branch.lo, branch.hi + 1, dtype=np.float32)
  q = np.round(np.float32(alpha)[:, None] * values[None, :])  # half to even, as torch.round
  return np.clip(q, branch.lo, branch.hi).astype(np.int8)


def convert(variables: dict, net: _network.TinyLUTNet) -> TinyLUT:
  """Turns a trained `TinyLUTNet` into integer tables that compute its forward exactly.

  Each table entry is `clip(round(f(v)), -128, 127)` for the stage's MLP `f` at every integer `v`
  that can reach it, so `|entry − f(v)| ≤ 1/2` wherever f is in range (the discretization error
  of the entries); the H6/L2 split itself is exact (`x = 4h + l`), so no index is rounded.

  Args:
    variables: the network's variables (`net.init(...)` after training).
    net: the `TinyLUTNet` they belong to.

  Returns:
    A `TinyLUT` with `lut_apply(lut, x) == net.apply(variables, x)` (tabulated mode) exactly.

  Example:
    >>> lut = fgjax.lut.convert(variables, net)
    >>> sr = fgjax.lut.lut_apply(lut, lr_pixels)
  """
  params = _network.branch_params(variables)
  tables, requant, segments = {}, {}, {}
  for branch in BRANCHES:
    p = params[branch.name]
    q = np.stack(
      [_requant_table(np.asarray(_network.alphas(p[f"alpha{i}"])), branch) for i in (1, 2)]
    )
    requant[branch.name] = q
    segments[branch.name] = segments_of(q)  # α ≤ 1: nothing is clipped
    grid = jnp.arange(branch.lo, branch.hi + 1, dtype=jnp.float32)

    def entries(stage, inputs, p=p, branch=branch):
      raw = _network.bank_mlp(p[stage], jnp.asarray(inputs, jnp.float32), branch)
      return np.asarray(_network._table_entries(raw)).astype(np.int8)

    depth = entries("depth", jnp.broadcast_to(grid, (WINDOW, branch.size)))
    ragged = {}
    for stage, q_stage in (("point", q[0]), ("up", q[1])):
      full = entries(stage, jnp.broadcast_to(grid, (q_stage.shape[0], branch.size)))
      rows = [
        full[c, q_stage[c].min() - branch.lo : q_stage[c].max() - branch.lo + 1]
        for c in range(q_stage.shape[0])
      ]
      ragged[stage] = np.concatenate(rows, 0)
    tables[branch.name] = {"depth": depth, "point": ragged["point"], "up": ragged["up"]}
  tables = jax.tree.map(jnp.asarray, tables)
  requant = jax.tree.map(jnp.asarray, requant)
  segments = jax.tree.map(jnp.asarray, segments)
  return TinyLUT(tables, requant, segments, net.upscale, net.up_residual, net.global_residual)


class _IntegerLookups:
  """Gathers from the tables; every value an integer."""

  def __init__(self, lut: TinyLUT):
    self.lut = lut

  def depth(self, branch, taps):
    table = self.lut.tables[branch.name]["depth"]
    return table[jnp.arange(WINDOW)[:, None], taps - branch.lo].astype(jnp.int32)

  def requant(self, branch, stage, y):
    q = self.lut.requant[branch.name][stage]  # (C, R)
    return q[jnp.arange(q.shape[0])[None, :], y - branch.lo].astype(jnp.int32)

  def _ragged(self, branch, stage, a):
    segments = self.lut.segments[branch.name][0 if stage == "point" else 1]
    low, sizes = segments[:, 0], segments[:, 1]
    starts = jnp.cumsum(sizes) - sizes  # where channel c's rows begin
    rows = starts[:, None] + a - low[:, None]
    return self.lut.tables[branch.name][stage][rows].astype(jnp.int32)

  def point(self, branch, a):
    return self._ragged(branch, "point", a)

  def up(self, branch, a):
    return self._ragged(branch, "up", a)


def lut_apply(lut: TinyLUT, x: jax.Array, *, ensemble: bool = True) -> jax.Array:
  """TinyLUT inference by table look-ups: integer pixels in, integer pixels out.

  Per branch and rotation: 9 gathers and a rounded mean (depth), a requantization gather, C
  gathers and a rounded mean (point-wise), again (up-sampling); integer adds, shifts and clips
  between them. The only arithmetic is on int32.

  Args:
    lut: the tables (`convert`, `load_authors_tables`).
    x: (B, H, W) or (H, W) integer pixels in [-128, 127] (an 8-bit image minus 128).
    ensemble: sum over the 4 rotations (SR-LUT / MuLUT); False runs one orientation.

  Returns:
    int32 (B, sH, sW) (or (sH, sW)) in [-128, 127].
  """
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer) or x.ndim not in (2, 3):
    raise ValueError(f"x: expected (B, H, W) or (H, W) integer pixels, got {x.dtype}{x.shape}.")
  squeeze = x.ndim == 2
  x = (x[None] if squeeze else x).astype(jnp.int32)
  lookups = _IntegerLookups(lut)
  if ensemble:
    out = _pipeline.rotation_ensemble(
      lookups, x, lut.upscale, up_residual=lut.up_residual, global_residual=lut.global_residual
    )
  else:
    out = _pipeline.single_rotation(lookups, x, lut.upscale, lut.up_residual)
    if lut.global_residual:
      out = jnp.clip(out + _pipeline.nearest_upsample(x, lut.upscale), PIXEL_MIN, PIXEL_MAX)
  return out[0] if squeeze else out


def table_bytes(lut: TinyLUT, *, include_requant: bool = True) -> int:
  """Bytes of the tables (int8 entries): the formula, checked against the arrays in the tests.

  .. math:: \\sum_{b \\in \\{H6, L2\\}} \\Big(9 R_b C + \\sum_c n^{(1)}_{b,c} C
     + \\sum_c n^{(2)}_{b,c} s^2\\Big) \\;[+\\; 2 C R_b \\text{ requantization entries}]

  with `R_b` = 64 or 4 and `n_{b,c} = max round(α_c v) − min round(α_c v) + 1` (≤ R_b).
  """
  total = 0
  s2 = lut.upscale**2
  for branch in BRANCHES:
    channels = np.shape(lut.requant[branch.name])[1]
    total += WINDOW * branch.size * channels
    total += int(segment_rows(lut, branch.name, 0).sum()) * channels
    total += int(segment_rows(lut, branch.name, 1).sum()) * s2
    if include_requant:
      total += 2 * channels * branch.size
  return total


def naive_lut_bytes(
  receptive_pixels: int, upscale: int, *, bits: int = 8, sampling_bits: int | None = None
) -> int:
  """Bytes of one non-separable LUT indexed by `receptive_pixels` pixels (int8 entries, s² each).

  Full precision: `(2^bits)^n s²`; SR-LUT / MuLUT sample each input at `sampling_bits` and
  interpolate: `(2^sampling_bits + 1)^n s²` (SR-LUT's 4-D table at 4 bits: 17⁴ s²).
  """
  levels = 2**bits if sampling_bits is None else 2**sampling_bits + 1
  return int(math.prod([levels] * receptive_pixels)) * upscale**2


def float_network_bytes(variables: dict) -> int:
  """float32 bytes of a network's parameters."""
  return 4 * sum(int(np.size(leaf)) for leaf in jax.tree.leaves(variables))
