"""Integer updates: saturation without wrap-around, rounding modes, the changed-fraction metric,
the integer optimizer wrapper, and the fixed-point defects of issue 8 (each a test that failed
before: silent fallbacks are now ValueErrors, the dtype carries the bit width)."""

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

# (dtype, bit width of the grid): the dtype is the bit width (4-bit weights are int4).
GRIDS = [(np.int8, 8), (np.int16, 16), (jnp.int4, 4)]
UNIT = {"w": jnp.ones((), jnp.float32)}  # grid step 1: weight units equal grid steps
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
def _jitted_apply():
  return jax.jit(fgjax.apply_integer_updates)


@functools.cache
def _jitted_transform(rounding):
  transform = fgjax.integer_updates(rounding, scales=UNIT)
  return transform, jax.jit(transform.update)


@SETTINGS
@hypothesis.given(_weights_and_updates())
def test_apply_integer_updates_saturates_and_never_wraps(case):
  values, updates, bits = case
  steps = jnp.asarray(np.round(updates), jnp.int32)
  new = _jitted_apply()({"w": jnp.asarray(values)}, {"w": steps})
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
  transform, update_fn = _jitted_transform(rounding)
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
  applied = [_jitted_apply()(params, out)["w"]]
  if bits > 4:  # jnp refuses implicit int4 promotion, so optax.apply_updates cannot add to int4
    applied.append(optax.apply_updates(params, out)["w"])
  for new in applied:
    np.testing.assert_array_equal(new, total.astype(values.dtype))


_SEEN = []


def _recording_loss(params):
  jax.debug.callback(lambda w: _SEEN.append(np.asarray(w)), params["w"])
  return jnp.sum(params["w"].astype(jnp.float32))


@functools.cache
def _jitted_spsa(dtype, distribution):
  # Integer epsilon with Rademacher (exactly +-eps steps), fractional with normal (round(eps z)).
  epsilon = 3.0 if distribution == "rademacher" else 2.6
  epsilon *= 1 if np.dtype(dtype).itemsize == 1 else 300  # reach the int16 bounds too
  estimator = fgjax.estimators.spsa(2, epsilon, distribution=distribution, scales=UNIT)
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
  bound = _bound(bits)  # the dtype is the width: int4 saturates at +-7
  epsilon, estimate = _jitted_spsa(dtype.type, distribution)
  params = {"w": jnp.asarray(values)}
  key = jax.random.key(seed)
  _SEEN.clear()
  estimate(params, key)
  jax.effects_barrier()
  directions = fgjax.estimators.sample_directions(key, params, 2, distribution)
  assert len(_SEEN) == 4
  info = jnp.iinfo(dtype)
  for k, direction in enumerate(directions):
    step = np.round(epsilon * np.asarray(direction["w"], np.float32)).astype(np.int64)
    for sign, moved in ((1, _SEEN[2 * k]), (-1, _SEEN[2 * k + 1])):
      assert moved.dtype == dtype
      exact = values.astype(np.int64) + sign * step
      inside = np.abs(exact) <= bound
      np.testing.assert_array_equal(moved[inside], exact[inside])
      # Beyond the range: stuck at the symmetric bound on the same side (no wrap-around).
      assert np.all(moved[exact > bound] == bound)
      assert np.all(moved[exact < -bound] == -bound)
      assert info.max >= bound


def test_stochastic_rounding_is_unbiased():
  size = 20_000
  fractions = jnp.array([0.1, 0.5, -0.3, 2.75, -1.2], jnp.float32)
  updates = jnp.tile(fractions, size // fractions.size)
  params = {"w": jnp.zeros(updates.shape, jnp.int16)}
  transform = fgjax.integer_updates("stochastic", seed=3, scales=UNIT)
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
  feedback = fgjax.integer_updates("error_feedback", scales=UNIT)
  nearest = fgjax.integer_updates("nearest", scales=UNIT)
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
  transform = fgjax.integer_updates("nearest", scales=UNIT)
  out, state = transform.update(updates, transform.init(params), params)
  new = fgjax.apply_integer_updates(params, out)
  # 127 + 3 saturates (no change), 0.2 rounds away, -0.7 moves, -127 - 1 saturates.
  np.testing.assert_array_equal(new["w"], [127, 0, 4, -127])
  assert float(state.changed_fraction) == 0.25 == float(fgjax.changed_fraction(params, new))


def test_integer_optimizer_composes_with_forward_gradient_under_jit():
  target = jnp.array([40, -30, 10, 0, 25], jnp.int16)
  params = {"w": jnp.zeros((5,), jnp.int16)}

  def loss(p):
    return jnp.sum((p["w"].astype(jnp.float32) - target) ** 2)

  estimator = fgjax.estimators.spsa(4, 1.0, sign=True, distribution="rademacher", scales=UNIT)
  opt = fgjax.integer_optimizer(
    optax.chain(fgjax.forward_gradient(estimator), optax.sgd(1.0)), scales=UNIT, rounding="nearest"
  )
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


# ----------------------------------------------------------------------------- issue 8 defects


def _quadratic(target):
  def loss(p):
    w = p["w"].astype(jnp.float32) * 0.01 + p["b"]  # w = s q with s = 0.01, plus a float bias
    return jnp.sum((w - target) ** 2)

  return loss


@pytest.mark.parametrize(
  "inner", [optax.adam(1e-2), optax.sgd(1e-2, momentum=0.9)], ids=["adam", "momentum"]
)
def test_any_optax_optimizer_runs_on_integer_weights_inside_scan(inner):
  # Before: optax states initialised on int16 params were int16 and changed dtype at the first
  # float update (TypeError inside lax.scan). Now the wrapper keeps them float32.
  target = jnp.array([0.3, -0.2, 0.1, 0.25], jnp.float32)
  scales = {"w": jnp.full((), 0.01, jnp.float32)}
  params = {"w": jnp.zeros((4,), jnp.int16), "b": jnp.zeros((4,), jnp.float32)}
  estimator = fgjax.estimators.spsa(4, 0.05, distribution="rademacher", scales=scales)
  opt = fgjax.integer_optimizer(
    optax.chain(fgjax.forward_gradient(estimator), inner), scales=scales, rounding="stochastic"
  )
  state = opt.init(params)
  assert all(
    leaf.dtype != jnp.int16 for leaf in jax.tree.leaves(state.inner) if hasattr(leaf, "dtype")
  )
  loss = _quadratic(target)

  def body(carry, _):
    params, state = carry
    updates, state = opt.update(params, state, params, value_fn=loss)
    return (fgjax.apply_integer_updates(params, updates), state), None

  (final, _), _ = jax.jit(lambda c: jax.lax.scan(body, c, None, length=150))((params, state))
  assert final["w"].dtype == jnp.int16
  assert float(loss(final)) < 0.1 * float(loss(params))
  assert float(jnp.max(jnp.abs(final["b"]))) > 0  # the float bias trained beside the integers


def test_float_optimizer_on_integer_leaves_is_refused():
  params = {"w": jnp.zeros((4,), jnp.int16), "b": jnp.zeros((4,), jnp.float32)}
  estimator = fgjax.estimators.spsa(2, 1.0, scales=UNIT)
  chain = optax.chain(fgjax.forward_gradient(estimator), optax.adam(1e-3), fgjax.integer_updates())
  with pytest.raises(ValueError, match="integer_optimizer"):
    chain.init(params)
  # A float update reaching an integer leaf (no integer link at the end) is refused too.
  with pytest.raises(ValueError, match="integer leaf 'w'"):
    fgjax.apply_integer_updates(params, {"w": jnp.ones((4,)), "b": jnp.ones((4,))})


def test_error_feedback_without_its_residual_is_refused():
  # Before: init on float params, update on integer params -> silent nearest rounding (four
  # updates of 0.25 left the weights at 0).
  transform = fgjax.integer_updates("error_feedback", scales=UNIT)
  state = transform.init({"w": jnp.zeros((2,), jnp.float32)})
  with pytest.raises(ValueError, match="no residual"):
    transform.update({"w": jnp.full((2,), 0.25)}, state, {"w": jnp.zeros((2,), jnp.int8)})


def test_four_bit_weights_saturate_at_seven():
  # Before: 4-bit weights held in int8 saturated at +-127: [7, 6, -7] + [5, 3, -4] = [12, 9, -11].
  params = {"w": jnp.array([7, 6, -7], jnp.int4)}
  new = fgjax.apply_integer_updates(params, {"w": jnp.array([5, 3, -4], jnp.int32)})
  np.testing.assert_array_equal(np.asarray(new["w"], np.int32), [7, 7, -7])
  transform = fgjax.integer_updates("nearest", scales=UNIT)
  out, state = transform.update({"w": jnp.array([5.0, 3.0, -4.0])}, transform.init(params), params)
  np.testing.assert_array_equal(out["w"], [0, 1, 0])  # only the move the forward sees
  assert float(state.changed_fraction) == pytest.approx(1 / 3)
  with pytest.raises(ValueError, match=r"\(4, 8, 16\)"):
    quant.preset("w8a8", weight_bits=6, weight_storage="integer")


def test_epsilon_below_half_a_grid_step_is_refused():
  # Before: round(1e-3 z) = 0 on an integer leaf, an exactly zero estimate, silently.
  with pytest.raises(ValueError, match="half a grid step"):
    fgjax.estimators.spsa(4, epsilon=1e-3, scales={"w": jnp.full((1, 3), 0.004)})
  fgjax.estimators.spsa(4, epsilon=3e-3, scales={"w": jnp.full((1, 3), 0.004)})
  # An integer leaf without its grid step: the estimator cannot know what epsilon means there.
  params = {"w": jnp.zeros((3,), jnp.int8)}
  with pytest.raises(ValueError, match="scales"):
    fgjax.estimators.spsa(2, 1.0)(lambda p: jnp.sum(p["w"]), params, key=jax.random.key(0))
  transform = fgjax.integer_updates("nearest")
  with pytest.raises(ValueError, match="scales"):
    transform.update({"w": jnp.ones((3,))}, transform.init(params), params)


def test_precision_change_keeps_the_step_in_weight_space():
  # The same epsilon and learning rate (weight units) at w16a8 and w8a8: the perturbation and
  # the update move w = s q by the same amount, to within half a grid step.
  kernel = jax.random.normal(jax.random.key(0), (64, 8)) * 0.2
  moves = {}
  for name in ("w16a8", "w8a8"):
    fixed = quant.to_fixed_point({"params": {"d": {"kernel": kernel}}}, quant.preset(name))
    scale = fixed.scales["d/kernel"]
    estimator = fgjax.estimators.spsa(1, 0.05, distribution="rademacher", scales=fixed.scales)
    seen = []

    def loss(p, estimator=estimator, scale=scale, seen=seen):
      jax.debug.callback(lambda w: seen.append(np.asarray(w)), p["d"]["kernel"])
      return jnp.sum(p["d"]["kernel"].astype(jnp.float32) * scale)

    estimator(loss, fixed.params, key=jax.random.key(1))
    jax.effects_barrier()
    moved = seen[0].astype(np.float32)
    delta = moved - np.asarray(fixed.params["d"]["kernel"], np.float32)
    inside = np.abs(moved) < quant.max_int(quant.bits_of(fixed.params["d"]["kernel"].dtype))
    moves[name] = ((delta * np.asarray(scale))[inside], float(np.max(scale)))
  for move, step in moves.values():
    assert move.size > 400  # all but the few weights pushed against the bounds
    np.testing.assert_allclose(np.abs(move), 0.05, atol=step / 2 + 1e-7)


def test_estimate_credits_the_move_actually_made():
  # At the bound a perturbation cannot move up; the estimate's direction is what really moved.
  scales = {"w": jnp.ones((), jnp.float32)}
  params = {"w": jnp.array([127, 0, -127, 5], jnp.int8)}
  weights = jnp.array([1.0, 2.0, -1.0, 0.5])
  loss = lambda p: jnp.sum(p["w"].astype(jnp.float32) * weights)  # linear: exact differences
  key = jax.random.key(0)
  estimate = fgjax.estimators.spsa(1, 3.0, distribution="rademacher", scales=scales)(
    loss, params, key=key
  )
  (z,) = fgjax.estimators.sample_directions(key, params, 1, "rademacher")
  r = 3 * np.asarray(z["w"], np.int64)
  q = np.asarray(params["w"], np.int64)
  up, down = np.clip(q + r, -127, 127), np.clip(q - r, -127, 127)
  credited = (up - down) / 6.0
  derivative = float(np.sum(np.asarray(weights) * (up - down)) / 6.0)
  np.testing.assert_allclose(estimate.grads["w"], derivative * credited, rtol=1e-6)


def test_errors():
  with pytest.raises(ValueError, match="rounding"):
    fgjax.integer_updates("floor")
  params = {"w": jnp.zeros((2,), jnp.int8)}
  transform = fgjax.integer_updates(scales=UNIT)
  with pytest.raises(ValueError, match="params"):
    transform.update(params, transform.init(params))
  with pytest.raises(ValueError, match="scales"):
    fgjax.integer_optimizer(optax.sgd(1.0), scales=None)
  with pytest.raises(ValueError, match="epsilon"):
    fgjax.estimators.spsa(2, float("nan"))


def test_changed_fraction_of_a_large_leaf_is_estimated_on_a_sample():
  # 200 x 300 = 60,000 weights > CHANGED_FRACTION_SAMPLE: counted on a strided sample, whose
  # fraction is within 5 sigma of the exact one (binomial, n = the sample size).
  params = {"w": jnp.zeros((200, 300), jnp.int8)}
  updates = {"w": jax.random.uniform(jax.random.key(0), (200, 300), minval=-1.0, maxval=1.0)}
  transform = fgjax.integer_updates("stochastic", scales={"w": jnp.float32(1.0)})
  out, state = transform.update(updates, transform.init(params), params)
  exact = float(fgjax.changed_fraction(params, fgjax.apply_integer_updates(params, out)))
  n = fgjax.transforms._integer._strided(params["w"]).shape[0]  # 4,000 of 60,000
  assert abs(float(state.changed_fraction) - exact) <= 5 * np.sqrt(exact * (1 - exact) / n)
  assert 0.4 < exact < 0.6  # E = mean |u| = 1/2
