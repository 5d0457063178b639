"""`fgjax.value_and_grad`: any estimator behind `jax.value_and_grad`'s shape."""

from __future__ import annotations

import functools
from collections.abc import Callable


def value_and_grad(
  loss_fn: Callable, estimator: Callable, *, with_metrics: bool = False
) -> Callable:
  """Mirrors `jax.value_and_grad`, with the gradient from `estimator`.

  Args:
    loss_fn: `loss_fn(params, *args, **kwargs) -> scalar`.
    estimator: from `fgjax.estimators` (jvp, spsa, backprop).
    with_metrics: also return the estimator's health metrics.

  Returns:
    `fn(params, *args, key, **kwargs) -> (loss, grads)`, or `(loss, grads, metrics)` with
    `with_metrics=True`. `key` is a keyword-only PRNG key (ignored by backprop).

  Example:
    >>> vg = fgjax.value_and_grad(loss_fn, fgjax.estimators.spsa(num_directions=4))
    >>> loss, grads = jax.jit(vg)(params, batch, key=jax.random.key(0))
  """

  @functools.wraps(loss_fn)
  def wrapped(params, *args, key=None, **kwargs):
    if key is None and not _is_exact(estimator):
      raise ValueError("key: a PRNG key is required by randomized estimators (jvp, spsa).")
    estimate = estimator(loss_fn, params, *args, key=key, **kwargs)
    if with_metrics:
      return estimate.value, estimate.grads, estimate.metrics
    return estimate.value, estimate.grads

  return wrapped


def _is_exact(estimator) -> bool:
  from fgjax.estimators import Backprop

  return isinstance(estimator, Backprop)
