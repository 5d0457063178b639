"""forward_gradient as an optax transform: composition, jit, extra args, training on real data."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn import datasets

import fgjax
from fgjax import testing


@pytest.fixture(scope="module")
def digits():
  data = datasets.load_digits()
  x = jnp.asarray(data.data[:512] / 16.0, jnp.float32)
  y = jnp.asarray(data.target[:512], jnp.int32)
  return x, y


def _train(estimator, optimizer, x, y, steps, seed=0):
  model = testing.TinyMLP(hidden=(), num_classes=10)  # Softmax regression on 64 pixels.
  params = model.init(jax.random.key(seed), x[:1])["params"]
  loss = testing.classification_loss(model, x, y)
  opt = optax.chain(fgjax.forward_gradient(estimator, seed=seed), optimizer)

  def step(carry, _):
    params, state = carry
    updates, state = opt.update(params, state, params, value_fn=loss)
    return (optax.apply_updates(params, updates), state), None

  (params, state), _ = jax.jit(lambda c: jax.lax.scan(step, c, None, length=steps))(
    (params, opt.init(params))
  )
  return float(loss(model.init(jax.random.key(seed), x[:1])["params"])), float(loss(params))


@pytest.mark.parametrize(
  ("estimator", "optimizer"),
  [
    (fgjax.estimators.spsa(8, epsilon=1e-2), optax.sgd(0.05)),
    (fgjax.estimators.spsa(8, epsilon=1e-2, sign=True), optax.sgd(0.03)),
    (fgjax.estimators.jvp(8), optax.sgd(0.05)),
    (fgjax.estimators.jvp(8), optax.adam(1e-2)),
  ],
  ids=["spsa_sgd", "sign_spsa_sgd", "jvp_sgd", "jvp_adam"],
)
def test_trains_a_classifier_on_digits(digits, estimator, optimizer):
  start, end = _train(estimator, optimizer, *digits, steps=300)
  assert end < 0.5 * start, (start, end)


def test_ignores_incoming_updates_and_keeps_key_in_state():
  loss = lambda p: jnp.sum(p["w"] ** 2)
  params = {"w": jnp.arange(3.0)}
  opt = fgjax.forward_gradient(fgjax.estimators.jvp(2))
  state = opt.init(params)
  a, state_a = opt.update({"w": jnp.full(3, 1e9)}, state, params, value_fn=loss)
  b, _ = opt.update({"w": jnp.zeros(3)}, state, params, value_fn=loss)
  np.testing.assert_array_equal(a["w"], b["w"])
  c, _ = opt.update(a, state_a, params, value_fn=loss)
  assert not np.array_equal(a["w"], c["w"])  # The key advanced: fresh directions.
  assert float(state_a.value) == pytest.approx(5.0)
  assert state_a.metrics["directional_derivatives"].shape == (2,)


def test_missing_value_fn_or_params_raise():
  params = {"w": jnp.ones(2)}
  opt = fgjax.forward_gradient(fgjax.estimators.spsa(1))
  state = opt.init(params)
  with pytest.raises(ValueError, match="value_fn"):
    opt.update(params, state, params)
  with pytest.raises(ValueError, match="params"):
    opt.update(params, state, value_fn=lambda p: jnp.sum(p["w"]))
  with pytest.raises(ValueError, match="estimator"):
    fgjax.forward_gradient("spsa")


def test_no_recompilation_on_second_step():
  loss = lambda p, x: jnp.sum((p["w"] * x) ** 2)
  opt = optax.chain(fgjax.forward_gradient(fgjax.estimators.spsa(2)), optax.sgd(0.1))
  params = {"w": jnp.ones(3)}
  state = opt.init(params)
  compiles = []

  @jax.jit
  def step(params, state, x):
    compiles.append(1)  # Runs only when tracing.
    updates, state = opt.update(params, state, params, value_fn=lambda p: loss(p, x))
    return optax.apply_updates(params, updates), state

  for i in range(3):
    params, state = step(params, state, jnp.full(3, float(i)))
  assert len(compiles) == 1
  assert step._cache_size() == 1


def test_works_with_inject_hyperparams():
  loss = lambda p: jnp.sum((p["w"] - 3.0) ** 2)
  params = {"w": jnp.zeros(4)}
  opt = optax.chain(
    optax.inject_hyperparams(fgjax.forward_gradient, static_args=("estimator",))(
      fgjax.estimators.jvp(4), seed=1
    ),
    optax.inject_hyperparams(optax.sgd)(learning_rate=0.05),
  )
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    updates, state = opt.update(params, state, params, value_fn=loss)
    return optax.apply_updates(params, updates), state

  for _ in range(200):
    params, state = step(params, state)
  state[1].hyperparams["learning_rate"] = 0.0  # Changing a hyperparameter needs no recompile.
  frozen, _ = step(params, state)
  np.testing.assert_array_equal(frozen["w"], params["w"])
  assert float(loss(params)) < 0.01 * 36.0


def test_composes_with_scale_by_sign_and_masks():
  loss = lambda p: jnp.sum((p["a"] - 1.0) ** 2) + jnp.sum((p["b"] - 1.0) ** 2)
  params = {"a": jnp.zeros(3), "b": jnp.zeros(3)}
  opt = optax.chain(
    fgjax.forward_gradient(fgjax.estimators.spsa(4, epsilon=0.1, mask={"a": True, "b": False})),
    optax.scale_by_sign(),
    optax.sgd(0.01),
  )
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    updates, state = opt.update(params, state, params, value_fn=loss)
    return optax.apply_updates(params, updates), state

  for _ in range(50):
    params, state = step(params, state)
  np.testing.assert_array_equal(params["b"], jnp.zeros(3))
  assert float(jnp.sum((params["a"] - 1.0) ** 2)) < 3.0 * 0.5
