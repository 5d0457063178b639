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

import jax
import jax.numpy as jnp
import numpy as np

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


def leaf_seeds(key: jax.Array, streams) -> jax.Array:
  """The uint32 seeds of the leaves `streams` (their indices): the key's words and each index,
  hashed together, for all leaves in one vectorized computation (once per key and pass).

  `random_bits` spends one hash round per element on top of a seed. Hashing the stream in with
  integer ops (not `jax.random.fold_in`, a threefry loop per leaf) keeps compilation fast for
  models with hundreds of leaves.
  """
  words = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)
  salts = [(int(stream) * 0x9E3779B9 + 0x7F4A7C15) & 0xFFFFFFFF for stream in streams]
  seeds = jnp.asarray(np.asarray(salts, np.uint32))
  for word in range(words.shape[0]):  # threefry keys have two words, rbg keys four
    seeds = _mix32(seeds ^ words[word])
  # Computed once, not fused into (and compiled again in) every leaf's draw.
  return jax.lax.optimization_barrier(seeds)


def leaf_seed(key: jax.Array, stream: int = 0) -> jax.Array:
  """The seed of one leaf's stream: `leaf_seeds(key, [stream])[0]`."""
  return leaf_seeds(key, [stream])[0]


def random_bits(key: jax.Array, shape: tuple[int, ...], stream: int = 0) -> jax.Array:
  """Counter-based random uint32 bits: one keyed hash round over each element's index.

  Unlike `jax.random` on CPU (a rolled threefry loop holding two uint32 buffers of the output's
  size), this is a few elementwise integer ops, so XLA fuses it into whatever consumes it: the
  perturbed weight `w + ε z` is computed in one pass with no temporary the size of the weights.
  Per element it is one xor and one bijective mix of the index with the leaf's seed
  (`leaf_seeds`): few operations, so the step compiles fast and the draw costs little beside the
  layer (issue 15). Statistical quality is ample for perturbation directions (tested: moments,
  cross-key and cross-leaf correlation); it is not meant for cryptography.
  """
  # The key's unfoldable zero keeps the index inside a loop over directions (see element_index).
  return bits_from_seed(leaf_seed(key, stream), shape, _key_zero(key))


def bits_from_seed(seed: jax.Array, shape: tuple[int, ...], flag=None) -> jax.Array:
  """`random_bits` from a leaf's seed; `flag`: see `element_index`."""
  return _mix32(element_index(shape, flag) ^ seed)


def element_index(shape: tuple[int, ...], flag=None) -> jax.Array:
  """Each element's row-major flat index (uint32, modulo 2³²), as Σ_d iota_d · stride_d.

  The same values as `iota(size).reshape(shape)`, but built from one iota per dimension of the
  leaf's own shape: XLA:CPU then computes the index inside the fusion that consumes it, where the
  reshape of a flat iota made it write a uint32 buffer the size of the leaf first (issue 15).

  `flag`, a uint32 scalar that is 0 at run time but unknown to XLA (a `tie` flag), is added to the
  last dimension's iota, the first term of the sum: inside a loop (the ±ε scan, directions one at
  a time) every partial sum then depends on the iteration, so XLA's loop-invariant code motion
  cannot hoist any of them out of the loop and carry it as a uint32 buffer the size of the leaf
  (with the flag on the first dimension, added last, ResNet-18's SPSA step held 17 MiB of such
  partial sums).
  """
  shape = tuple(shape)
  if not shape:
    return jnp.zeros((), jnp.uint32) if flag is None else flag.astype(jnp.uint32)
  index = None
  stride = 1
  for dim in reversed(range(len(shape))):
    term = jax.lax.broadcasted_iota(jnp.uint32, shape, dim)
    if dim == len(shape) - 1 and flag is not None:
      term = term + flag.astype(jnp.uint32)
    if stride != 1:
      term = term * jnp.uint32(stride & 0xFFFFFFFF)
    index = term if index is None else index + term
    stride *= shape[dim]
  return index


def _key_zero(key: jax.Array) -> jax.Array:
  """A uint32 zero that XLA cannot prove is zero and that depends on `key` (a NaN test on it)."""
  word = jax.random.key_data(key).reshape(-1)[0]
  as_float = word.astype(jnp.float32)
  return (as_float != as_float).astype(jnp.uint32)


def tie(key: jax.Array, values) -> jax.Array:
  """The same key, made to depend on `values` so that what it seeds runs after they exist.

  XLA drops `optimization_barrier`s on some backends, so the dependency is a real one: a bit that
  is set only if the first element of a float value is NaN is xor-ed into the key (one bit for
  all the float values given, so the key waits for every one of them). XLA cannot fold
  `v != v` for floats, so the perturbation drawn from the key waits for `values`; the key stays
  the same unless the value is NaN (and then the loss is NaN anyway).
  """
  flag = _nan_flag(values)
  if flag is None:
    return key
  data = jax.random.key_data(key)
  return jax.random.wrap_key_data(data ^ flag, impl=jax.random.key_impl(key))


def tie_seed(seed: jax.Array, values) -> tuple[jax.Array, jax.Array]:
  """`tie` for a leaf's seed: (the same seed, computed after `values` exist; a flag that is 0).

  Pass the flag on to `direction_from_seed`, so the draw's element index depends on it too. The
  flag also depends on the seed itself (`(seed | 1) == 0`, never true, which XLA does not fold):
  when `values` are the same in every iteration of a loop (a model's input, in the ±ε scan), the
  seed still differs, so nothing of the draw is loop-invariant.
  """
  flag = ((seed | jnp.uint32(1)) == 0).astype(jnp.uint32)
  nan = _nan_flag(values)
  if nan is not None:
    flag = flag | nan
  return seed ^ flag, flag


def materialized(fn, flag: jax.Array) -> jax.Array:
  """`fn(flag)` computed into a buffer of its own, inside a loop of one iteration.

  `flag` is a uint32 zero that XLA cannot fold (`tie_seed`). XLA fuses a cheap elementwise
  producer into every consumer, even one that broadcasts it: a bias's perturbed value, drawn
  from its hash, would be recomputed for each element of the activation it is added to (on
  SmallCNN the draw ran 64 x 28 x 28 times per bias element, and the activation it broadcasts
  into got a buffer of its own). A loop whose trip count (1 + flag) XLA does not know is never
  fused or unrolled, and its body's value depends on the loop counter (passed to `fn` as the
  flag), so it cannot be hoisted out either.
  """
  flag = flag.astype(jnp.uint32)
  shape = jax.eval_shape(fn, flag)
  init = (jnp.uint32(0), jnp.zeros(shape.shape, shape.dtype))

  def body(carry):
    count, _ = carry
    return count + jnp.uint32(1), fn(count ^ flag)

  return jax.lax.while_loop(lambda carry: carry[0] < flag + jnp.uint32(1), body, init)[1]


def _nan_flag(values):
  flag = None
  for value in jax.tree.leaves(values):
    if jnp.issubdtype(jnp.result_type(value), jnp.floating) and jnp.size(value) > 0:
      first = jnp.ravel(value)[0]
      nan = (first != first).astype(jnp.uint32)
      flag = nan if flag is None else flag | nan
  return flag


def direction(key: jax.Array, leaf_index: int, leaf: jax.Array, distribution: str) -> jax.Array:
  """The direction for one leaf: float32 for integer leaves, else the leaf's dtype.

  normal: Box-Muller on two 16-bit uniforms; rademacher: the top bit of the hash.
  """
  return direction_from_seed(leaf_seed(key, leaf_index), leaf, distribution, _key_zero(key))


def direction_from_seed(
  seed: jax.Array, leaf: jax.Array, distribution: str, flag=None
) -> jax.Array:
  """`direction` from a leaf's seed (`leaf_seeds`); `flag` from `tie_seed` (see element_index)."""
  z = _from_bits(bits_from_seed(seed, jnp.shape(leaf), flag), distribution)
  return z.astype(direction_dtype(leaf))


def direction_dtype(leaf) -> jnp.dtype:
  return jnp.float32 if is_integer(leaf) else jnp.result_type(leaf)


def _from_bits(bits: jax.Array, distribution: str) -> jax.Array:
  if distribution == "rademacher":
    return jnp.where(bits >> 31 == 1, 1.0, -1.0).astype(jnp.float32)
  # Both uniforms from one 32-bit hash, 16 bits each: |z| <= 4.7 (the tail beyond has mass 3e-6)
  # and cos(2πu) on 65536 angles; a second hash round per element cost more than the rest.
  u1 = ((bits >> 16).astype(jnp.float32) + 0.5) * (2.0**-16)  # in (0, 1): log is finite
  u2 = (bits & jnp.uint32(0xFFFF)).astype(jnp.float32) * (2.0**-16)
  return jnp.sqrt(-2.0 * jnp.log(u1)) * _cos_2pi(u2)


# Leaves of at most this many elements (biases, norm scales, position embeddings) are drawn
# together up front: one fused draw instead of one per leaf, which is what made deep models slow
# to compile; they are small, so holding them through the pass costs little memory (issue 15).
SMALL_LEAF = 1 << 14
# Off: on ResNet-18 (batch 64) the group made the SPSA step hold 36 MiB more (total 180 vs 144 MiB,
# XLA's memory analysis): the small leaves' moves are computed up front and XLA's schedule then
# keeps more activations alive. Kept for models where compile time matters more (issue 15).
GROUP_SMALL_LEAVES = False


def small_leaves(leaves, selected) -> tuple[int, ...]:
  """Indices of the selected float leaves drawn in one group (at most SMALL_LEAF elements).

  Integer (fixed-point) leaves keep their own draw: their moves are saturated on the grid and
  held in their own dtype, where a float group would add a float32 copy of each.
  """
  if not GROUP_SMALL_LEAVES:
    return ()
  return tuple(
    i
    for i, (leaf, on) in enumerate(zip(leaves, selected, strict=True))
    if on and not is_integer(leaf) and 0 < jnp.size(leaf) <= SMALL_LEAF
  )


def grouped_directions(seeds: jax.Array, indices, leaves, distribution: str) -> dict:
  """{i: direction of leaf i} for the leaves `indices`, from one draw over their concatenation.

  Each element hashes its index within its own leaf with its leaf's seed, so the values are those
  of `direction_from_seed(seeds[i], leaves[i], ...)`, leaf by leaf.
  """
  if not indices:
    return {}
  sizes = [int(jnp.size(leaves[i])) for i in indices]
  within = np.concatenate([np.arange(size, dtype=np.uint32) for size in sizes])
  seed = jnp.concatenate(
    [jnp.broadcast_to(seeds[i], (size,)) for i, size in zip(indices, sizes, strict=True)]
  )
  z = _from_bits(_mix32(jnp.asarray(within) ^ seed), distribution)
  out, offset = {}, 0
  for i, size in zip(indices, sizes, strict=True):
    leaf = leaves[i]
    out[i] = z[offset : offset + size].reshape(jnp.shape(leaf)).astype(direction_dtype(leaf))
    offset += size
  return out


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


def move(leaf: jax.Array, z: jax.Array, scale, grid_scale=None, flag=None) -> jax.Array:
  """leaf moved by scale · z: on the grid (step `grid_scale`) for integer leaves.

  `flag`: a uint32 zero XLA cannot fold (`tie_seed`, `_key_zero`). An integer leaf is xor-ed with
  it, so the int32 widening inside `saturating_add` is not a loop invariant that XLA would hoist
  out of a loop over directions (4 bytes per weight, kept all along).
  """
  if is_integer(leaf):
    if flag is not None:
      leaf = leaf ^ flag.astype(leaf.dtype)
    return saturating_add(leaf, grid_step(z, scale, grid_scale))
  return leaf + (scale * z).astype(leaf.dtype)


def perturb_leaf(
  index: int, leaf: jax.Array, key: jax.Array, scale, distribution: str, grid_scale=None
) -> jax.Array:
  """leaf moved by scale · z(key, index): on the grid (step `grid_scale`) for integer leaves."""
  z = direction(key, index, leaf, distribution)
  return move(leaf, z, scale, grid_scale, _key_zero(key) if is_integer(leaf) else None)


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


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def with_tangent_seeded(
  leaf: jax.Array, t: jax.Array, seed: jax.Array, flag: jax.Array, distribution: str
):
  """`with_tangent` from a leaf's seed: its derivative with respect to `t` is z(seed).

  `seed` is the leaf's (`leaf_seeds`) and `flag` its tie flag (`tie_seed`; a uint32 0), so
  z = direction_from_seed(seed, leaf, distribution, flag).
  """
  del t, seed, flag
  return leaf


@with_tangent_seeded.defjvp
def _with_tangent_seeded_jvp(distribution, primals, tangents):
  leaf, _, seed, flag = primals
  t_dot = tangents[1]

  def draw(flag):
    return direction_from_seed(seed, leaf, distribution, flag)

  # A small leaf's tangent (a bias) is broadcast into its layer's output: drawn once (see
  # `materialized`), not once per output element.
  z = materialized(draw, flag) if jnp.size(leaf) <= SMALL_LEAF else draw(flag)
  return leaf, (t_dot * z).astype(z.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def with_tangents(leaves: tuple, t: jax.Array, seeds: jax.Array, indices: tuple, distribution: str):
  """`with_tangent` for the small leaves `indices` at once (`grouped_directions`): one draw."""
  del t, seeds, indices
  return leaves


@with_tangents.defjvp
def _with_tangents_jvp(indices, distribution, primals, tangents):
  leaves, _, seeds = primals
  _, t_dot, _ = tangents
  by_index = dict(zip(indices, leaves, strict=True))
  zs = grouped_directions(seeds, indices, by_index, distribution)
  return leaves, tuple((t_dot * zs[i]).astype(zs[i].dtype) for i in indices)


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
