"""The exact forward gradient: ĝ = (1/K) Σ_k (∇L·v_k) v_k from `jax.jvp`, with no backward pass.

Baydin et al., "Gradients without Backpropagation" (2022).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fgjax.estimators import _base, _lazy, _perturbation


@dataclasses.dataclass(frozen=True)
class JVP:
  """Forward-gradient estimator; build it with `fgjax.estimators.jvp`."""

  num_directions: int = 1
  distribution: str = "normal"
  chunk_size: int | str | None = "auto"
  mask: object = None

  def __call__(self, loss_fn, params, *args, key, **kwargs) -> _base.Estimate:
    problem = _base.Problem.create(params, self.mask)
    for leaf, on in zip(problem.leaves, problem.trainable, strict=True):
      if on and _perturbation.is_integer(leaf):
        raise ValueError(
          "params: jvp needs float leaves; integer (fixed-point) weights have no tangent. "
          "Use spsa, or float master weights with a quantized forward."
        )
    loss = _base.scalar_loss(loss_fn, problem.to_tree, *args, **kwargs)

    one_direction = self.direction_fn(problem, loss)
    keys = jax.random.split(key, self.num_directions)
    chunk = _base.resolve_chunk_size(self.chunk_size, self.num_directions)
    if chunk >= self.num_directions and self.num_directions > 1:
      value, derivatives = jax.vmap(one_direction, out_axes=(None, 0))(keys)
    else:
      values, derivatives = _base.map_directions(one_direction, keys, chunk)
      value = values[0]
    # Directions are drawn again after the forward pass (see spsa), so none is held across it.
    keys = jax.vmap(_perturbation.tie, in_axes=(0, None))(keys, derivatives)
    grads = _base.combine(problem, derivatives, keys, 1.0, self.distribution)
    zero = derivatives == 0
    return _base.Estimate(value, grads, _base.health_metrics(derivatives, zero))

  def direction_fn(self, problem: _base.Problem, loss):
    """`k -> (L(w), ∇L·z_k)`: one jvp along key k's direction, as `__call__` maps it over keys.

    `fgjax.parallel` maps it over each device's share of the keys, so the sharded and the
    single-device estimates run the same code.
    """
    streams = range(len(problem.leaves))
    small = _perturbation.small_leaves(problem.leaves, problem.trainable)

    def one_direction(k):
      def loss_along(t):
        # d/dt at t = 0 is ∇L·z; each tangent z is drawn where its layer reads the weights, the
        # small leaves' (biases, norms) all at once, up front.
        seeds = _perturbation.leaf_seeds(k, streams)
        grouped = {}
        if small:
          leaves = tuple(problem.leaves[i] for i in small)
          tangents = _perturbation.with_tangents(leaves, t, seeds, small, self.distribution)
          grouped = dict(zip(small, tangents, strict=True))

        def replace(index, leaf, tie):
          if index in grouped:
            return grouped[index], tie
          seed, flag = _perturbation.tie_seed(seeds[index], tie)
          return _perturbation.with_tangent_seeded(leaf, t, seed, flag, self.distribution), tie

        return _lazy.call_with_replaced_leaves(loss, problem.leaves, problem.trainable, replace)

      # The primal does not depend on k: under vmap it is computed once, only tangents are batched.
      return jax.jvp(loss_along, (jnp.zeros((), jnp.float32),), (jnp.ones((), jnp.float32),))

    return one_direction


def jvp(
  num_directions: int = 1,
  *,
  distribution: str = "normal",
  chunk_size: int | str | None = "auto",
  mask=None,
) -> JVP:
  r"""Forward-gradient estimator: directional derivatives from forward-mode autodiff.

    d_k = ∇L(w)·v_k  (exact, one `jax.jvp`),   ĝ = (1/K) Σ_k d_k v_k,   E[ĝ] = ∇L

  for directions v_k with E[v vᵀ] = I. The K tangents are vmapped over one primal computation
  (the forward runs once, the tangent dots carry a K axis), or processed in chunks with `lax.map`
  to bound memory. Through fgjax's quantized layers the tangent follows the straight-through rule.

  Args:
    num_directions: K >= 1.
    distribution: "normal" or "rademacher".
    chunk_size: None for all K tangents at once, c for chunks of c (each chunk recomputes the
      primal), "auto" for the backend's faster choice.
    mask: which leaves get a tangent and an estimate (pytree of bools or predicate on paths).

  Returns:
    An estimator: `est(loss_fn, params, *args, key=key) -> Estimate(value, grads, metrics)`; the
    metric "zero_difference_fraction" is the fraction of exactly zero directional derivatives.

  Example:
    >>> est = fgjax.estimators.jvp(num_directions=16, chunk_size=None)
    >>> loss, grads = fgjax.value_and_grad(loss_fn, est)(params, batch, key=key)
  """
  _base.check_positive_int("num_directions", num_directions)
  _perturbation.check_distribution(distribution)
  _base.check_chunk_size(chunk_size)
  return JVP(num_directions, distribution, chunk_size, mask)
