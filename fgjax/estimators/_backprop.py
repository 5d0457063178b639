"""Backpropagation behind the estimator interface: the reference for every estimator."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fgjax.estimators import _base


@dataclasses.dataclass(frozen=True)
class Backprop:
  """`jax.value_and_grad` as an estimator; build it with `fgjax.estimators.backprop`."""

  mask: object = None

  def __call__(self, loss_fn, params, *args, key=None, **kwargs) -> _base.Estimate:
    del key  # Exact: no randomness.
    problem = _base.Problem.create(params, self.mask)
    loss = _base.scalar_loss(loss_fn, problem.to_tree, *args, **kwargs)
    value, grads = jax.value_and_grad(problem.of_trainable(loss))(problem.trainable_leaves())
    metrics = _base.health_metrics(jnp.zeros((0,)), jnp.zeros((0,), bool))
    return _base.Estimate(value, problem.scatter(grads), metrics)


def backprop(*, mask=None) -> Backprop:
  """The exact gradient by reverse-mode autodiff, with the same interface as the estimators.

  Args:
    mask: which leaves get a gradient (pytree of bools or predicate on paths); others get zeros.

  Returns:
    An estimator: `est(loss_fn, params, *args, key=None) -> Estimate(value, grads, metrics)`.
  """
  return Backprop(mask)
