"""Random directions for forward-gradient estimators, regenerated from keys, never stored.

Both distributions have zero mean and identity covariance, E[z zᵀ] = I, so for any direction-wise
exact derivative d = ∇L·z, E[d z] = ∇L: the estimate is unbiased.
- "normal": z ~ N(0, I).
- "rademacher": each z_i = ±1 with probability 1/2 (cheaper, and on the integer grid when ε is an
  integer number of quantization steps).

Integer leaves (fixed-point weights `w = s q`, `s` the leaf's grid step from `leaf_scales`) are
perturbed on their grid: ε is in weight units, as for float leaves, and the move is
round(ε z / s) grid steps, added with saturation at the dtype's symmetric bounds (±7 for int4,
±127 for int8, ±32767 for int16; never wrap-around).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from fgjax import _masks
from fgjax.quant._integer import saturating_add

DISTRIBUTIONS = ("normal", "rademacher")


def check_distribution(distribution: str) -> None:
  if distribution not in DISTRIBUTIONS:
    raise ValueError(f"distribution: unknown {distribution!r}; expected one of {DISTRIBUTIONS}.")


def is_integer(leaf) -> bool:
  return jnp.issubdtype(jnp.result_type(leaf), jnp.integer)


def _mix32(x: jax.Array) -> jax.Array:
  # A bijective 32-bit integer hash (xorshift-multiply, "lowbias32" family); good avalanche.
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x21F0AAAD)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x735A2D97)
  return x ^ (x >> 15)


def random_bits(key: jax.Array, shape: tuple[int, ...], stream: int = 0) -> jax.Array:
  """Counter-based random uint32 bits: keyed hash rounds over each element's index.

  Unlike `jax.random` on CPU (a rolled threefry loop holding two uint32 buffers of the output's
  size), this is a few elementwise integer ops, so XLA fuses it into whatever consumes it: the
  perturbed weight `w + ε z` is computed in one pass with no temporary the size of the weights.
  `stream` (the leaf's index) is hashed into the key words with the same integer ops rather than
  `jax.random.fold_in`, whose threefry loop per leaf made compilation slow for models with
  hundreds of leaves. Statistical quality is ample for perturbation directions (tested: moments,
  cross-key and cross-leaf correlation); it is not meant for cryptography.
  """
  words = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)
  salt = jnp.uint32((stream * 0x9E3779B9 + 0x7F4A7C15) & 0xFFFFFFFF)
  size = math.prod(shape)
  # The flat index, built from a column and a row counter joined through the key: inside a loop
  # over directions XLA would otherwise hoist a full-size counter out as a loop invariant (a
  # uint32 buffer the size of the leaf, alive during the whole loop).
  last = shape[-1] if len(shape) else 1
  rows = jax.lax.broadcasted_iota(jnp.uint32, (size // max(last, 1), 1), 0) * jnp.uint32(last)
  columns = jax.lax.broadcasted_iota(jnp.uint32, (1, last), 1)
  x = ((rows ^ _key_zero(key)) + columns).reshape(shape)
  for word in range(words.shape[0]):  # threefry keys have two words, rbg keys four
    x = _mix32(x ^ _mix32(words[word] ^ salt))
  return x


def _key_zero(key: jax.Array) -> jax.Array:
  """A uint32 zero that XLA cannot prove is zero and that depends on `key` (a NaN test on it)."""
  word = jax.random.key_data(key).reshape(-1)[0]
  as_float = word.astype(jnp.float32)
  return (as_float != as_float).astype(jnp.uint32)


def tie(key: jax.Array, values) -> jax.Array:
  """The same key, made to depend on `values` so that what it seeds runs after they exist.

  XLA drops `optimization_barrier`s on some backends, so the dependency is a real one: a bit that
  is set only if the first element of a float value is NaN is xor-ed into the key. XLA cannot fold
  `v != v` for floats, so the perturbation drawn from the key waits for `values`; the key stays
  the same unless the value is NaN (and then the loss is NaN anyway).
  """
  for value in jax.tree.leaves(values):
    if jnp.issubdtype(jnp.result_type(value), jnp.floating) and jnp.size(value) > 0:
      first = jnp.ravel(value)[0]
      flag = (first != first).astype(jnp.uint32)
      data = jax.random.key_data(key)
      return jax.random.wrap_key_data(data ^ flag, impl=jax.random.key_impl(key))
  return key


def direction(key: jax.Array, leaf_index: int, leaf: jax.Array, distribution: str) -> jax.Array:
  """The direction for one leaf: float32 for integer leaves, else the leaf's dtype.

  normal: Box-Muller on two 24-bit uniforms; rademacher: the top bit of the hash.
  """
  dtype = jnp.float32 if is_integer(leaf) else jnp.result_type(leaf)
  shape = jnp.shape(leaf)
  bits = random_bits(key, shape, stream=leaf_index)
  if distribution == "rademacher":
    return jnp.where(bits >> 31 == 1, 1.0, -1.0).astype(dtype)
  other = _mix32(bits ^ jnp.uint32(0x9E3779B9))
  u1 = ((bits >> 8).astype(jnp.float32) + 0.5) * (2.0**-24)  # in (0, 1): log is finite
  u2 = (other >> 8).astype(jnp.float32) * (2.0**-24)
  z = jnp.sqrt(-2.0 * jnp.log(u1)) * _cos_2pi(u2)
  return z.astype(dtype)


def _cos_2pi(u: jax.Array) -> jax.Array:
  """cos(2πu) for u in [0, 1), by symmetry onto [0, π/2] and a Taylor polynomial (error < 1e-6).

  XLA:CPU's general `cos` (full range reduction) was 7x the cost of everything else in drawing a
  normal direction; u is already reduced, so a short polynomial does.
  """
  a = jnp.abs(u - 0.5)  # cos(2πu) = -cos(2πa), a in [0, 0.5]
  flip = a > 0.25  # cos(2πa) = -cos(2π(0.5 - a))
  r = (2.0 * jnp.pi) * jnp.where(flip, 0.5 - a, a)  # in [0, π/2]
  t = r * r
  c = 1.0 + t * (
    -1 / 2 + t * (1 / 24 + t * (-1 / 720 + t * (1 / 40320 + t * (-1 / 3628800 + t / 479001600))))
  )
  return jnp.where(flip, c, -c)


def grid_step(z: jax.Array, epsilon, grid_scale) -> jax.Array:
  """The move of an integer leaf for a direction z, in grid steps: round(ε z / s) (int32)."""
  return jnp.round(epsilon * z / grid_scale).astype(jnp.int32)


def effective_direction(
  leaf: jax.Array, z: jax.Array, epsilon, grid_scale=None, central: bool = True
) -> jax.Array:
  """The direction the two evaluation points really differ by, divided by (2)ε, in weight units.

  For a float leaf this is z. An integer leaf moves by r = round(ε z / s) steps, clipped at its
  bounds, so the credited direction is the move actually made (after rounding and saturation):
  central, s (sat(q + r) − sat(q − r)) / (2ε); one-sided, s (sat(q + r) − q) / ε. Then
  d = (L₊ − L₋) / (2ε) ≈ ∇L·direction, to first order, whatever rounding did.
  """
  if not is_integer(leaf):
    return z
  r = grid_step(z, epsilon, grid_scale)
  up = saturating_add(leaf, r).astype(jnp.int32)
  if central:
    down = saturating_add(leaf, -r).astype(jnp.int32)
    return (up - down).astype(jnp.float32) * (grid_scale / (2.0 * epsilon))
  return (up - leaf.astype(jnp.int32)).astype(jnp.float32) * (grid_scale / epsilon)


def perturb_leaf(
  index: int, leaf: jax.Array, key: jax.Array, scale, distribution: str, grid_scale=None
) -> jax.Array:
  """leaf moved by scale · z(key, index): on the grid (step `grid_scale`) for integer leaves."""
  z = direction(key, index, leaf, distribution)
  if is_integer(leaf):
    # Tied to the key: the int32 widening inside `saturating_add` is then not a loop invariant
    # that XLA would hoist out of a loop over directions (4 bytes per weight, kept all along).
    leaf = leaf ^ _key_zero(key).astype(leaf.dtype)
    return saturating_add(leaf, grid_step(z, scale, grid_scale))
  return leaf + (scale * z).astype(leaf.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def with_tangent(leaf: jax.Array, t: jax.Array, key: jax.Array, index: int, distribution: str):
  """Returns `leaf` unchanged; its derivative with respect to the scalar `t` is z(key, index).

  So `jax.jvp(lambda t: L(with_tangent(w, t, ...)), (0.,), (1.,))` is (L(w), ∇L·z), with z drawn
  where the layer reads it and never as a tree of tangents.
  """
  del t, key
  return leaf


@with_tangent.defjvp
def _with_tangent_jvp(index, distribution, primals, tangents):
  leaf, _, key = primals
  _, t_dot, _ = tangents
  z = direction(key, index, leaf, distribution)
  return leaf, (t_dot * z).astype(z.dtype)


def sample_directions(
  key: jax.Array, params, num_directions: int = 1, distribution: str = "normal", mask=None
) -> list:
  """The K direction trees an estimator called with `key` uses (exact zeros outside the mask).

  For inspection and tests: estimators never build these trees, they draw each leaf where it is
  read. `directions[k]` pairs with `metrics["directional_derivatives"][k]`.
  """
  check_distribution(distribution)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  trainable = _masks.resolve_mask(mask, params)
  out = []
  for k in jax.random.split(key, num_directions):
    tree = [
      direction(k, i, leaf, distribution) if on else jnp.zeros(jnp.shape(leaf), jnp.float32)
      for i, (leaf, on) in enumerate(zip(leaves, trainable, strict=True))
    ]
    out.append(jax.tree_util.tree_unflatten(treedef, tree))
  return out
