"""Integer updates: saturation without wrap-around, rounding modes, the changed-fraction metric."""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fgjax
from fgjax import quant

# (dtype, bit width of the grid): 4-bit weights are held in int8.
GRIDS = [(np.int8, 8), (np.int16, 16), (np.int8, 4)]
SETTINGS = hypothesis.settings(max_examples=20, deadline=None, derandomize=True)


def _bound(bits):
  return 2 ** (bits - 1) - 1


SIZE = 16  # one shape, so each jitted function compiles once per grid


@st.composite
def _weights_and_updates(draw):
  dtype, bits = draw(st.sampled_from(GRIDS))
  bound = _bound(bits)
  # Bounds and their neighbours are likely draws; updates reach far beyond the range, so that
  # int8 + update would wrap without saturation.
  value = st.one_of(
    st.sampled_from([bound, bound - 1, -bound, -bound + 1, 0]), st.integers(-bound, bound)
  )
  values = draw(st.lists(value, min_size=SIZE, max_size=SIZE))
  limit = 3.0 * bound + 300
  update = st.floats(-limit, limit, allow_nan=False, width=32)
  updates = draw(st.lists(update, min_size=SIZE, max_size=SIZE))
  return np.array(values, dtype), np.array(updates, np.float32), bits


@functools.cache
def _jitted_apply(bits):
  return jax.jit(lambda p, u: fgjax.apply_integer_updates(p, u, bits))


@functools.cache
def _jitted_transform(rounding, bits):
  transform = fgjax.integer_updates(rounding, bits=bits)
  return transform, jax.jit(transform.update)


@SETTINGS
@hypothesis.given(_weights_and_updates())
def test_apply_integer_updates_saturates_and_never_wraps(case):
  values, updates, bits = case
  new = _jitted_apply(bits)({"w": jnp.asarray(values)}, {"w": jnp.asarray(updates)})
  new = np.asarray(new["w"])
  assert new.dtype == values.dtype
  bound = _bound(bits)
  expected = np.clip(values.astype(np.int64) + np.round(updates).astype(np.int64), -bound, bound)
  np.testing.assert_array_equal(new, expected)


@SETTINGS
@hypothesis.given(_weights_and_updates(), st.sampled_from(fgjax.transforms.ROUNDINGS))
def test_integer_updates_stay_on_the_grid(case, rounding):
  values, updates, bits = case
  params = {"w": jnp.asarray(values), "b": jnp.zeros((2,), jnp.float32)}
  transform, update_fn = _jitted_transform(rounding, bits)
  state = transform.init(params)
  float_updates = {"w": jnp.asarray(updates), "b": jnp.full((2,), 0.3, jnp.float32)}
  out, state = update_fn(float_updates, state, params)
  assert out["w"].dtype == jnp.int32
  np.testing.assert_array_equal(out["b"], float_updates["b"])  # float leaves untouched
  total = values.astype(np.int64) + np.asarray(out["w"], np.int64)
  bound = _bound(bits)
  assert np.all(np.abs(total) <= bound)
  # The rounded step is within one step of the update, except where it saturates.
  step = np.asarray(out["w"], np.float64)
  inside = np.abs(total) < bound
  assert np.all(np.abs(step - updates)[inside] <= 1.0)
  # Adding it with either apply function gives the same in-range integers, with no wrap.
  for applied in (
    _jitted_apply(bits)(params, out)["w"],
    optax.apply_updates(params, out)["w"],
  ):
    np.testing.assert_array_equal(applied, total.astype(values.dtype))


_SEEN = []


def _recording_loss(params):
  jax.debug.callback(lambda w: _SEEN.append(np.asarray(w)), params["w"])
  return jnp.sum(params["w"].astype(jnp.float32))


@functools.cache
def _jitted_spsa(dtype, distribution):
  # Integer epsilon with Rademacher (exactly +-eps steps), fractional with normal (round(eps z)).
  epsilon = 3.0 if distribution == "rademacher" else 2.6
  epsilon *= 1 if np.dtype(dtype).itemsize == 1 else 300  # reach the int16 bounds too
  estimator = fgjax.estimators.spsa(2, epsilon, distribution=distribution)
  return epsilon, jax.jit(lambda p, key: estimator(_recording_loss, p, key=key))


@SETTINGS
@hypothesis.given(
  case=_weights_and_updates(),
  seed=st.integers(0, 2**16),
  distribution=st.sampled_from(["rademacher", "normal"]),
)
def test_spsa_perturbation_saturates_at_the_integer_bounds(case, seed, distribution):
  values, _, bits = case
  dtype = values.dtype
  bound = _bound(jnp.iinfo(dtype).bits)  # the estimator knows the dtype, not a sub-byte width
  epsilon, estimate = _jitted_spsa(dtype.type, distribution)
  params = {"w": jnp.asarray(values)}
  key = jax.random.key(seed)
  _SEEN.clear()
  estimate(params, key)
  jax.effects_barrier()
  directions = fgjax.estimators.sample_directions(key, params, 2, distribution)
  assert len(_SEEN) == 4
  info = np.iinfo(dtype)
  for k, direction in enumerate(directions):
    step = np.round(epsilon * np.asarray(direction["w"], np.float32)).astype(np.int64)
    for sign, moved in ((1, _SEEN[2 * k]), (-1, _SEEN[2 * k + 1])):
      assert moved.dtype == dtype
      exact = values.astype(np.int64) + sign * step
      inside = np.abs(exact) <= bound
      np.testing.assert_array_equal(moved[inside], exact[inside])
      # Beyond the range: stuck at the bound on the same side (no wrap-around); the estimator may
      # use the dtype's own minimum (-2^{b-1}), which the quantized layers clip at read, as they
      # clip 4-bit weights held in int8 to +-7 (next test).
      assert np.all(moved[exact > bound] == info.max)
      assert np.all(np.isin(moved[exact < -bound], [-bound, info.min]))


def test_quantized_layer_clips_out_of_range_4_bit_weights_at_read():
  # 4-bit weights live in int8; a perturbation may leave +-7, but the layer reads clip(q, +-7).
  config = quant.preset("w4a8", weight_storage="integer")
  layer = quant.Dense(3, quant=config)
  x = jax.random.normal(jax.random.key(0), (4, 5))
  variables = layer.init(jax.random.key(1), x)
  kernel = jnp.array(np.arange(-7, 8).reshape(5, 3) * 9, jnp.int8)  # values up to +-63
  out_of_range = {**variables, "params": {**variables["params"], "kernel": kernel}}
  clipped = {**variables, "params": {**variables["params"], "kernel": jnp.clip(kernel, -7, 7)}}
  np.testing.assert_array_equal(layer.apply(out_of_range, x), layer.apply(clipped, x))


def test_stochastic_rounding_is_unbiased():
  size = 20_000
  fractions = jnp.array([0.1, 0.5, -0.3, 2.75, -1.2], jnp.float32)
  updates = jnp.tile(fractions, size // fractions.size)
  params = {"w": jnp.zeros(updates.shape, jnp.int16)}
  transform = fgjax.integer_updates("stochastic", seed=3)
  state = transform.init(params)
  out, state = transform.update({"w": updates}, state, params)
  steps = np.asarray(out["w"], np.float64).reshape(-1, fractions.size)
  count = steps.shape[0]
  frac = np.asarray(fractions) - np.floor(np.asarray(fractions))
  sigma = np.sqrt(frac * (1 - frac))  # a Bernoulli step on top of floor(u)
  assert np.all(np.abs(steps.mean(0) - np.asarray(fractions)) <= 5 * sigma / np.sqrt(count))
  # Each step is floor(u) or floor(u) + 1.
  assert np.all((steps == np.floor(fractions)) | (steps == np.floor(fractions) + 1))
  # A new key every step: the next draw differs.
  out2, _ = transform.update({"w": updates}, state, params)
  assert not np.array_equal(out["w"], out2["w"])


def test_error_feedback_accumulates_sub_step_updates():
  params = {"w": jnp.zeros((2,), jnp.int8)}
  updates = {"w": jnp.array([0.25, -0.25], jnp.float32)}
  feedback = fgjax.integer_updates("error_feedback")
  nearest = fgjax.integer_updates("nearest")
  fb_state, nn_state = feedback.init(params), nearest.init(params)
  fb_steps, nn_steps = [], []
  for _ in range(8):
    out, fb_state = feedback.update(updates, fb_state, params)
    fb_steps.append(np.asarray(out["w"]))
    params = fgjax.apply_integer_updates(params, out)
    out, nn_state = nearest.update(updates, nn_state, params)
    nn_steps.append(np.asarray(out["w"]))
  # r: .25, .5 (round half to even: 0), .75 -> 1 (r = -.25), 0, .25, .5, .75 -> 1, -.25 ...
  np.testing.assert_array_equal(np.array(fb_steps)[:, 0], [0, 0, 1, 0, 0, 0, 1, 0])
  np.testing.assert_array_equal(np.array(fb_steps)[:, 1], [0, 0, -1, 0, 0, 0, -1, 0])
  np.testing.assert_array_equal(params["w"], [2, -2])  # 8 x 0.25 = 2 steps
  np.testing.assert_allclose(fb_state.residual["w"], [0.0, 0.0])
  assert not np.any(nn_steps)  # nearest rounding drops every quarter step
  assert float(nn_state.changed_fraction) == 0.0


def test_error_feedback_residual_only_for_masked_integer_leaves():
  params = {"head": {"kernel": jnp.zeros((3, 2), jnp.int8)}, "body": jnp.zeros((4,), jnp.int16)}
  params["bias"] = jnp.zeros((2,), jnp.float32)
  state = fgjax.integer_updates("error_feedback", mask=fgjax.path_mask("head")).init(params)
  assert state.residual["head"]["kernel"].shape == (3, 2)
  assert isinstance(state.residual["body"], optax.MaskedNode)
  assert isinstance(state.residual["bias"], optax.MaskedNode)
  assert not jax.tree.leaves(fgjax.integer_updates("nearest").init(params).residual)


def test_changed_fraction_exact():
  old = {
    "a": jnp.array([1, 2, 3, 4], jnp.int8),
    "b": jnp.array([[0, 0], [5, 5]], jnp.int16),
    "bias": jnp.array([0.0, 1.0], jnp.float32),
  }
  new = {
    "a": jnp.array([1, 3, 3, 4], jnp.int8),
    "b": jnp.array([[0, -1], [5, 4]], jnp.int16),
    "bias": jnp.array([9.0, 9.0], jnp.float32),
  }
  # Integer leaves only by default: 3 of 8 changed (the float bias is not counted).
  assert float(fgjax.changed_fraction(old, new)) == 3 / 8
  assert float(fgjax.changed_fraction(old, new, mask=fgjax.path_mask("^a"))) == 1 / 4
  assert float(fgjax.changed_fraction(old, new, mask=fgjax.path_mask("bias"))) == 1.0
  assert float(fgjax.changed_fraction(old, old)) == 0.0


def test_transform_changed_fraction_matches_the_parameters():
  params = {"w": jnp.array([127, 0, 5, -127], jnp.int8), "b": jnp.zeros((3,), jnp.float32)}
  updates = {"w": jnp.array([3.0, 0.2, -0.7, -1.0]), "b": jnp.ones((3,))}
  transform = fgjax.integer_updates("nearest")
  out, state = transform.update(updates, transform.init(params), params)
  new = fgjax.apply_integer_updates(params, out)
  # 127 + 3 saturates (no change), 0.2 rounds away, -0.7 moves, -127 - 1 saturates.
  np.testing.assert_array_equal(new["w"], [127, 0, 4, -127])
  assert float(state.changed_fraction) == 0.25 == float(fgjax.changed_fraction(params, new))


def test_integer_updates_composes_with_forward_gradient_under_jit():
  target = jnp.array([40, -30, 10, 0, 25], jnp.int16)
  params = {"w": jnp.zeros((5,), jnp.int16)}

  def loss(p):
    return jnp.sum((p["w"].astype(jnp.float32) - target) ** 2)

  estimator = fgjax.estimators.spsa(4, 1.0, sign=True, distribution="rademacher")
  opt = optax.chain(fgjax.forward_gradient(estimator), optax.sgd(1.0), fgjax.integer_updates())
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    updates, state = opt.update(params, state, params, value_fn=loss)
    return fgjax.apply_integer_updates(params, updates), state

  start = loss(params)
  for _ in range(120):
    params, state = step(params, state)
  assert params["w"].dtype == jnp.int16
  assert float(loss(params)) < 0.2 * float(start)
  assert step._cache_size() == 1


def test_errors():
  with pytest.raises(ValueError, match="rounding"):
    fgjax.integer_updates("floor")
  params = {"w": jnp.zeros((2,), jnp.int8)}
  transform = fgjax.integer_updates()
  with pytest.raises(ValueError, match="params"):
    transform.update(params, transform.init(params))
  with pytest.raises(ValueError, match="bits"):
    fgjax.apply_integer_updates(params, params, bits=16)
