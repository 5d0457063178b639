"""Loss landscapes around a solution: 2-D slices, trajectory planes and sharpness.

How does a forward-gradient optimizer move through the loss landscape, compared with backprop?
Chen et al. ("Stepping Forward on the Last Mile", NeurIPS 2024) answer with pictures: the loss on a
2-D plane of weight space around the adapted solution, with the optimizers' trajectories drawn on
it. This module holds the pieces, on parameter pytrees (float; dequantize integer weights first,
`fgjax.quant.dequantize_params`), restricted to the trainable leaves by an optional `mask`:

- a plane is spanned by two directions `d1, d2` through a centre `c`; a point of the plane is
  `c + a d1 + b d2` and `loss_surface` evaluates the loss on a grid of `(a, b)`;
- `filter_normalized_direction` draws random directions scaled filter by filter to the weights'
  own norms (Li et al., "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018), so that
  planes of differently scaled layers are comparable;
- `pca_directions` spans the plane in which trajectories vary most (Li et al. section 7):
  principal directions of the points' offsets from the centre;
- `project` gives each trajectory point its plane coordinates (least squares);
- sharpness at a point: `hessian_top_eigenvalue` (power iteration on Hessian-vector products from
  forward-over-reverse, `jax.jvp` of `jax.grad`) and `loss_rise` (mean and worst loss increase
  under random filter-normalised perturbations of a fixed relative radius, as in Keskar et al.
  2017's sharpness).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

PyTree = Any


def _mask_leaves(params: PyTree, mask: PyTree | None) -> list[bool]:
  leaves = jax.tree.leaves(params)
  if mask is None:
    return [True] * len(leaves)
  flags = [bool(flag) for flag in jax.tree.leaves(mask)]
  if len(flags) != len(leaves):
    raise ValueError(f"mask: {len(flags)} leaves, but params have {len(leaves)}.")
  return flags


def _flat(tree: PyTree) -> jax.Array:
  return ravel_pytree(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree))[0]


def _masked(tree: PyTree, mask: PyTree | None) -> PyTree:
  flags = _mask_leaves(tree, mask)
  leaves, treedef = jax.tree.flatten(tree)
  return treedef.unflatten(
    [leaf if on else jnp.zeros_like(leaf) for leaf, on in zip(leaves, flags, strict=True)]
  )


def filter_normalized_direction(key: jax.Array, params: PyTree, mask: PyTree | None = None):
  """A random direction whose every filter has the norm of the matching filter of `params`.

  For a kernel of shape `(..., out)`, filter `j` is the slice `[..., j]` (a conv filter, or the
  incoming weights of a dense unit): `d_j = z_j / ||z_j|| * ||θ_j||` with `z ~ N(0, I)`. Leaves of
  rank <= 1 (biases, norm scales) and masked-out leaves get zero, as in Li et al. 2018.

  Args:
    key: PRNG key.
    params: float parameter pytree (the point whose scale the direction takes).
    mask: optional pytree of bools with the structure of `params` (True: the leaf may move).

  Returns:
    A pytree like `params` (float32).

  Example:
    >>> d = filter_normalized_direction(jax.random.key(0), params, mask)
    >>> moved = jax.tree.map(lambda p, d: p + 0.1 * d, params, d)  # 10 % of each filter's norm

  Paper: Li et al., "Visualizing the Loss Landscape of Neural Nets" (NeurIPS 2018), section 4.
  """
  leaves, treedef = jax.tree.flatten(params)
  flags = _mask_leaves(params, mask)
  keys = jax.random.split(key, max(len(leaves), 1))
  out = []
  for leaf, on, leaf_key in zip(leaves, flags, keys, strict=False):
    leaf = jnp.asarray(leaf, jnp.float32)
    if not on or leaf.ndim <= 1:
      out.append(jnp.zeros_like(leaf))
      continue
    axes = tuple(range(leaf.ndim - 1))
    z = jax.random.normal(leaf_key, leaf.shape, jnp.float32)
    z_norm = jnp.sqrt(jnp.sum(z**2, axis=axes, keepdims=True))
    leaf_norm = jnp.sqrt(jnp.sum(leaf**2, axis=axes, keepdims=True))
    out.append(z / jnp.maximum(z_norm, 1e-12) * leaf_norm)
  return treedef.unflatten(out)


def pca_directions(
  points: Sequence[PyTree], center: PyTree, mask: PyTree | None = None, num_components: int = 2
) -> tuple[list[PyTree], np.ndarray]:
  """The orthonormal directions along which `points` move most, seen from `center`.

  With `M` the matrix whose rows are `flat(p_i - center)` (masked), the directions are the first
  right singular vectors of `M` (no mean subtraction: the plane passes through `center`, as in
  Li et al. 2018, who take the final point of a trajectory as the centre).

  Args:
    points: parameter pytrees (e.g. all trajectories' checkpoints, concatenated).
    center: the pytree the plane passes through.
    mask: optional pytree of bools; masked-out leaves get zero.
    num_components: how many directions.

  Returns:
    `(directions, explained)`: a list of `num_components` pytrees like `center` (unit norm,
    mutually orthogonal) and the fraction of `||M||_F^2` each explains.

  Raises:
    ValueError: fewer points than components.
  """
  if len(points) < num_components:
    raise ValueError(f"pca_directions: {len(points)} points for {num_components} components.")
  _, unravel = ravel_pytree(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), center))
  origin = _flat(_masked(center, mask))
  matrix = np.stack([np.asarray(_flat(_masked(p, mask)) - origin) for p in points])
  _, singular, vt = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
  energy = singular**2
  explained = energy[:num_components] / max(float(energy.sum()), 1e-30)
  directions = [unravel(jnp.asarray(vt[i], jnp.float32)) for i in range(num_components)]
  return directions, explained


def project(points: Sequence[PyTree], center: PyTree, directions: Sequence[PyTree]) -> np.ndarray:
  """Plane coordinates of `points`: least-squares `(a, b, ...)` with `p - c ≈ a d1 + b d2 + ...`.

  Args:
    points: parameter pytrees.
    center: the plane's origin.
    directions: the plane's spanning directions (need not be orthogonal, e.g. random ones).

  Returns:
    Array `(len(points), len(directions))`. For orthonormal directions these are dot products.
  """
  basis = np.stack([np.asarray(_flat(d), np.float64) for d in directions], axis=1)
  origin = np.asarray(_flat(center), np.float64)
  offsets = np.stack([np.asarray(_flat(p), np.float64) - origin for p in points], axis=1)
  coords, *_ = np.linalg.lstsq(basis, offsets, rcond=None)
  return coords.T


def loss_surface(
  loss_fn: Callable[[PyTree], jax.Array],
  center: PyTree,
  directions: tuple[PyTree, PyTree],
  alphas: np.ndarray,
  betas: np.ndarray,
  *,
  batch_size: int = 16,
) -> np.ndarray:
  """The loss on the plane `center + a d1 + b d2` over the grid `alphas x betas`.

  Args:
    loss_fn: `loss_fn(params) -> scalar` (close over the data).
    center: float parameter pytree.
    directions: `(d1, d2)`, pytrees like `center`.
    alphas: 1-D coordinates along `d1`.
    betas: 1-D coordinates along `d2`.
    batch_size: grid points evaluated at once (vmapped) inside `lax.map`.

  Returns:
    Array `(len(betas), len(alphas))`, row `j` column `i` at `(alphas[i], betas[j])`: the layout
    `matplotlib.pyplot.contour(alphas, betas, z)` expects.
  """
  a, b = np.meshgrid(np.asarray(alphas, np.float32), np.asarray(betas, np.float32))
  coords = jnp.stack([a.ravel(), b.ravel()], axis=1)
  center = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), center)
  values = _surface(loss_fn, batch_size, center, tuple(directions), coords)
  return np.asarray(values).reshape(a.shape)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _surface(loss_fn, batch_size, center, directions, coords):
  d1, d2 = directions

  def at(ab):
    return loss_fn(jax.tree.map(lambda c, u, v: c + ab[0] * u + ab[1] * v, center, d1, d2))

  return jax.lax.map(at, coords, batch_size=batch_size)


def hessian_top_eigenvalue(
  loss_fn: Callable[[PyTree], jax.Array],
  params: PyTree,
  key: jax.Array,
  *,
  num_iterations: int = 20,
  mask: PyTree | None = None,
) -> tuple[float, PyTree]:
  """The Hessian's eigenvalue of largest magnitude at `params`, by power iteration.

  `H v` comes from forward-over-reverse, `jax.jvp(jax.grad(loss_fn), (params,), (v,))`, without
  forming `H`; `v_{t+1} = H v_t / ||H v_t||`, and the estimate is the Rayleigh quotient
  `λ = v^T H v`. With a mask, `H` is restricted to the masked-in leaves. Near a minimum the
  largest-magnitude eigenvalue is the largest (positive) curvature, the usual sharpness number.

  Args:
    loss_fn: `loss_fn(params) -> scalar`, twice differentiable.
    params: float parameter pytree.
    key: PRNG key of the starting vector.
    num_iterations: power iterations (each one Hessian-vector product).
    mask: optional pytree of bools.

  Returns:
    `(eigenvalue, eigenvector)`: a float and a unit pytree like `params`. Calls with the same
    `loss_fn` object, mask and iteration count compile once.

  Example:
    >>> top, _ = hessian_top_eigenvalue(lambda p: loss(p, batch), params, jax.random.key(0))
  """
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  flags = tuple(_mask_leaves(params, mask))
  eigenvalue, vector = _power_iteration(loss_fn, num_iterations, flags, params, key)
  return float(eigenvalue), vector


def _masked_flags(tree: PyTree, flags: tuple[bool, ...]) -> PyTree:
  leaves, treedef = jax.tree.flatten(tree)
  return treedef.unflatten(
    [leaf if on else jnp.zeros_like(leaf) for leaf, on in zip(leaves, flags, strict=True)]
  )


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _power_iteration(loss_fn, num_iterations, flags, params, key):
  grad_fn = jax.grad(loss_fn)

  def hvp(v):
    return _masked_flags(jax.jvp(grad_fn, (params,), (v,))[1], flags)

  def normalize(v):
    norm = jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree.leaves(v)))
    return jax.tree.map(lambda x: x / jnp.maximum(norm, 1e-30), v)

  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  start = treedef.unflatten(
    [jax.random.normal(k, x.shape, jnp.float32) for k, x in zip(keys, leaves, strict=True)]
  )
  v = normalize(_masked_flags(start, flags))
  v = jax.lax.fori_loop(0, num_iterations, lambda _, v: normalize(hvp(v)), v)
  pairs = zip(jax.tree.leaves(v), jax.tree.leaves(hvp(v)), strict=True)
  return sum(jnp.vdot(a, b) for a, b in pairs), v


def loss_rise(
  loss_fn: Callable[[PyTree], jax.Array],
  params: PyTree,
  key: jax.Array,
  *,
  radius: float = 0.05,
  num_samples: int = 16,
  mask: PyTree | None = None,
) -> dict[str, float]:
  """How much the loss rises when `params` move by a fixed relative radius in random directions.

  For `num_samples` filter-normalised directions `d_s` (`filter_normalized_direction`: every
  filter moves by `radius` times its own norm), the rise is the symmetric difference
  `(L(θ + r d_s) + L(θ - r d_s)) / 2 - L(θ) ≈ r² d_sᵀ H d_s / 2`: the first-order term cancels,
  so a point that is not yet a minimum is measured by its curvature, not by its slope. A flat
  region rises little, a sharp one a lot.

  Args:
    loss_fn: `loss_fn(params) -> scalar`.
    params: float parameter pytree.
    key: PRNG key of the directions.
    radius: relative size of the perturbation (0.05: 5 % of each filter's norm).
    num_samples: random directions.
    mask: optional pytree of bools; only masked-in kernels move.

  Returns:
    `{"mean": ..., "max": ..., "std": ...}` of the rise over the samples.

  Paper: Keskar et al., "On Large-Batch Training for Deep Learning: Generalization Gap and Sharp
  Minima" (ICLR 2017) define sharpness as the worst rise in a small box; we report the mean and
  the worst over random directions.
  """
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  flags = tuple(_mask_leaves(params, mask))
  keys = jax.random.split(key, num_samples)
  values = np.asarray(_rises(loss_fn, flags, params, keys, jnp.float32(radius)), np.float64)
  return {"mean": float(values.mean()), "max": float(values.max()), "std": float(values.std())}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _rises(loss_fn, flags, params, keys, radius):
  base = loss_fn(params)
  mask = jax.tree.unflatten(jax.tree.structure(params), list(flags))

  def one(k):
    d = filter_normalized_direction(k, params, mask)
    plus = loss_fn(jax.tree.map(lambda p, u: p + radius * u, params, d))
    minus = loss_fn(jax.tree.map(lambda p, u: p - radius * u, params, d))
    return 0.5 * (plus + minus) - base

  return jax.lax.map(one, keys)
