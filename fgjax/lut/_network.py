"""TinyLUT's restoration network in Flax: banks of scalar MLPs that become look-up tables.

Every stage of the network (see `_pipeline`) is a function of one integer in a small range, so
it is a table once trained. In training the network evaluates each MLP on all the integers that
can reach it ("tabulated", a few hundred MLP calls instead of one per pixel) and gathers; the
rounding of each table output, of the channel means and of the requantization is straight-through
(as the authors' `XQuantize`), and the gradient with respect to a gathered index is the MLP's
derivative there, so training sees exactly the function the tables compute. `mode="per_pixel"`
evaluates the MLPs on every pixel instead: the ordinary float network (for latency comparisons).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from fgjax.lut import _pipeline
from fgjax.lut._pipeline import BRANCHES, PIXEL_MAX, PIXEL_MIN, WINDOW, Branch, ste_round

MODES = ("tabulated", "per_pixel")
ALPHA_MIN = 0.05
_OUTPUT_SCALE = 16.0  # MLP outputs are in table units (pixels / 4 for the high part); start small


def bank_mlp(params: dict, x: jax.Array, branch: Branch) -> jax.Array:
  """n independent MLPs 1 -> hidden -> hidden -> out: (n, M) inputs -> (n, M, out) outputs."""
  scaled = (x - (branch.lo + branch.hi) / 2) / branch.size * 2.0  # [lo, hi] -> about [-1, 1]
  h = jax.nn.relu(scaled[..., None] * params["w1"][:, None, :] + params["b1"][:, None, :])
  h = jax.nn.relu(jnp.einsum("nmh,nhk->nmk", h, params["w2"]) + params["b2"][:, None, :])
  return (jnp.einsum("nmh,nhk->nmk", h, params["w3"]) + params["b3"][:, None, :]) * _OUTPUT_SCALE


def _table_entries(raw: jax.Array) -> jax.Array:
  """What a table stores: the MLP output rounded (straight-through) and clipped to int8."""
  return jnp.clip(ste_round(raw), PIXEL_MIN, PIXEL_MAX)


def alphas(raw: jax.Array) -> jax.Array:
  """Learned clipping scales α_c ∈ [0.05, 1] (α ≤ 1 keeps round(α y) inside [lo, hi])."""
  return jnp.clip(raw, ALPHA_MIN, 1.0)


def requantize(y: jax.Array, alpha: jax.Array, branch: Branch) -> jax.Array:
  """`clip(round(α_c y), lo, hi)` per channel (last axis), straight-through."""
  return jnp.clip(ste_round(y * alpha), branch.lo, branch.hi)


@dataclasses.dataclass(frozen=True)
class _FloatLookups:
  """The network's stages as float functions, tabulated or per pixel."""

  params: dict
  mode: str

  def _bank(self, branch, stage, values):
    return bank_mlp(self.params[branch.name][stage], values, branch)

  def _tabulated(self, branch, stage, a):
    """Gather from the MLP on [lo, hi], with the MLP's slope as the gradient of the index."""
    grid = jnp.arange(branch.lo, branch.hi + 1, dtype=jnp.float32)
    n = a.shape[0]
    grid = jnp.broadcast_to(grid, (n, branch.size))
    raw, slope = jax.jvp(lambda g: self._bank(branch, stage, g), (grid,), (jnp.ones_like(grid),))
    table = _table_entries(raw)
    inside = (raw > PIXEL_MIN - 0.5) & (raw < PIXEL_MAX + 0.5)  # clip passes no gradient
    slope = jnp.where(inside, slope, 0.0)
    index = jax.lax.stop_gradient(a - branch.lo).astype(jnp.int32)
    rows = jnp.arange(n)[:, None]
    values = table[rows, index]
    return values + (a - jax.lax.stop_gradient(a))[..., None] * slope[rows, index]

  def _lookup(self, branch, stage, a):
    if self.mode == "per_pixel":
      return _table_entries(self._bank(branch, stage, a))
    return self._tabulated(branch, stage, a)

  def depth(self, branch, taps):
    return self._lookup(branch, "depth", taps)

  def requant(self, branch, stage, y):
    return requantize(y, alphas(self.params[branch.name][f"alpha{stage + 1}"]), branch)

  def point(self, branch, a):
    return self._lookup(branch, "point", a)

  def up(self, branch, a):
    return self._lookup(branch, "up", a)


def _bank_init(rng, n: int, hidden: int, out: int, zero_output: bool) -> dict:
  k1, k2, k3 = jax.random.split(rng, 3)
  he = jax.nn.initializers.he_normal(in_axis=-2, out_axis=-1)
  return {
    "w1": jax.random.normal(k1, (n, hidden)) * 1.5,
    "b1": jax.random.uniform(k2, (n, hidden), minval=-1.0, maxval=1.0),
    "w2": he(k2, (n, hidden, hidden)),
    "b2": jnp.zeros((n, hidden)),
    "w3": jnp.zeros((n, hidden, out)) if zero_output else he(k3, (n, hidden, out)) * 0.1,
    "b3": jnp.zeros((n, out)),
  }


class TinyLUTNet(nn.Module):
  """TinyLUT-style separable restoration network (×s super-resolution, or s = 1 restoration).

  Per H6/L2 branch: 9 depth MLPs (one per 3×3 tap, 1 -> C), C point-wise MLPs (1 -> C), C
  up-sampling MLPs (1 -> s²), two per-channel clipping scales; the dataflow is `_pipeline`'s
  (residuals, learned clipping, rotation ensemble). Every MLP becomes a table with
  `fgjax.lut.convert`; the tables compute exactly what `apply(..., mode="tabulated")` does.

  Paper: Li et al., "TinyLUT: Tiny Look-Up Table for Efficient Image Restoration at the Edge"
  (NeurIPS 2024); rotation ensemble from SR-LUT (Jo & Kim, CVPR 2021) and MuLUT (ECCV 2022).

  Attributes:
    upscale: s, the output is s× larger (1 for denoising).
    channels: C, the channels between stages (the authors use 16).
    hidden: the width of each scalar MLP's two hidden layers (the authors use 64).
    up_residual: add the requantized channels to the up-sampling output (needs C = s²; the
      authors' ×4 design); else the ensemble adds the nearest-upsampled input (`global_residual`).
    global_residual: add the nearest-upsampled input to the rotation-ensemble sum.

  Example:
    >>> net = fgjax.lut.TinyLUTNet(upscale=2)
    >>> params = net.init(jax.random.key(0), lr_pixels)   # int32 (B, H, W) in [-128, 127]
    >>> sr = net.apply(params, lr_pixels)                  # float (B, 2H, 2W), integer-valued
  """

  upscale: int = 2
  channels: int = 8
  hidden: int = 32
  up_residual: bool = False
  global_residual: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, mode: str = "tabulated") -> jax.Array:
    """(B, H, W) integer pixels in [-128, 127] -> (B, sH, sW) float, integer-valued, in range."""
    if mode not in MODES:
      raise ValueError(f"mode: unknown {mode!r}; expected one of {MODES}.")
    if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.integer) or jnp.ndim(x) != 3:
      raise ValueError(
        f"x: expected (B, H, W) integer pixels, got {jnp.asarray(x).dtype}{jnp.shape(x)}."
      )
    if self.up_residual and self.channels != self.upscale**2:
      raise ValueError(
        f"up_residual needs channels == upscale² ({self.upscale**2}), got {self.channels}."
      )
    c, s2, hid = self.channels, self.upscale**2, self.hidden
    params = {}
    for branch in BRANCHES:
      params[branch.name] = {
        "depth": self.param(f"{branch.name}_depth", _bank_init, WINDOW, hid, c, False),
        "point": self.param(f"{branch.name}_point", _bank_init, c, hid, c, True),
        "up": self.param(f"{branch.name}_up", _bank_init, c, hid, s2, True),
        "alpha1": self.param(f"{branch.name}_alpha1", nn.initializers.constant(0.9), (c,)),
        "alpha2": self.param(f"{branch.name}_alpha2", nn.initializers.constant(0.9), (c,)),
      }
    lookups = _FloatLookups(params, mode)
    return _pipeline.rotation_ensemble(
      lookups,
      jnp.asarray(x, jnp.int32),
      self.upscale,
      up_residual=self.up_residual,
      global_residual=self.global_residual,
      cast=lambda t: t.astype(jnp.float32),
    )


def branch_params(variables: dict) -> dict:
  """The network's parameters regrouped as {branch: {depth, point, up, alpha1, alpha2}}."""
  flat = variables["params"]
  return {
    b.name: {k: flat[f"{b.name}_{k}"] for k in ("depth", "point", "up", "alpha1", "alpha2")}
    for b in BRANCHES
  }
