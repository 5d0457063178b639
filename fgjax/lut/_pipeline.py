"""The integer dataflow of a TinyLUT network, shared by the Flax network and its tables.

TinyLUT (Li et al., "TinyLUT: Tiny Look-Up Table for Efficient Image Restoration at the Edge",
NeurIPS 2024) evaluates a restoration network as a chain of single-input tables. An 8-bit pixel
`x ∈ [-128, 127]` is split (the "dynamic discretization") into its high 6 bits
`h = ⌊x / 4⌋ ∈ [-32, 31]` and low 2 bits `l = x mod 4 ∈ [0, 3]`, so `x = 4h + l` exactly and a
table indexed by `h` has 64 rows instead of 256 (no 4-bit sampling, no interpolation). Each part
runs through its own branch of three stages:

1. depth (separable mapping of a 3×3 window): 9 tables, one per window position p, map the pixel
   at p to C channels; `d = round(Σ_p T_p[v_p] / 9)`, `y₁ = clip(d + v, lo, hi)` (residual);
2. requantize (learned clipping): `a₁ = clip(round(α_c y₁), lo, hi)` per channel, a table too,
   which shrinks the next tables to the `round(α_c [lo, hi])` rows that can occur;
   point-wise: C tables, one per input channel, map `a₁_c` to C channels,
   `y₂ = clip(round(Σ_c P_c[a₁_c] / C) + a₁, lo, hi)`, then `a₂ = clip(round(α'_c y₂), lo, hi)`;
3. up-sampling: C tables map `a₂_c` to s² sub-pixels, `u = round(Σ_c U_c[a₂_c] / C)`
   (+ `a₂` when C = s², the authors' residual).

The branch outputs add, `o = clip(u_high + u_low, -128, 127)`, and a pixel shuffle makes the
s×-larger image. The window reads the pixel and its 8 neighbours above and to the left (reflect
padding on those sides); the rotation ensemble of SR-LUT / MuLUT (Jo & Kim 2021; Li et al. 2022)
sums the network over the four rotations of the input, so the receptive field is 5×5.

`Lookups` abstracts the tables: the Flax network supplies float lookups (the MLPs evaluated on
every integer input, with straight-through rounding) and `lut_apply` integer gathers. Both run
this same code, so the converted tables reproduce the network's forward exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp

PIXEL_MIN, PIXEL_MAX = -128, 127


@dataclasses.dataclass(frozen=True)
class Branch:
  """One part of the dynamic discretization: its name and integer range [lo, hi]."""

  name: str
  lo: int
  hi: int

  @property
  def size(self) -> int:
    return self.hi - self.lo + 1


HIGH = Branch("high", -32, 31)  # H6: the high 6 bits, ⌊x / 4⌋
LOW = Branch("low", 0, 3)  # L2: the low 2 bits, x mod 4
BRANCHES = (HIGH, LOW)
WINDOW = 9  # 3×3 depth taps


def split_high_low(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """H6/L2 split of integer pixels in [-128, 127]: `(⌊x / 4⌋, x mod 4)`, so `x = 4h + l`."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"x: the H6/L2 split needs integer pixels, got {x.dtype}.")
  x = x.astype(jnp.int32)
  return jnp.right_shift(x, 2), jnp.bitwise_and(x, 3)


def recombine_high_low(high: jax.Array, low: jax.Array) -> jax.Array:
  """Inverse of `split_high_low`: `4h + l`."""
  return jnp.left_shift(jnp.asarray(high, jnp.int32), 2) + jnp.asarray(low, jnp.int32)


def ste_round(x: jax.Array) -> jax.Array:
  """Round half to even in the forward pass, identity in the backward pass (straight-through)."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def round_div(total: jax.Array, n: int) -> jax.Array:
  """`round(total / n)`, ties to even: integer arithmetic for integers, straight-through for floats.

  Both forms give the same integers (for n = 9 no tie exists; for powers of two `total / n` is
  exact in float32), so the network and its tables agree bit for bit.
  """
  if jnp.issubdtype(total.dtype, jnp.integer):
    quotient = jnp.floor_divide(total, n)
    twice_rest = 2 * (total - quotient * n)
    up = (twice_rest > n) | ((twice_rest == n) & (jnp.bitwise_and(quotient, 1) == 1))
    return quotient + up.astype(total.dtype)
  return ste_round(total / n)


class Lookups(Protocol):
  """The four table kinds of a branch; `values` are integer-valued (ints or floats)."""

  def depth(self, branch: Branch, taps: jax.Array) -> jax.Array:
    """(9, M) window values in [lo, hi] -> (9, M, C) outputs in [-128, 127]."""

  def requant(self, branch: Branch, stage: int, y: jax.Array) -> jax.Array:
    """(M, C) values in [lo, hi] -> (M, C), `clip(round(α_c y), lo, hi)` (stage 0 or 1)."""

  def point(self, branch: Branch, a: jax.Array) -> jax.Array:
    """(C, M) requantized values -> (C, M, C) point-wise outputs."""

  def up(self, branch: Branch, a: jax.Array) -> jax.Array:
    """(C, M) requantized values -> (C, M, s²) sub-pixel outputs."""


def _window_taps(v: jax.Array) -> jax.Array:
  """(B, H, W) -> (9, B·H·W): each pixel's 3×3 window above-left of it (reflect-padded)."""
  b, h, w = v.shape
  padded = jnp.pad(v, ((0, 0), (2, 0), (2, 0)), mode="reflect")
  taps = [padded[:, i : i + h, j : j + w] for i in range(3) for j in range(3)]
  return jnp.stack(taps).reshape(WINDOW, b * h * w)


def run_branch(lookups: Lookups, branch: Branch, v: jax.Array, up_residual: bool) -> jax.Array:
  """One branch on (B, H, W) values in [lo, hi]; returns (B, H, W, s²) in [-128, 127]."""
  b, h, w = v.shape
  clip = jnp.clip
  depth = lookups.depth(branch, _window_taps(v))  # (9, M, C)
  d = clip(round_div(depth.sum(0), WINDOW), PIXEL_MIN, PIXEL_MAX)
  y1 = clip(d + v.reshape(-1, 1), branch.lo, branch.hi)  # residual: the window's own pixel
  a1 = lookups.requant(branch, 0, y1)  # (M, C)
  point = lookups.point(branch, a1.T)  # (C, M, C)
  channels = point.shape[0]
  p = clip(round_div(point.sum(0), channels), PIXEL_MIN, PIXEL_MAX)
  y2 = clip(p + a1, branch.lo, branch.hi)
  a2 = lookups.requant(branch, 1, y2)
  up = lookups.up(branch, a2.T)  # (C, M, s²)
  u = clip(round_div(up.sum(0), channels), PIXEL_MIN, PIXEL_MAX)
  if up_residual:
    u = clip(u + a2, PIXEL_MIN, PIXEL_MAX)
  return u.reshape(b, h, w, -1)


def pixel_shuffle(o: jax.Array, upscale: int) -> jax.Array:
  """(B, H, W, s²) -> (B, sH, sW), sub-pixel k = i·s + j at (s·y + i, s·x + j) (torch order)."""
  b, h, w, _ = o.shape
  o = o.reshape(b, h, w, upscale, upscale).transpose(0, 1, 3, 2, 4)
  return o.reshape(b, h * upscale, w * upscale)


def single_rotation(
  lookups: Lookups, x: jax.Array, upscale: int, up_residual: bool, cast=lambda t: t
) -> jax.Array:
  """The network on one orientation: (B, H, W) integer pixels -> (B, sH, sW) in [-128, 127]."""
  high, low = split_high_low(x)
  u_high = run_branch(lookups, HIGH, cast(high), up_residual)
  u_low = run_branch(lookups, LOW, cast(low), up_residual)
  return pixel_shuffle(jnp.clip(u_high + u_low, PIXEL_MIN, PIXEL_MAX), upscale)


def nearest_upsample(x: jax.Array, upscale: int) -> jax.Array:
  """(B, H, W) -> (B, sH, sW) by repeating each pixel."""
  return jnp.repeat(jnp.repeat(x, upscale, axis=1), upscale, axis=2)


def rotation_ensemble(
  lookups: Lookups,
  x: jax.Array,
  upscale: int,
  *,
  up_residual: bool,
  global_residual: bool,
  cast=lambda t: t,
) -> jax.Array:
  """Σ over the 4 rotations k of rot⁻ᵏ(net(rotᵏ x)), + the nearest-upsampled input if asked.

  As in the authors' test code the four outputs add (no averaging) and the sum is clipped to
  [-128, 127]; with `global_residual` each rotation learns a correction to the input.
  """
  total = 0
  for k in range(4):
    rotated = jnp.rot90(x, k, axes=(1, 2))
    out = single_rotation(lookups, rotated, upscale, up_residual, cast)
    total = total + jnp.rot90(out, -k, axes=(1, 2))
  if global_residual:
    total = total + cast(nearest_upsample(x.astype(jnp.int32), upscale))
  return jnp.clip(total, PIXEL_MIN, PIXEL_MAX)
