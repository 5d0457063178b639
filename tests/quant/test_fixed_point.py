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
  model = MLP(hidden_sizes=HIDDEN, num_classes=10, quant=quant.integer_storage(config))
  x, _ = _digits()
  like = jax.eval_shape(model.init, jax.random.key(0), x[:1])
  fixed = quant.to_fixed_point(_float_variables(), config, like=like)
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


def _epsilon(fixed, steps=3.0):
  """An epsilon (weight units) of `steps` of the coarsest grid step, safely above half a step."""
  return steps * max(float(jnp.max(s)) for s in fixed.scales.values())


@pytest.mark.parametrize("name,planes", [("w16a8", 3), ("w8a8", 1)])
def test_both_spsa_forward_calls_run_integer_matmuls(name, planes):
  fixed, _, loss = _fixed_point_loss(name)
  x, y = _digits()
  estimator = fgjax.estimators.spsa(
    3,
    _epsilon(fixed),
    sign=True,
    distribution="rademacher",
    mask=quant.integer_mask(fixed.params),
    scales=fixed.scales,
  )
  found = quant.contraction_operand_dtypes(
    lambda p: estimator(loss, p, x[:8], y[:8], key=jax.random.key(0)).grads, fixed.params
  )
  # The matmuls of the network contract the activation's features; the others are the float
  # outer products of the activation and weight scales, which contract an axis of size 1.
  matmuls = [dtypes for _, dtypes, shape in found if shape[-1] > 1]
  # Central SPSA: two forward calls per direction (the directions share one loop body), two layers,
  # each an int8 x int8 -> int32 product per plane of the weight (16 bits: high, low, ones).
  assert len(matmuls) == 2 * 2 * planes
  assert all(dtypes == ("int8", "int8", "int32") for dtypes in matmuls)


def _train(name, rounding, learning_rate, epsilon, steps, num_directions=4):
  fixed, apply, loss = _fixed_point_loss(name)
  x, y = _digits()
  mask = quant.integer_mask(fixed.params)
  estimator = fgjax.estimators.spsa(
    num_directions, epsilon, sign=True, distribution="rademacher", scales=fixed.scales
  )
  # Kernels (integer) and biases (float) train together; epsilon and lr are in weight units.
  opt = fgjax.integer_optimizer(
    optax.chain(fgjax.forward_gradient(estimator, seed=1), optax.sgd(learning_rate)),
    scales=fixed.scales,
    rounding=rounding,
    seed=2,
    mask=mask,
  )

  def step(carry, index):
    params, state = carry
    batch = jax.random.randint(jax.random.fold_in(jax.random.key(3), index), (64,), 0, x.shape[0])
    updates, state = opt.update(
      params, state, params, value_fn=lambda p: loss(p, x[batch], y[batch])
    )
    new = fgjax.apply_integer_updates(params, updates)
    return (new, state), (state.integer.changed_fraction, fgjax.changed_fraction(params, new, mask))

  (params, _), (from_state, from_params) = jax.jit(
    lambda p, s: jax.lax.scan(step, (p, s), jnp.arange(steps))
  )(fixed.params, opt.init(fixed.params))
  np.testing.assert_array_equal(from_state, from_params)  # the two metrics agree
  accuracy = jnp.mean(jnp.argmax(apply(params, x), -1) == y)
  return loss(fixed.params, x, y), loss(params, x, y), accuracy, from_state, params


def test_fixed_point_sign_spsa_lowers_the_loss_on_digits():
  # w16a8 integer weights; learning rate and epsilon in weight units (max|w| is about 0.3).
  start, end, accuracy, changed, params = _train("w16a8", "nearest", 1e-2, 3e-3, steps=250)
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
  estimator = fgjax.estimators.spsa(
    4, _epsilon(fixed), sign=True, distribution="rademacher", mask=mask, scales=fixed.scales
  )
  grads = jax.jit(lambda p: estimator(loss, p, x[:64], y[:64], key=jax.random.key(0)).grads)(
    fixed.params
  )
  # A tenth of a grid step per weight (weight units: 0.1 s sign(g)).
  float_updates = {
    layer: {
      "kernel": -0.1 * fixed.scales[f"{layer}/kernel"] * jnp.sign(grads[layer]["kernel"]),
      "bias": jnp.zeros_like(grads[layer]["bias"]),
    }
    for layer in grads
  }
  fractions = {}
  for rounding in fgjax.transforms.ROUNDINGS:
    transform = fgjax.integer_updates(rounding, mask=mask, scales=fixed.scales)
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


def test_quantize_params_calibrates_on_the_layer_axes():
  # Before: a converted DenseGeneral((heads, head_dim)) got a (1, 1, head_dim) scale where the
  # layer's own init has (1, heads, head_dim).
  config = quant.preset("w8a8")
  layer = quant.DenseGeneral((2, 4), quant=quant.integer_storage(config))
  x = jnp.ones((3, 6))
  own = layer.init(jax.random.key(0), x)
  assert own["quant"]["kernel_scale"].shape == (1, 2, 4)
  kernel = jax.random.normal(jax.random.key(1), (6, 2, 4))
  converted = quant.quantize_params(
    {"params": {"kernel": kernel, "bias": jnp.zeros((2, 4))}}, config, like=own
  )
  scale = converted["quant"]["kernel_scale"]
  assert scale.shape == (1, 2, 4)
  np.testing.assert_allclose(scale, jnp.max(jnp.abs(kernel), axis=0, keepdims=True) / 127)
  layer.apply(converted, x)
  # Without like the last-axis default does not fit this layer, and the layer says so.
  wrong = quant.quantize_params({"params": {"kernel": kernel, "bias": jnp.zeros((2, 4))}}, config)
  with pytest.raises(ValueError, match="kernel_scale has shape"):
    layer.apply(wrong, x)
