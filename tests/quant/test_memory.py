"""Memory regression: a fixed-point training step holds the memory of the eval forward (issue 8.4).

XLA's compiled memory analysis is deterministic for a given jax version and backend, so the ratio
is asserted exactly as measured, with the issue's 1.1 bound: a refactor that brings back a
temporary the size of the parameters (a perturbed copy, a PRNG buffer, an int32 copy of the
weights hoisted out of the loop over directions, the integer steps of every weight) fails here.
"""

import jax
import jax.numpy as jnp
import optax
import pytest

import fgjax
from fgjax import models, quant


def _total(compiled) -> int:
  analysis = compiled.memory_analysis()
  return (
    analysis.argument_size_in_bytes
    + analysis.output_size_in_bytes
    + analysis.temp_size_in_bytes
    - analysis.alias_size_in_bytes
  )


@pytest.mark.parametrize("precision", ["w8a8", "w16a8"])
def test_fixed_point_spsa_step_holds_the_memory_of_the_eval_forward(precision):
  x = jnp.zeros((16, 256))
  y = jnp.zeros((16,), jnp.int32)
  float_model = models.MLP(hidden_sizes=(256, 256), num_classes=10)
  config = quant.preset(precision)
  model = models.MLP(hidden_sizes=(256, 256), num_classes=10, quant=quant.integer_storage(config))
  fixed = quant.to_fixed_point(float_model.init(jax.random.key(0), x), config)
  apply = quant.bind_frozen(model.apply, fixed.frozen)
  scales = fixed.scales
  epsilon = 3.0 * max(float(jnp.max(s)) for s in scales.values())

  def loss(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()

  estimator = fgjax.estimators.spsa(
    4, epsilon, sign=True, distribution="rademacher", chunk_size=1, scales=scales
  )
  opt = fgjax.integer_optimizer(
    optax.chain(fgjax.forward_gradient(estimator), optax.sgd(epsilon)),
    scales=scales,
    rounding="stochastic",
  )

  def step(p, state, x, y):
    updates, state = opt.update(p, state, p, value_fn=lambda q: loss(q, x, y))
    return fgjax.apply_integer_updates(p, updates), state

  forward = jax.jit(apply).lower(fixed.params, x).compile()
  state = jax.eval_shape(opt.init, fixed.params)
  training = jax.jit(step, donate_argnums=(0, 1)).lower(fixed.params, state, x, y).compile()
  ratio = _total(training) / _total(forward)
  assert ratio <= 1.1, f"{precision} SPSA + update step: {ratio:.2f} x the eval forward"
