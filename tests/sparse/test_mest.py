"""MEST as an optax transform: soft memory bound, mutation schedule, masked updates, sparse SPSA."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fgjax
from fgjax import sparse

PARAMS = {
  "a": {"kernel": jnp.linspace(-1.0, 1.0, 12 * 10).reshape(12, 10), "bias": jnp.ones((10,))},
  "b": {"kernel": jnp.linspace(0.5, -0.5, 3 * 3 * 2 * 8).reshape(3, 3, 2, 8)},
}


def _loss(params):
  # A smooth non-quadratic loss, so gradients change as weights move.
  return sum(jnp.sum(jnp.cosh(x - 0.3)) for x in jax.tree.leaves(params))


def _run(opt, steps, estimator=False, params=PARAMS):
  """Runs `steps` jitted updates; returns the masks and parameters after each one."""
  state = opt.init(params)
  params = sparse.apply_masks(params, state.masks)

  @jax.jit
  def step(params, state):
    grads = None if estimator else jax.grad(_loss)(params)
    updates, state = opt.update(grads, state, params, value_fn=_loss)
    return optax.apply_updates(params, updates), state, updates

  history = [(state.masks, params, None)]
  for _ in range(steps):
    params, state, updates = step(params, state)
    history.append((state.masks, params, updates))
  return history


def _unit_counts(masks, scheme, block_shape):
  counts = {}
  for path, mask in jax.tree_util.tree_flatten_with_path(masks)[0]:
    if mask.ndim == 0:
      continue
    view = sparse.UnitView(mask.shape, scheme, block_shape)
    units = np.asarray(view.reduce(mask.astype(jnp.float32)) > 0)
    # A unit is all on or all off.
    np.testing.assert_array_equal(np.asarray(view.expand(jnp.asarray(units))), np.asarray(mask))
    counts[jax.tree_util.keystr(path)] = (int(units.sum()), view.num_units)
  return counts


@pytest.mark.parametrize("scheme", ["unstructured", "block", "channel"])
def test_density_stays_within_the_soft_bound_and_returns_to_the_target(scheme):
  density, interval, soft, steps = 0.25, 8, 3, 40
  schedule = sparse.decaying_ratio(0.25, total_steps=steps, num_stages=3)
  opt = sparse.mest(
    optax.sgd(0.05),
    density=density,
    scheme=scheme,
    block_shape=(2, 2),
    mutation_interval=interval,
    mutation_ratio=schedule,
    soft_bound_steps=soft,
  )
  history = _run(opt, steps)
  grown_any = False
  for t, (masks, _, _) in enumerate(history):
    # masks after t updates; the update at step s = t - 1 grows if s is a positive multiple of the
    # interval, and the window lasts until step s + soft prunes back.
    last_grow = ((t - 1) // interval) * interval
    in_window = last_grow > 0 and last_grow < t <= last_grow + soft
    for name, (active, units) in _unit_counts(masks, scheme, (2, 2)).items():
      budget = max(1, round(density * units))
      bound = budget + round(float(schedule(last_grow)) * units) if in_window else budget
      assert active <= bound, (t, name, active, bound)
      if not in_window:
        assert active == budget, (t, name, active, budget)
      grown_any |= active > budget
  assert grown_any  # The soft bound was used.
  masks = history[-1][0]
  counts = _unit_counts(masks, scheme, (2, 2))
  assert all(a == max(1, round(density * n)) for a, n in counts.values())
  assert _loss(history[-1][1]) < _loss(history[0][1]) - 1.0  # it trains while sparse


def test_mutation_ratio_follows_its_schedule():
  interval, steps = 5, 30
  schedule = sparse.decaying_ratio(0.2, total_steps=steps, num_stages=3)
  np.testing.assert_allclose(
    [float(schedule(s)) for s in (0, 9, 10, 19, 20, 29)], [0.2] * 2 + [0.1] * 2 + [0.0] * 2
  )
  opt = sparse.mest(
    optax.sgd(0.05), density=0.3, mutation_interval=interval, mutation_ratio=schedule
  )
  history = _run(opt, steps)
  for t in range(1, steps + 1):
    step = t - 1  # the update that produced history[t]
    for old, new in zip(
      jax.tree.leaves(history[t - 1][0]), jax.tree.leaves(history[t][0]), strict=True
    ):
      if old.ndim == 0:
        continue
      old, new = np.asarray(old), np.asarray(new)
      assert new.sum() == old.sum()  # No soft bound: the density is constant.
      swapped = int((new & ~old).sum())
      expected = round(float(schedule(step)) * old.size) if step > 0 and step % interval == 0 else 0
      assert swapped == expected, (step, swapped, expected)


def test_fixed_random_mask_never_changes():
  history = _run(sparse.mest(optax.sgd(0.05), density=0.2, mutation_interval=3), 10)
  for masks, _, _ in history[1:]:
    for a, b in zip(jax.tree.leaves(history[0][0]), jax.tree.leaves(masks), strict=True):
      np.testing.assert_array_equal(a, b)


def test_inactive_weights_get_zero_updates_and_are_never_perturbed():
  seen = []

  def loss(params):
    # Records every parameter value the model reads (also inside the estimator's forward calls).
    jax.debug.callback(lambda tree: seen.append(jax.tree.map(np.asarray, tree)), params)
    return _loss(params)

  estimator = fgjax.estimators.spsa(2, epsilon=1e-2, mask=fgjax.path_mask(r"^a/"))
  opt = sparse.mest(
    optax.sgd(0.01),
    density=0.2,
    estimator=estimator,
    mutation_interval=4,
    mutation_ratio=0.1,
    soft_bound_steps=2,
  )
  state = opt.init(PARAMS)
  params = sparse.apply_masks(PARAMS, state.masks)
  step = jax.jit(lambda p, s: opt.update(None, s, p, value_fn=loss))
  for _ in range(9):
    masks = state.masks
    seen.clear()
    updates, state = step(params, state)
    jax.effects_barrier()
    assert len(seen) == 4  # two directions, two forward calls each
    for tree in seen:
      for x, m in zip(jax.tree.leaves(tree), jax.tree.leaves(masks), strict=True):
        assert np.all(np.where(np.asarray(m), True, x == 0))  # inactive: read as exact zeros
      # Leaf "b" is outside the estimator's mask: never perturbed.
      np.testing.assert_array_equal(tree["b"]["kernel"], params["b"]["kernel"])
    for u, m in zip(jax.tree.leaves(updates), jax.tree.leaves(masks), strict=True):
      assert np.all(np.where(np.asarray(m), True, np.asarray(u) == 0))
    np.testing.assert_array_equal(updates["b"]["kernel"], 0.0)
    params = optax.apply_updates(params, updates)
    for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(state.masks), strict=True):
      assert np.all(np.where(np.asarray(m), True, np.asarray(x) == 0))


def test_sparse_spsa_is_unbiased_on_the_active_coordinates():
  dim, num = 40, 4000
  w = jnp.linspace(-1.0, 1.0, dim)
  mask = jnp.asarray(np.random.default_rng(0).random(dim) < 0.25)
  loss = lambda p: jnp.log(jnp.sum(jnp.exp(p["w"]))) + 0.5 * jnp.sum(p["w"] ** 2)
  params = {"w": w}
  masks = {"w": mask}
  reference = jax.grad(lambda p: loss(sparse.apply_masks(p, masks)))(params)["w"]
  estimator = fgjax.estimators.spsa(1, epsilon=1e-3)

  def estimates(masks):
    keys = jax.random.split(jax.random.key(0), num)
    one = lambda k: sparse.sparse_estimate(estimator, loss, params, masks, key=k).grads["w"]
    return jax.jit(jax.vmap(one))(keys)

  sparse_g = np.asarray(estimates(masks))
  assert np.all(sparse_g[:, ~np.asarray(mask)] == 0)  # exact zeros off the mask
  mean, std = sparse_g.mean(0), sparse_g.std(0)
  active = np.asarray(mask)
  # Unbiased on the active coordinates: the mean of N estimates within 4.5 sigma / sqrt(N).
  bound = 4.5 * std[active] / np.sqrt(num)
  assert np.all(np.abs(mean[active] - reference[active]) <= bound), (mean, reference)
  # Variance scales with the active weights: E|g_hat|^2 = (n + 2)|g|^2 for n perturbed coordinates.
  dense_g = np.asarray(estimates({"w": jnp.ones(dim, bool)}))[:, active]
  n_active, g_active = int(active.sum()), np.asarray(reference)[active]
  ratio = np.mean(np.sum(sparse_g[:, active] ** 2, 1)) / np.mean(np.sum(dense_g**2, 1))
  # Dense directions estimate every coordinate; restricted to the active ones the second moment is
  # (|g|^2 + 2|g_a|^2)-ish per direction; the sparse one is (n_a + 2)|g_a|^2 in total.
  full = np.asarray(jax.grad(loss)(params)["w"])
  expected = (
    (n_active + 2) * np.sum(g_active**2) / (np.sum(full**2) * n_active + 2 * np.sum(g_active**2))
  )
  assert abs(ratio / expected - 1) < 0.15, (ratio, expected)
  assert ratio < 0.5


def test_forgetting_tracker_drops_only_unforgettable_examples():
  state = sparse.forgetting_init(5)
  # Example 0: always right; 1: right then wrong (forgotten); 2: never right; 3, 4: right once.
  state = sparse.forgetting_update(state, jnp.array([0, 1, 2, 3]), jnp.array([1, 1, 0, 1], bool))
  state = sparse.forgetting_update(state, jnp.array([0, 1, 2, 4]), jnp.array([1, 0, 0, 1], bool))
  np.testing.assert_array_equal(state.forgetting_events, [0, 1, 0, 0, 0])
  np.testing.assert_array_equal(state.learned, [1, 1, 0, 1, 1])
  np.testing.assert_array_equal(sparse.keep_examples(state, 1.0), [1, 2])
  kept = sparse.keep_examples(state, 0.4)  # floor(0.4 * 5) = 2 of the 3 unforgettable dropped
  assert len(kept) == 3 and {1, 2} <= set(kept.tolist())


@pytest.mark.parametrize(
  "kwargs",
  [
    {"density": 0.0},
    {"density": 0.5, "scheme": "rows"},
    {"density": 0.5, "mutation_interval": 0},
    {"density": 0.5, "mutation_interval": 4, "soft_bound_steps": 4},
    {"density": 0.5, "mutation_ratio": 1.5},
    {"density": 0.5, "block_shape": (0, 2)},
  ],
)
def test_rejects_bad_arguments(kwargs):
  with pytest.raises(ValueError):
    sparse.mest(optax.sgd(0.1), **kwargs)


def test_needs_value_fn_with_an_estimator():
  opt = sparse.mest(optax.sgd(0.1), density=0.5, estimator=fgjax.estimators.spsa(1))
  with pytest.raises(ValueError, match="value_fn"):
    opt.update(None, opt.init(PARAMS), PARAMS)
