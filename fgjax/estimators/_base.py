"""What every estimator shares: the result type, argument checks, masks and the combine step."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fgjax import _masks
from fgjax.estimators import _perturbation

PyTree = Any
LossFn = Callable[..., jax.Array]


class Estimate(NamedTuple):
  """What an estimator returns.

  Attributes:
    value: the loss at the parameters (exact for backprop, jvp and one-sided SPSA; for central SPSA
      the mean of L(w + εz) and L(w - εz), which is L(w) + O(ε²)).
    grads: the gradient estimate, a pytree with the structure of the parameters; leaves outside the
      mask are exact zeros.
    metrics: health metrics, a dict of arrays: "directional_derivatives" (K,), the estimated
      ∇L·z_k; "zero_difference_fraction" (), the fraction of directions whose two losses were
      exactly equal (a sign that the perturbation vanished under quantization).
  """

  value: jax.Array
  grads: PyTree
  metrics: dict[str, jax.Array]


def check_positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name}: expected an integer >= 1, got {value!r}.")


def check_scales(scales, epsilon: float) -> dict | None:
  """Validates an estimator's `scales` ({path: grid step}) against ε; returns them as a dict.

  A leaf whose coarsest grid step is 2ε or more would be perturbed by round(ε z / s) = 0 steps
  for most (Rademacher: all) directions, an exactly zero estimate: refuse it.
  """
  if scales is None:
    return None
  if not isinstance(scales, dict):
    raise ValueError(f"scales: expected a dict {{leaf path: grid step}}, got {type(scales)}.")
  for name, value in scales.items():
    try:
      largest = float(np.max(np.asarray(value)))
    except jax.errors.TracerArrayConversionError:
      continue  # Built under a trace: the values are checked where they are concrete.
    if not np.isfinite(largest) or largest <= 0:
      raise ValueError(f"scales: the grid step of {name!r} must be finite and > 0, got {largest}.")
    if epsilon <= 0.5 * largest:
      raise ValueError(
        f"epsilon={epsilon:g} is at most half a grid step of {name!r} (step up to {largest:.3g}): "
        f"its perturbation rounds to zero; use epsilon > {0.5 * largest:.3g} (weight units) or "
        "more weight bits."
      )
  return dict(scales)


def check_chunk_size(chunk_size) -> None:
  if chunk_size is not None and chunk_size != "auto":
    check_positive_int("chunk_size", chunk_size)


def resolve_chunk_size(chunk_size, num_directions: int) -> int:
  """How many directions run at once; "auto" picks per backend (see BENCHMARKS.md).

  On CPU, vmapping K perturbed copies of the weights turns every matmul or convolution into a
  batched-weight one, which XLA:CPU runs far slower than K plain ones, so directions run one by one.
  On accelerators the batched form wins, so all K run at once.
  """
  if chunk_size == "auto":
    chunk_size = 1 if jax.default_backend() == "cpu" else None
  if chunk_size is None:
    return num_directions
  return min(chunk_size, num_directions)


def map_directions(fn: Callable, keys: jax.Array, chunk_size: int):
  """fn over the leading axis of keys: vmapped when all at once, else lax.map in chunks.

  One direction is a plain call: vmapping it would turn every matmul and convolution into a
  batched-weight one for nothing (much slower on CPU).
  """
  if keys.shape[0] == 1:
    return jax.tree.map(lambda x: jnp.expand_dims(x, 0), fn(keys[0]))
  if chunk_size >= keys.shape[0]:
    return jax.vmap(fn)(keys)
  if chunk_size == 1:
    # Not `batch_size=1`: lax.map vmaps each batch, even of one, which would batch every weight.
    return jax.lax.map(fn, keys)
  return jax.lax.map(fn, keys, batch_size=chunk_size)


def scalar_loss(loss_fn: LossFn, leaves_to_tree: Callable, *args, **kwargs) -> Callable:
  """Wraps loss_fn so it takes the list of leaves, and checks that it returns a scalar."""

  def loss(leaves):
    value = loss_fn(leaves_to_tree(leaves), *args, **kwargs)
    if jnp.shape(value) != ():
      raise ValueError(f"loss_fn: must return a scalar, got shape {jnp.shape(value)}.")
    return value

  return loss


@dataclasses.dataclass(frozen=True)
class Problem:
  """Parameters split into leaves, with the mask resolved once per trace.

  `grid_scales[i]` is the grid step `s` of trainable integer leaf i (`w = s q`, from the
  estimator's `scales`), None for float and frozen leaves.
  """

  leaves: list[jax.Array]
  treedef: Any
  trainable: tuple[bool, ...]
  grid_scales: tuple[Any, ...] = ()

  @classmethod
  def create(cls, params: PyTree, mask, scales=None) -> Problem:
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [leaf for _, leaf in leaves_with_path]
    trainable = _masks.resolve_mask(mask, params)
    grid_scales = []
    for (path, leaf), on in zip(leaves_with_path, trainable, strict=True):
      if not (on and _perturbation.is_integer(leaf)):
        grid_scales.append(None)
        continue
      name = _masks.path_to_str(path)
      if scales is None or name not in scales:
        raise ValueError(
          f"scales: integer leaf {name!r} ({jnp.result_type(leaf)}) needs its grid step: pass "
          "scales=fgjax.quant.leaf_scales(params, frozen) (epsilon is in weight units), or mask "
          "the leaf out."
        )
      grid_scales.append(jnp.asarray(scales[name], jnp.float32))
    return cls(leaves, treedef, trainable, tuple(grid_scales))

  def to_tree(self, leaves: Sequence[jax.Array]) -> PyTree:
    return jax.tree_util.tree_unflatten(self.treedef, list(leaves))

  @property
  def positions(self) -> list[int]:
    """Indices of the trainable leaves."""
    return [i for i, on in enumerate(self.trainable) if on]

  def trainable_leaves(self) -> list[jax.Array]:
    return [self.leaves[i] for i in self.positions]

  def of_trainable(self, loss: Callable) -> Callable:
    """loss over all leaves -> loss over the trainable leaves (the frozen ones are constants)."""

    def loss_of_trainable(trainable_leaves):
      leaves = list(self.leaves)
      for i, leaf in zip(self.positions, trainable_leaves, strict=True):
        leaves[i] = leaf
      return loss(leaves)

    return loss_of_trainable

  def scatter(self, trainable_values: Sequence[jax.Array]) -> PyTree:
    """A full tree holding trainable_values at the trainable leaves and exact zeros elsewhere."""
    out = [jnp.zeros(jnp.shape(x), grad_dtype(x)) for x in self.leaves]
    for i, value in zip(self.positions, trainable_values, strict=True):
      out[i] = value
    return self.to_tree(out)


def grad_dtype(leaf) -> jnp.dtype:
  return jnp.float32 if _perturbation.is_integer(leaf) else jnp.result_type(leaf)


_UNROLL_LIMIT = 16


def combine(
  problem: Problem,
  coefficients: jax.Array,
  keys: jax.Array,
  epsilon,
  distribution: str,
  scale=1.0,
  central: bool = True,
) -> PyTree:
  """g = (scale / K) Σ_k c_k z_k, with each z_k regenerated from keys[k] leaf by leaf.

  On integer leaves z_k is the move really made (`_perturbation.effective_direction`), in weight
  units, so the estimate is a weight-space gradient for float and integer leaves alike.

  Up to _UNROLL_LIMIT directions the sum is unrolled into one fusible expression per leaf; beyond,
  a loop accumulates one direction at a time. The result does not depend on chunk_size.
  """
  num_directions = keys.shape[0]
  weights = coefficients * (scale / num_directions)
  grads = []
  streams = range(len(problem.leaves))
  unrolled = num_directions <= _UNROLL_LIMIT
  small = _perturbation.small_leaves(problem.leaves, problem.trainable) if unrolled else ()
  # Per direction: every leaf's seed in one computation, the small leaves in one draw.
  seeds = [
    _perturbation.leaf_seeds(keys[k], streams) for k in range(num_directions if unrolled else 0)
  ]
  grouped = [
    _perturbation.grouped_directions(seeds[k], small, problem.leaves, distribution)
    for k in range(len(seeds))
  ]

  def leaf_term(z, index, leaf):
    grid = problem.grid_scales[index] if problem.grid_scales else None
    moved = _perturbation.effective_direction(leaf, z, epsilon, grid, central)
    return moved.astype(grad_dtype(leaf))

  def unrolled_z(k, index, leaf):
    if index in grouped[k]:
      return grouped[k][index]
    # The seed's flag keeps the index inside any loop around the step (see element_index).
    seed, flag = _perturbation.tie_seed(seeds[k][index], ())
    return _perturbation.direction_from_seed(seed, leaf, distribution, flag)

  for index, (leaf, on) in enumerate(zip(problem.leaves, problem.trainable, strict=True)):
    dtype = grad_dtype(leaf)
    if not on:
      grads.append(jnp.zeros(jnp.shape(leaf), dtype))
    elif unrolled:
      # One elementwise expression: XLA fuses the K draws, the sum and the optimizer's update into
      # one pass over the leaf, with no buffer of the leaf's size in between.
      total = weights[0].astype(dtype) * leaf_term(unrolled_z(0, index, leaf), index, leaf)
      for k in range(1, num_directions):
        total = total + weights[k].astype(dtype) * leaf_term(
          unrolled_z(k, index, leaf), index, leaf
        )
      grads.append(total)
    else:

      def body(k, total, i=index, x=leaf):
        # The accumulator's tie flag keeps the draw's index inside the loop (see element_index).
        seed, flag = _perturbation.tie_seed(_perturbation.leaf_seed(keys[k], i), total)
        z = _perturbation.direction_from_seed(seed, x, distribution, flag)
        return total + weights[k].astype(total.dtype) * leaf_term(z, i, x)

      grads.append(jax.lax.fori_loop(0, num_directions, body, jnp.zeros(jnp.shape(leaf), dtype)))
  return problem.to_tree(grads)


def health_metrics(derivatives: jax.Array, zero_differences: jax.Array) -> dict[str, jax.Array]:
  fraction = jnp.mean(zero_differences.astype(jnp.float32)) if zero_differences.size else 0.0
  return {
    "directional_derivatives": derivatives,
    "zero_difference_fraction": jnp.asarray(fraction, jnp.float32),
  }
