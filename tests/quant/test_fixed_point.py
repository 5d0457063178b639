"""Fixed-point training: integer storage from float variables, integer forwards, QZO-FF updates."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fgjax
from fgjax import quant
from fgjax.models import MLP

HIDDEN = (32,)


@functools.cache
def _digits():
  from sklearn.datasets import load_digits

  raw = load_digits()
  x = (raw.images / 16.0).astype(np.float32).reshape(-1, 64)[:1000]
  return jnp.asarray(x), jnp.asarray(raw.target[:1000].astype(np.int32))


@functools.cache
def _float_variables():
  x, _ = _digits()
  return MLP(hidden_sizes=HIDDEN, num_classes=10).init(jax.random.key(0), x[:1])


def _fixed_point_loss(name):
  config = quant.preset(name)
  fixed = quant.to_fixed_point(_float_variables(), config)
  model = MLP(hidden_sizes=HIDDEN, num_classes=10, quant=quant.integer_storage(config))
  apply = quant.bind_frozen(model.apply, fixed.frozen)

  def loss(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y).mean()

  return fixed, apply, loss


@pytest.mark.parametrize("name,dtype", [("w16a8", jnp.int16), ("w8a8", jnp.int8)])
def test_to_fixed_point_matches_master_weight_forward(name, dtype):
  fixed, apply, _ = _fixed_point_loss(name)
  for layer in ("dense_0", "head"):
    assert fixed.params[layer]["kernel"].dtype == dtype
    assert fixed.params[layer]["bias"].dtype == jnp.float32
    scale = fixed.frozen["quant"][layer]["kernel_scale"]
    assert scale.dtype == jnp.float32 and scale.shape == (1, fixed.params[layer]["kernel"].shape[1])
  assert quant.integer_mask(fixed.params) == {
    "dense_0": {"kernel": True, "bias": False},
    "head": {"kernel": True, "bias": False},
  }
  # The master-weight model re-derives the same abs-max scales, hence the same integers.
  x, _ = _digits()
  master = MLP(
    hidden_sizes=HIDDEN,
    num_classes=10,
    quant=quant.master_weight_storage(quant.preset(name, weight_storage="integer")),
  )
  np.testing.assert_allclose(apply(fixed.params, x), master.apply(_float_variables(), x), atol=1e-5)
  # Dequantized weights are within half a step of the float ones.
  restored = quant.from_fixed_point(fixed.params, fixed.frozen)["params"]
  for layer in ("dense_0", "head"):
    error = jnp.abs(restored[layer]["kernel"] - _float_variables()["params"][layer]["kernel"])
    assert jnp.all(error <= fixed.frozen["quant"][layer]["kernel_scale"] / 2 + 1e-7)


@pytest.mark.parametrize("name,dtype", [("w16a8", "int16"), ("w8a8", "int8")])
def test_both_spsa_forward_calls_run_integer_matmuls(name, dtype):
  fixed, _, loss = _fixed_point_loss(name)
  x, y = _digits()
  estimator = fgjax.estimators.spsa(
    3, 1.0, sign=True, distribution="rademacher", mask=quant.integer_mask(fixed.params)
  )
  found = quant.contraction_operand_dtypes(
    lambda p: estimator(loss, p, x[:8], y[:8], key=jax.random.key(0)).grads, fixed.params
  )
  # The matmuls of the network contract the activation's features; the others are the float
  # outer products of the activation and weight scales, which contract an axis of size 1.
  matmuls = [dtypes for _, dtypes, shape in found if shape[-1] > 1]
  # Central SPSA: two forward calls per direction (the directions share one loop body), two layers.
  assert len(matmuls) == 2 * 2
  assert all(dtypes == (dtype, dtype, "int32") for dtypes in matmuls)


def _train(name, rounding, learning_rate, epsilon, steps, num_directions=4):
  fixed, apply, loss = _fixed_point_loss(name)
  x, y = _digits()
  mask = quant.integer_mask(fixed.params)
  estimator = fgjax.estimators.spsa(
    num_directions, epsilon, sign=True, distribution="rademacher", mask=mask
  )
  opt = optax.chain(
    fgjax.forward_gradient(estimator, seed=1),
    optax.sgd(learning_rate),
    fgjax.integer_updates(rounding, seed=2, mask=mask),
  )

  def step(carry, index):
    params, state = carry
    batch = jax.random.randint(jax.random.fold_in(jax.random.key(3), index), (64,), 0, x.shape[0])
    updates, state = opt.update(
      params, state, params, value_fn=lambda p: loss(p, x[batch], y[batch])
    )
    new = fgjax.apply_integer_updates(params, updates)
    return (new, state), (state[-1].changed_fraction, fgjax.changed_fraction(params, new, mask))

  (params, _), (from_state, from_params) = jax.jit(
    lambda p, s: jax.lax.scan(step, (p, s), jnp.arange(steps))
  )(fixed.params, opt.init(fixed.params))
  np.testing.assert_array_equal(from_state, from_params)  # the two metrics agree
  accuracy = jnp.mean(jnp.argmax(apply(params, x), -1) == y)
  return loss(fixed.params, x, y), loss(params, x, y), accuracy, from_state, params


def test_fixed_point_sign_spsa_lowers_the_loss_on_digits():
  # w16a8 integer weights, learning rate 1000 steps of 2^-15 (about 3% of max|w| per step).
  start, end, accuracy, changed, params = _train("w16a8", "nearest", 1000.0, 300.0, steps=250)
  assert params["head"]["kernel"].dtype == jnp.int16
  assert float(end) < 0.85 * float(start)
  assert float(accuracy) > 0.4  # chance: 0.1
  assert float(jnp.min(changed)) > 0.1


def test_w8a8_nearest_rounding_stalls_where_stochastic_rounding_moves():
  # An update of 0.1 step: nearest rounding drops it (the paper's w8a8 stall), stochastic and
  # error feedback (after 5+ steps) keep it.
  _, _, loss = _fixed_point_loss("w8a8")
  fixed = _fixed_point_loss("w8a8")[0]
  x, y = _digits()
  mask = quant.integer_mask(fixed.params)
  estimator = fgjax.estimators.spsa(4, 1.0, sign=True, distribution="rademacher", mask=mask)
  grads = jax.jit(lambda p: estimator(loss, p, x[:64], y[:64], key=jax.random.key(0)).grads)(
    fixed.params
  )
  float_updates = jax.tree.map(lambda g: -0.1 * g, grads)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(float_updates)) <= 0.1 + 1e-6
  fractions = {}
  for rounding in fgjax.transforms.ROUNDINGS:
    transform = fgjax.integer_updates(rounding, mask=mask)
    state, params = transform.init(fixed.params), fixed.params
    history = []
    for _ in range(6):
      updates, state = transform.update(float_updates, state, params)
      new = fgjax.apply_integer_updates(params, updates)
      history.append(float(fgjax.changed_fraction(params, new, mask)))
      params = new
    fractions[rounding] = history
  assert fractions["nearest"] == [0.0] * 6
  assert all(f > 0.0 for f in fractions["stochastic"])
  assert fractions["error_feedback"][:4] == [0.0] * 4 and fractions["error_feedback"][5] > 0.0
