"""MEST: memory-economic sparse training as an optax transform (backprop or forward gradients).

Yuan et al., "MEST: Accurate and Fast Memory-Economic Sparse Training Framework on the Edge"
(NeurIPS 2021). The network starts sparse and stays sparse: a random mask at the target density,
kept per leaf (unstructured, block or channel units, see `_schemes`), and every
`mutation_interval` steps an *elastic mutation* swaps a fraction r(t) of the weights, with r
decaying to zero (e.g. 2 % -> 1 % -> 0 %), so the topology explores early and settles late:

- without a soft bound (`soft_bound_steps=0`, MEST+EM): prune the r·n least important active
  units of each leaf, grow r·n inactive ones at random (density constant);
- with a soft memory bound (`soft_bound_steps=S > 0`, MEST+EM&S): grow r·n units first (density
  up to d + r, e.g. 88 % sparsity for a 90 % target with r = 2 %), train them for S steps, then
  prune each leaf back to its budget. Grown weights start at zero; the gradient term of the
  importance keeps the useful ones.

Importance of a weight: |w| + λ |ĝ|, with ĝ this step's gradient *estimate* (backprop, jvp or SPSA:
the same code), summed over a unit. Growth is random, as MEST's: choosing by gradient would need
the dense gradient, which neither memory-economic training nor a sparse forward gradient has.

Sparse directions: with an estimator, the loss is evaluated at `apply_masks(params, masks)`, so the
model never reads a perturbed inactive weight, and the estimate is zeroed outside the mask. For
SPSA that is exactly Sparse MeZO's estimator (Liu et al. 2024; DeepZero, Chen et al. 2024):
d = ∇L·(m ⊙ z), ĝ = d (m ⊙ z), unbiased on the active coordinates with a variance that scales
with the number of active weights instead of all of them. The inactive part of each direction is
still drawn (fused elementwise, no buffer) and discarded: dense storage saves no arithmetic.

Updates are masked: an inactive weight gets an exact zero update; a pruned weight gets −w (it
becomes exactly 0); a grown weight starts at 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fgjax import _masks
from fgjax.estimators._base import Estimate
from fgjax.sparse import _schemes
from fgjax.transforms import forward_gradient

PyTree = Any


class MestState(NamedTuple):
  """State of `mest`.

  Attributes:
    step: the number of updates made (int32); mutations happen at multiples of the interval.
    masks: one bool array per leaf, the leaf's shape for sparsified leaves (True = active) and a
      scalar True for dense ones (biases, norms); pass it to `apply_masks` and `density`.
    key: PRNG key of random growth.
    estimator_state: the `ForwardGradientState` of the estimator (its key and last loss), or
      `optax.EmptyState()` when the incoming updates are the gradient.
    inner_state: the wrapped optimizer's state.
  """

  step: jax.Array
  masks: PyTree
  key: jax.Array
  estimator_state: Any
  inner_state: optax.OptState


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
  """params with every inactive weight set to exactly zero (`masks` from `MestState.masks`)."""
  return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros((), p.dtype)), params, masks)


def density(masks: PyTree) -> jax.Array:
  """Fraction of active weights over the sparsified leaves (the non-scalar masks)."""
  sparse = [m for m in jax.tree.leaves(masks) if jnp.ndim(m) > 0]
  if not sparse:
    return jnp.ones((), jnp.float32)
  active = sum(jnp.sum(m, dtype=jnp.float32) for m in sparse)
  return active / sum(m.size for m in sparse)


def decaying_ratio(initial: float, total_steps: int, num_stages: int = 3) -> Callable:
  """MEST's mutation-ratio schedule: `num_stages` equal stages decaying linearly to 0.

  With initial=0.02 and 3 stages: 2 % for the first third of training, 1 % for the second, 0 % for
  the last (the mask is fixed while the weights converge), as in MEST's 90 % runs.

  Args:
    initial: the ratio of the first stage, in [0, 1).
    total_steps: the length of training.
    num_stages: >= 2 stages; the last one has ratio 0.

  Returns:
    `schedule(step) -> ratio` (an `optax.Schedule`).
  """
  if not 0 <= initial < 1:
    raise ValueError(f"initial: expected a ratio in [0, 1), got {initial!r}.")
  if not (isinstance(total_steps, int) and total_steps >= 1):
    raise ValueError(f"total_steps: expected an integer >= 1, got {total_steps!r}.")
  if not (isinstance(num_stages, int) and num_stages >= 2):
    raise ValueError(f"num_stages: expected an integer >= 2, got {num_stages!r}.")
  stage_length = total_steps / num_stages

  def schedule(step):
    stage = jnp.minimum(jnp.floor(jnp.asarray(step) / stage_length), num_stages - 1)
    return initial * (num_stages - 1 - stage) / (num_stages - 1)

  return schedule


def sparse_estimate(estimator, loss_fn, params, masks, *args, key, **kwargs) -> Estimate:
  """An estimator's estimate with sparse directions: only the active weights are moved.

  The loss is evaluated at `apply_masks(w + ε z, masks)`, and the estimate zeroed where the mask is
  False: for SPSA, ĝ = (∇L·(m⊙z)) (m⊙z), unbiased on the active coordinates,
  E‖ĝ − ∇_m L‖² ∝ (number of active weights) instead of all weights (Sparse MeZO).

  Args:
    estimator: from `fgjax.estimators`.
    loss_fn: `loss_fn(params, *args, **kwargs) -> scalar`.
    params: the parameters (inactive weights are read as zero whatever they hold).
    masks: `MestState.masks`, or any bool tree broadcastable to the parameters.
    *args: passed to `loss_fn`.
    key: the estimator's PRNG key.
    **kwargs: passed to `loss_fn`.

  Returns:
    `Estimate(value, grads, metrics)` with exact zeros outside the masks.

  Example:
    >>> est = fgjax.sparse.sparse_estimate(fgjax.estimators.spsa(4), loss_fn, params, masks, batch,
    ...                                    key=key)
  """
  estimate = estimator(
    lambda p, *a, **k: loss_fn(apply_masks(p, masks), *a, **k), params, *args, key=key, **kwargs
  )
  return estimate._replace(grads=_zero_outside(estimate.grads, masks))


def _zero_outside(tree, masks):
  return jax.tree.map(lambda g, m: jnp.where(m, g, jnp.zeros((), g.dtype)), tree, masks)


def _descending_ranks(score: jax.Array) -> jax.Array:
  """rank[i] = the position of score[i] in descending order (0 = largest; ties by index)."""
  flat = score.reshape(-1)
  order = jnp.argsort(-flat, stable=True)
  ranks = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
  return ranks.reshape(score.shape)


def _keep_top(active: jax.Array, importance: jax.Array, count) -> jax.Array:
  """The `count` most important units among the active ones."""
  score = jnp.where(active, importance, -jnp.inf)
  return active & (_descending_ranks(score) < count)


def _grow_random(active: jax.Array, excluded: jax.Array, key, count) -> jax.Array:
  """active plus `count` units drawn at random among those neither active nor excluded."""
  candidates = ~active & ~excluded
  score = jnp.where(candidates, jax.random.uniform(key, active.shape), -1.0)
  return active | (candidates & (_descending_ranks(score) < count))


def mest(
  optimizer: optax.GradientTransformation,
  *,
  density: float,
  estimator=None,
  scheme: str = "unstructured",
  block_shape: tuple[int, int] = (4, 4),
  mutation_interval: int = 100,
  mutation_ratio: float | Callable = 0.0,
  soft_bound_steps: int = 0,
  gradient_weight: float = 1.0,
  sparsify=None,
  seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""MEST sparse training around an optimizer: sparse from the start, with elastic mutation.

  Each step: ĝ = m ⊙ (estimate of ∇L at m ⊙ w) (sparse directions) or m ⊙ (incoming gradient);
  u = optimizer(ĝ); at mutation steps the masks change (see the module docstring) by importance
  |w| + λ|ĝ| per unit; the update is u on weights that stay active, −w on pruned ones (and on
  ones that were never active, so the first step sparsifies dense parameters), 0 on grown ones.

  Per sparsified leaf with n units and budget b = round(d·n): the active count is b outside the
  soft-bound windows and at most b + round(r(t)·n) inside them; each mutation changes
  round(r(t)·n) units (capped by what is available).

  Args:
    optimizer: any optax transformation (e.g. `optax.sgd(0.05, momentum=0.9)`); it receives the
      masked gradient estimate. Its momentum of a pruned weight is kept (stale) if it regrows.
    density: the target fraction d of active weights in each sparsified leaf, in (0, 1]
      (0.2 for 80 % sparsity, 0.1 for 90 %).
    estimator: an estimator of `fgjax.estimators`: `update` then needs `value_fn` and ignores the
      incoming updates (as `fgjax.forward_gradient`). None: the incoming updates are the gradient.
    scheme: "unstructured", "block" (tiles of `block_shape` over the (fan-in, out) matrix) or
      "channel" (whole output channels).
    block_shape: (rows, columns) of a block.
    mutation_interval: steps between mutations, >= 1.
    mutation_ratio: r, the fraction of each leaf's units mutated, a float or a schedule
      `step -> ratio` (see `decaying_ratio`); 0 keeps the initial random mask (a fixed random
      sparse network).
    soft_bound_steps: S, steps between growing and pruning back (0: prune and grow at once);
      must be < mutation_interval.
    gradient_weight: λ in the importance |w| + λ|ĝ|.
    sparsify: which leaves are sparse (pytree of bools or predicate on "a/b/kernel" paths);
      default: every leaf with two or more axes (kernels), biases and norms stay dense.
    seed: seeds the initial masks, the growth and the estimator's directions.

  Returns:
    An `optax.GradientTransformationExtraArgs`; `update(updates, state, params, *, value_fn=None)`.
    Call `apply_masks(params, state.masks)` once after `init` (or let the first update do it).

  Example:
    >>> opt = fgjax.sparse.mest(optax.sgd(0.05), density=0.1, estimator=fgjax.estimators.spsa(4),
    ...                         mutation_interval=50, mutation_ratio=0.02, soft_bound_steps=10)
    >>> state = opt.init(params)
    >>> params = fgjax.sparse.apply_masks(params, state.masks)
    >>> updates, state = opt.update(None, state, params, value_fn=lambda p: loss(p, batch))
    >>> params = optax.apply_updates(params, updates)
  """
  if not (isinstance(density, int | float) and 0 < density <= 1):
    raise ValueError(f"density: expected a fraction in (0, 1], got {density!r}.")
  block_shape = _schemes.check_scheme(scheme, block_shape)
  if isinstance(mutation_interval, bool) or not (
    isinstance(mutation_interval, int) and mutation_interval >= 1
  ):
    raise ValueError(f"mutation_interval: expected an integer >= 1, got {mutation_interval!r}.")
  if isinstance(soft_bound_steps, bool) or not (
    isinstance(soft_bound_steps, int) and 0 <= soft_bound_steps < mutation_interval
  ):
    raise ValueError(
      f"soft_bound_steps: expected an integer in [0, mutation_interval), got {soft_bound_steps!r}."
    )
  if callable(mutation_ratio):
    ratio_fn = mutation_ratio
  elif isinstance(mutation_ratio, int | float) and 0 <= mutation_ratio < 1:
    ratio_fn = lambda step: jnp.asarray(mutation_ratio, jnp.float32)  # noqa: E731
  else:
    raise ValueError(
      f"mutation_ratio: expected a ratio in [0, 1) or a schedule, got {mutation_ratio!r}."
    )
  if not (isinstance(gradient_weight, int | float) and gradient_weight >= 0):
    raise ValueError(f"gradient_weight: expected a number >= 0, got {gradient_weight!r}.")
  if sparsify is None:
    sparsify = lambda path, leaf: jnp.ndim(leaf) >= 2  # noqa: E731
  optimizer = optax.with_extra_args_support(optimizer)
  estimating = estimator is not None and forward_gradient(estimator, seed=seed)

  def views(params) -> list:
    flags = _masks.resolve_mask(sparsify, params)
    return [
      _schemes.UnitView(tuple(jnp.shape(leaf)), scheme, block_shape) if on else None
      for leaf, on in zip(jax.tree.leaves(params), flags, strict=True)
    ]

  def budget(view) -> int:
    return max(1, int(round(density * view.num_units)))

  def init_fn(params) -> MestState:
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
      if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
        raise ValueError(f"params: mest needs float leaves, {_masks.path_to_str(path)!r} is not.")
    treedef = jax.tree.structure(params)
    key = jax.random.fold_in(jax.random.key(seed), 1)
    masks = []
    for index, view in enumerate(views(params)):
      if view is None:
        masks.append(jnp.ones((), bool))
        continue
      noise = jax.random.uniform(jax.random.fold_in(key, index), view.unit_shape)
      units = _descending_ranks(noise) < budget(view)
      masks.append(view.expand(units))
    return MestState(
      step=jnp.zeros((), jnp.int32),
      masks=treedef.unflatten(masks),
      key=jax.random.fold_in(key, -1 % (2**31)),
      estimator_state=estimating.init(params) if estimating else optax.EmptyState(),
      inner_state=optimizer.init(params),
    )

  def mutate(leaves, grads, masks, leaf_views, key, ratio, grow_now, prune_back):
    """New element masks: grow and/or prune each sparsified leaf (see the module docstring)."""
    out = []
    for index, (leaf, grad, mask, view) in enumerate(
      zip(leaves, grads, masks, leaf_views, strict=True)
    ):
      if view is None:
        out.append(mask)
        continue
      active = view.reduce(mask.astype(jnp.float32)) > 0
      importance = view.reduce(jnp.abs(leaf) + gradient_weight * jnp.abs(grad).astype(leaf.dtype))
      target = budget(view)
      count = jnp.round(ratio * view.num_units).astype(jnp.int32)
      leaf_key = jax.random.fold_in(key, index)
      if soft_bound_steps == 0:
        count = jnp.minimum(count, min(target, view.num_units - target))
        kept = _keep_top(active, importance, target - count)
        mutated = _grow_random(kept, active, leaf_key, count)
        units = jnp.where(grow_now, mutated, active)
      else:
        grown = _grow_random(active, jnp.zeros_like(active), leaf_key, count)
        pruned = _keep_top(active, importance, target)
        units = jnp.where(grow_now, grown, jnp.where(prune_back, pruned, active))
      out.append(view.expand(units))
    return out

  def update_fn(updates, state: MestState, params=None, *, value_fn=None, **extra):
    if params is None:
      raise ValueError("params: mest needs the current parameters (to mask and prune them).")
    leaves, treedef = jax.tree.flatten(params)
    masks = treedef.flatten_up_to(state.masks)
    if estimating:
      if value_fn is None:
        raise ValueError("value_fn: mest with an estimator needs `value_fn(params) -> loss`.")
      sparse_value_fn = lambda p: value_fn(apply_masks(p, state.masks))  # noqa: E731
      grads, estimator_state = estimating.update(
        None, state.estimator_state, params, value_fn=sparse_value_fn
      )
    else:
      if updates is None:
        raise ValueError("updates: mest without an estimator takes the gradient as its updates.")
      grads, estimator_state = updates, state.estimator_state
    grads = _zero_outside(grads, state.masks)
    grad_leaves = treedef.flatten_up_to(grads)
    key, grow_key = jax.random.split(state.key)
    step = state.step
    ratio = jnp.asarray(ratio_fn(step), jnp.float32)
    grow_now = (step > 0) & (step % mutation_interval == 0) & (ratio > 0)
    since = step - soft_bound_steps
    prune_back = (soft_bound_steps > 0) & (since > 0) & (since % mutation_interval == 0)
    leaf_views = views(params)
    # Ranking units costs a sort per leaf: only on the steps that change a mask.
    new_masks = jax.lax.cond(
      grow_now | prune_back,
      lambda: mutate(leaves, grad_leaves, masks, leaf_views, grow_key, ratio, grow_now, prune_back),
      lambda: list(masks),
    )
    inner_updates, inner_state = optimizer.update(grads, state.inner_state, params, **extra)
    out = [
      jnp.where(old & new, u, -p).astype(u.dtype)
      for u, p, old, new in zip(
        treedef.flatten_up_to(inner_updates), leaves, masks, new_masks, strict=True
      )
    ]
    new_state = MestState(
      step=state.step + 1,
      masks=treedef.unflatten(new_masks),
      key=key,
      estimator_state=estimator_state,
      inner_state=inner_state,
    )
    return treedef.unflatten(out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
