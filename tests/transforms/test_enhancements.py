"""Sharpness-aware estimates and schedules of m: each does what its docstring says."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn import datasets

import fgjax
from fgjax.transforms import _sharpness

RHO = 0.1


def _quartic(params):
  w, b = params["w"], params["b"]
  return jnp.sum(0.5 * jnp.arange(1.0, 6.0) * w**2 + 0.25 * w**4) + jnp.sum((b - 1.0) ** 2)


def _params():
  return {"w": jnp.array([0.5, -1.0, 2.0, 0.3, -0.7]), "b": jnp.array([0.2, 0.4])}


def test_sharpness_aware_with_backprop_is_sam():
  params = _params()
  grad = jax.grad(_quartic)(params)
  norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grad)))
  neighbour = jax.tree.map(lambda p, g: p + RHO * g / norm, params, grad)
  est = fgjax.sharpness_aware(fgjax.estimators.backprop(), rho=RHO)
  estimate = jax.jit(lambda p: est(_quartic, p))(params)
  np.testing.assert_allclose(estimate.value, _quartic(params), rtol=1e-6)
  for got, want in zip(
    jax.tree.leaves(estimate.grads), jax.tree.leaves(jax.grad(_quartic)(neighbour)), strict=True
  ):
    np.testing.assert_allclose(got, want, rtol=1e-5)
  # "sharpness" is L(ŵ) − L(w) = ρ‖∇L‖ + O(ρ²).
  np.testing.assert_allclose(estimate.metrics["ascent_norm"], norm, rtol=1e-6)
  sharpness = _quartic(neighbour) - _quartic(params)
  np.testing.assert_allclose(estimate.metrics["sharpness"], sharpness, rtol=1e-5)
  assert abs(sharpness - RHO * norm) < 0.1 * RHO * norm


def test_sharpness_aware_moves_only_the_mask():
  params = _params()
  mask = fgjax.path_mask(r"^w$")
  grad_w = jax.grad(_quartic)(params)["w"]
  neighbour = dict(params, w=params["w"] + RHO * grad_w / jnp.linalg.norm(grad_w))
  estimate = fgjax.sharpness_aware(fgjax.estimators.backprop(mask=mask), rho=RHO)(_quartic, params)
  np.testing.assert_allclose(estimate.grads["w"], jax.grad(_quartic)(neighbour)["w"], rtol=1e-5)
  np.testing.assert_array_equal(estimate.grads["b"], 0.0)


@pytest.mark.parametrize("sign", [False, True], ids=["spsa", "sign_spsa"])
def test_rho_zero_is_the_inner_estimate(sign):
  inner = fgjax.estimators.spsa(3, epsilon=1e-3, sign=sign)
  key = jax.random.key(7)
  want = jax.jit(lambda p: inner(_quartic, p, key=key))(_params())
  sam = fgjax.sharpness_aware(inner, rho=0.0)
  got = jax.jit(lambda p: sam(_quartic, p, key=key))(_params())
  for a, b in zip(jax.tree.leaves(got.grads), jax.tree.leaves(want.grads), strict=True):
    np.testing.assert_array_equal(a, b)


def test_sharpness_aware_costs_twice_the_inner_forward_calls():
  def loss(params):
    return _quartic(params) + 0.0 * jnp.cbrt(params["b"][0])  # cbrt marks one forward call

  def calls(jaxpr, times=1):
    # A scan body runs `length` times (spsa runs its +ε and -ε forwards as one 2-step scan).
    count = 0
    for eqn in jaxpr.eqns:
      count += times * (eqn.primitive.name == "cbrt")
      repeat = times * int(eqn.params.get("length", 1)) if eqn.primitive.name == "scan" else times
      for param in eqn.params.values():
        for value in param if isinstance(param, tuple | list) else (param,):
          inner = getattr(value, "jaxpr", value)
          if hasattr(inner, "eqns"):
            count += calls(inner, repeat)
    return count

  def forward_calls(est):
    return calls(jax.make_jaxpr(lambda p: est(loss, p, key=jax.random.key(0)))(_params()).jaxpr)

  inner = fgjax.estimators.spsa(1)
  assert forward_calls(inner) == 2
  assert forward_calls(fgjax.sharpness_aware(inner, rho=RHO)) == 4


def test_integer_ascent_is_on_the_grid_and_unbiased():
  """ŵ = w + ρ ĝ/‖ĝ‖ in expectation: stochastic rounding of the move on each leaf's grid."""
  step = 0.01
  q = jnp.array([0, 5, -3, 32766, -32766], jnp.int16)
  grads = {"q": jnp.array([0.3, -0.2, 0.05, 1.0, -1.0])}
  norm = float(jnp.linalg.norm(grads["q"]))
  sam = fgjax.sharpness_aware(fgjax.estimators.spsa(1), rho=0.02, scales={"q": step})
  factor = jnp.asarray(0.02 / norm)
  num = 4000
  moved = jax.jit(jax.vmap(lambda k: sam._move({"q": q}, grads, factor, k)["q"]))(
    jax.random.split(jax.random.key(0), num)
  )
  assert moved.dtype == jnp.int16
  assert int(jnp.max(moved)) <= 32767 and int(jnp.min(moved)) >= -32767
  steps = (moved.astype(jnp.float32) - q.astype(jnp.float32))[:, :3]
  want = 0.02 * grads["q"][:3] / norm / step
  # Each coordinate is Bernoulli around its fractional part: σ <= 1/2 step.
  np.testing.assert_array_less(jnp.abs(steps.mean(0) - want), 5 * 0.5 / np.sqrt(num))
  # Saturation: the weights at the bounds only move inwards or stay.
  assert int(moved[:, 3].max()) == 32767 and int(moved[:, 4].min()) == -32767


def test_integer_leaf_without_scale_is_refused():
  sam = fgjax.sharpness_aware(fgjax.estimators.backprop(), rho=RHO)
  with pytest.raises(ValueError, match="scales"):
    sam._move({"q": jnp.zeros(3, jnp.int8)}, {"q": jnp.ones(3)}, jnp.asarray(1.0), None)


@pytest.mark.parametrize(
  ("factory", "kwargs"),
  [
    (fgjax.sharpness_aware, {"estimator": None}),
    (fgjax.sharpness_aware, {"estimator": fgjax.estimators.spsa(1), "rho": -0.1}),
    (fgjax.sharpness_aware, {"estimator": fgjax.estimators.spsa(1), "rho": float("nan")}),
    (fgjax.num_directions_schedule, {"estimator": fgjax.estimators.spsa(1), "boundaries": []}),
    (
      fgjax.num_directions_schedule,
      {"estimator": fgjax.estimators.spsa(1), "boundaries": [(1, 2)]},
    ),
    (
      fgjax.num_directions_schedule,
      {"estimator": fgjax.estimators.spsa(1), "boundaries": [(0, 1), (0, 2)]},
    ),
    (
      fgjax.num_directions_schedule,
      {"estimator": fgjax.estimators.spsa(1), "boundaries": [(0, 0)]},
    ),
    (
      fgjax.num_directions_schedule,
      {"estimator": fgjax.estimators.backprop(), "boundaries": [(0, 1)]},
    ),
    (fgjax.num_directions_on_plateau, {"estimator": fgjax.estimators.spsa(1), "levels": ()}),
    (fgjax.num_directions_on_plateau, {"estimator": fgjax.estimators.spsa(1), "patience": 0}),
    (
      fgjax.num_directions_on_plateau,
      {"estimator": fgjax.estimators.spsa(1), "min_improvement": 1.0},
    ),
    (fgjax.num_directions_on_plateau, {"estimator": fgjax.estimators.spsa(1), "smoothing": 1.0}),
  ],
)
def test_bad_arguments_raise(factory, kwargs):
  with pytest.raises(ValueError):
    factory(**kwargs)


def _run(opt, params_at, value_fn, steps):
  """Runs `steps` updates of `opt` with params_at(t) as the parameters; returns the states."""
  state = opt.init(params_at(0))
  update = jax.jit(lambda p, s: opt.update(p, s, p, value_fn=value_fn))
  states, updates = [], []
  for t in range(steps):
    u, state = update(params_at(t), state)
    states.append(state)
    updates.append(u)
  return states, updates, update


def test_fixed_schedule_uses_m_by_step_and_matches_the_plain_estimator():
  est = fgjax.estimators.spsa(1, epsilon=1e-3)
  boundaries = [(0, 1), (2, 3), (4, 2)]
  opt = fgjax.num_directions_schedule(est, boundaries, seed=3)
  states, updates, update = _run(opt, lambda t: _params(), _quartic, 6)
  used = [int(s.metrics["num_directions"]) for s in states]
  assert used == [1, 1, 3, 3, 2, 2]
  assert update._cache_size() == 1  # one compilation across every level
  # Step t's estimate is spsa(m_t) at forward_gradient's key for step t (same key chain); the
  # tolerance is float32 rounding of L ~ 10 over 2ε (another key would be off by O(1)).
  key = jax.random.key(3)
  for t, m in enumerate(used):
    key, step_key = jax.random.split(key)
    want = jax.jit(lambda p, k, m=m: fgjax.estimators.spsa(m, epsilon=1e-3)(_quartic, p, key=k))(
      _params(), step_key
    ).grads
    for a, b in zip(jax.tree.leaves(updates[t]), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-3)
  # Metrics are padded to the largest level: K = 3 derivatives, zeros beyond m.
  assert states[4].metrics["directional_derivatives"].shape == (3,)
  assert float(states[4].metrics["directional_derivatives"][2]) == 0.0


def test_plateau_grows_m_after_patience_steps_without_progress():
  est = fgjax.estimators.spsa(1)
  opt = fgjax.num_directions_on_plateau(est, (1, 2, 4), patience=3, smoothing=0.5)
  states, _, update = _run(opt, lambda t: _params(), lambda p: jnp.float32(1.0), 11)
  used = [int(s.metrics["num_directions"]) for s in states]
  # Step 1 sets the best; 3 steps without progress move to the next level, which starts afresh.
  assert used == [1, 1, 1, 1, 2, 2, 2, 4, 4, 4, 4]
  assert update._cache_size() == 1


def test_plateau_keeps_m_while_the_loss_improves():
  est = fgjax.estimators.spsa(1)
  opt = fgjax.num_directions_on_plateau(est, (1, 4), patience=2, min_improvement=0.05)
  shrinking = lambda t: jax.tree.map(lambda x: x * 0.8**t, _params())
  states, _, _ = _run(opt, shrinking, lambda p: jnp.sum(p["w"] ** 2), 12)
  assert [int(s.level) for s in states] == [0] * 12


@pytest.fixture(scope="module")
def digits():
  data = datasets.load_digits()
  x = jnp.asarray(data.data[:256] / 16.0, jnp.float32)
  y = jnp.asarray(data.target[:256], jnp.int32)
  return x, y


def test_composes_with_sign_spsa_masks_and_integer_weights(digits):
  """Softmax regression with an int8 kernel: SAM inside an m schedule inside integer_optimizer."""
  x, y = digits
  step = 0.02  # grid step of the kernel (±127 steps = ±2.54)
  params = {"kernel": jnp.zeros((64, 10), jnp.int8), "bias": jnp.zeros(10)}
  scales = {"kernel": jnp.asarray(step)}

  def loss(p):
    logits = x @ (p["kernel"].astype(jnp.float32) * step) + p["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  est = fgjax.estimators.spsa(
    1,
    epsilon=0.03,
    sign=True,
    distribution="rademacher",
    mask=fgjax.path_mask("kernel"),
    scales=scales,
  )
  sam = fgjax.sharpness_aware(est, rho=0.05)
  schedule = fgjax.num_directions_on_plateau(sam, (2, 4), patience=20)
  opt = fgjax.integer_optimizer(
    optax.chain(schedule, optax.sgd(0.01)), scales=scales, rounding="stochastic"
  )

  def body(carry, _):
    p, s = carry
    updates, s = opt.update(p, s, p, value_fn=loss)
    return (fgjax.apply_integer_updates(p, updates), s), None

  (trained, _), _ = jax.jit(lambda c: jax.lax.scan(body, c, None, length=150))(
    (params, opt.init(params))
  )
  assert trained["kernel"].dtype == jnp.int8
  np.testing.assert_array_equal(trained["bias"], 0.0)  # masked out: never moved
  assert float(loss(trained)) < 0.8 * float(loss(params)), (loss(params), loss(trained))


def test_forward_gradient_accepts_sharpness_aware():
  opt = optax.chain(
    fgjax.forward_gradient(fgjax.sharpness_aware(fgjax.estimators.jvp(2), rho=RHO)),
    optax.sgd(0.05),
  )

  def body(carry, _):
    params, state = carry
    updates, state = opt.update(params, state, params, value_fn=_quartic)
    return (optax.apply_updates(params, updates), state), None

  (params, state), _ = jax.lax.scan(body, (_params(), opt.init(_params())), None, length=30)
  assert float(_quartic(params)) < 0.5 * float(_quartic(_params()))
  assert "sharpness" in state[0].metrics


def test_with_num_directions_reaches_inside_wrappers():
  sam = fgjax.sharpness_aware(fgjax.estimators.jvp(2), rho=RHO)
  assert fgjax.transforms.with_num_directions(sam, 5).estimator.num_directions == 5
  assert isinstance(fgjax.transforms.with_num_directions(sam, 5), _sharpness.SharpnessAware)
