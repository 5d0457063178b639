"""`forward_gradient`: an estimator as the first link of an `optax.chain`."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fgjax import _masks


class ForwardGradientState(NamedTuple):
  """State of `forward_gradient`.

  Attributes:
    key: PRNG key of the next step's perturbations (each step splits it).
    value: the loss the last estimate saw (see `Estimate.value`), for logging at no extra forward.
    metrics: the last estimate's health metrics (see `fgjax.estimators.Estimate`).
  """

  key: jax.Array
  value: jax.Array
  metrics: dict[str, jax.Array]


def forward_gradient(estimator, seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """Replaces the incoming updates by the estimator's gradient estimate of `value_fn`.

  The incoming updates are ignored (pass zeros, or the parameters: nothing is read from them), so a
  training step needs no backward pass. Compose with any optax optimizer:

    >>> opt = optax.chain(fgjax.forward_gradient(fgjax.estimators.spsa(4)), optax.sgd(1e-2))
    >>> updates, state = opt.update(params, state, params, value_fn=lambda p: loss(p, batch))
    >>> params = optax.apply_updates(params, updates)

  Sign-m-SPSA with momentum, clipping or masks are ordinary optax links after this one. The design
  follows optax's Hutchinson estimator in `optax.contrib.sophia`: the key lives in the state, the
  objective arrives as an extra argument.

  Args:
    estimator: any estimator of `fgjax.estimators`.
    seed: seeds the PRNG key held in the state.

  Returns:
    An `optax.GradientTransformationExtraArgs`; `update(updates, state, params, *, value_fn)` with
    `value_fn(params) -> scalar loss`. Raises ValueError when `value_fn` or `params` is missing,
    and at `init` for integer (fixed-point) parameters: wrap the chain in
    `fgjax.integer_optimizer`, which keeps the optimizer state in float.
  """
  if not callable(estimator):
    raise ValueError(f"estimator: expected an estimator from fgjax.estimators, got {estimator!r}.")

  def init_fn(params) -> ForwardGradientState:
    integer = [
      _masks.path_to_str(path)
      for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
      if jnp.issubdtype(jnp.result_type(leaf), jnp.integer)
    ]
    if integer:
      # The optimizers after this link would keep integer states whose dtype changes at the
      # first float update (a TypeError in lax.scan, a retrace under jit).
      raise ValueError(
        f"params: integer leaves ({', '.join(integer[:3])}{', ...' if len(integer) > 3 else ''}) "
        "need float optimizer states: wrap the chain in fgjax.integer_optimizer(chain, "
        "scales=...)."
      )
    # Shapes of the metrics come from tracing the estimator once, on a constant loss.
    metrics = jax.eval_shape(
      lambda p: estimator(lambda q: jnp.zeros(()), p, key=jax.random.key(0)).metrics, params
    )
    return ForwardGradientState(
      key=jax.random.key(seed),
      value=jnp.zeros((), jnp.float32),
      metrics=jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics),
    )

  def update_fn(
    updates,
    state: ForwardGradientState,
    params=None,
    *,
    value_fn=None,
    integer_params=None,
    **extra: Any,
  ):
    del updates, extra  # The estimate replaces whatever came in.
    if integer_params is not None:
      # Under `fgjax.integer_optimizer`: `params` is the float view, the estimator perturbs the
      # integers themselves on their grid.
      params = integer_params
    if params is None:
      raise ValueError("params: forward_gradient needs the current parameters to perturb.")
    if value_fn is None:
      raise ValueError("value_fn: forward_gradient needs `value_fn(params) -> loss` in update().")
    key, step_key = jax.random.split(state.key)
    estimate = estimator(lambda p: value_fn(p), params, key=step_key)
    value = jnp.asarray(estimate.value, jnp.float32)
    return estimate.grads, ForwardGradientState(key, value, estimate.metrics)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
