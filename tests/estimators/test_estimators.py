"""Estimators against jax.grad: exactly for directional derivatives, statistically for the rest."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fgjax
from fgjax import testing
from fgjax.estimators import _perturbation

DISTRIBUTIONS = ("normal", "rademacher")


def _mlp_problem(batch=8, seed=0):
  model = testing.TinyMLP(hidden=(12, 12), num_classes=3)
  x = jax.random.normal(jax.random.key(seed), (batch, 5))
  y = jnp.arange(batch) % 3
  params = jax.jit(model.init)(jax.random.key(seed + 1), x)["params"]
  return testing.classification_loss(model, x, y), params


def _cnn_problem(batch=4, seed=0):
  model = testing.TinyCNN(features=3, num_classes=3)
  x = jax.random.normal(jax.random.key(seed), (batch, 6, 6, 2))
  y = jnp.arange(batch) % 3
  params = jax.jit(model.init)(jax.random.key(seed + 1), x)["params"]
  return testing.classification_loss(model, x, y), params


def _quadratic_problem(dim=6, seed=0):
  a = jax.random.normal(jax.random.key(seed), (dim, dim))
  hessian = a @ a.T / dim + jnp.eye(dim)
  center = jax.random.normal(jax.random.key(seed + 1), (dim,))

  def loss(params):
    d = params["w"] - center
    return 0.5 * d @ hessian @ d + jnp.sum(params["b"] ** 2)

  return loss, {"w": jnp.zeros((dim,)), "b": jnp.ones((2,))}


@pytest.mark.parametrize("problem", [_mlp_problem, _cnn_problem], ids=["mlp", "cnn"])
@pytest.mark.parametrize("chunk_size", [None, 1], ids=["vmapped", "chunked"])
def test_jvp_directional_derivative_is_exact(problem, chunk_size):
  loss, params = problem()
  key = jax.random.key(3)
  est = fgjax.estimators.jvp(num_directions=3, chunk_size=chunk_size)
  estimate = jax.jit(lambda p: est(loss, p, key=key))(params)

  @jax.jit
  def reference(params):
    grad = jax.grad(loss)(params)
    directions = fgjax.estimators.sample_directions(key, params, 3)
    return loss(params), directions, jnp.stack([testing.tree_vdot(grad, v) for v in directions])

  value, directions, expected = reference(params)
  np.testing.assert_allclose(estimate.metrics["directional_derivatives"], expected, rtol=1e-5)
  np.testing.assert_allclose(estimate.value, value, rtol=1e-6)
  # The estimate is (1/K) Σ d_k v_k with those same directions.
  manual = jax.tree.map(
    lambda *vs: sum(d * v for d, v in zip(expected, vs, strict=True)) / 3, *directions
  )
  for got, want in zip(jax.tree.leaves(estimate.grads), jax.tree.leaves(manual), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_jvp_vmaps_tangents_over_one_primal():
  model = testing.TinyMLP(hidden=(12, 12), num_classes=3)
  x = jnp.ones((8, 5))
  params = model.init(jax.random.key(0), x)["params"]
  loss = testing.classification_loss(model, x, jnp.zeros((8,), jnp.int32))
  est = fgjax.estimators.jvp(num_directions=4, chunk_size=None)
  jaxpr = jax.make_jaxpr(lambda p: est(loss, p, key=jax.random.key(0)))(params)
  dots = [e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
  shapes = [tuple(v.aval.shape for v in e.invars) for e in dots]
  # Three layers: the primal dots are plain (batch, in) x (in, out); every tangent dot has a
  # K = 4 axis on one operand. One primal pass, not K.
  primal = [s for s in shapes if all(len(shape) == 2 for shape in s)]
  tangent = [s for s in shapes if any(len(shape) == 3 and shape[0] == 4 for shape in s)]
  assert len(primal) == 3, shapes
  assert len(tangent) >= 3, shapes


def _all_eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", param)
      if hasattr(inner, "eqns"):
        yield from _all_eqns(inner)


def _estimates(est, loss, params, num, seed=0):
  keys = jax.random.split(jax.random.key(seed), num)
  grads = jax.jit(jax.vmap(lambda k: est(loss, params, key=k).grads))(keys)
  return jnp.concatenate([g.reshape(num, -1) for g in jax.tree.leaves(grads)], axis=1)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize(
  "make",
  [
    lambda d: fgjax.estimators.jvp(1, distribution=d, chunk_size=None),
    lambda d: fgjax.estimators.spsa(1, epsilon=0.1, distribution=d, chunk_size=None),
  ],
  ids=["jvp", "spsa_central"],
)
def test_unbiased(make, distribution):
  # Central differences are exact on a quadratic, so spsa is unbiased there, like jvp.
  loss, params = _quadratic_problem()
  num = 4000
  samples = _estimates(make(distribution), loss, params, num)
  truth = jnp.concatenate([jnp.ravel(g) for g in jax.tree.leaves(jax.grad(loss)(params))])
  sigma = samples.std(axis=0)
  error = jnp.abs(samples.mean(axis=0) - truth)
  assert jnp.all(error <= 4 * sigma / np.sqrt(num)), (error, 4 * sigma / np.sqrt(num))


def test_cosine_grows_with_directions():
  loss, params = _mlp_problem()
  grad = jax.grad(loss)(params)

  def mean_cosine(num_directions):
    est = fgjax.estimators.jvp(num_directions, chunk_size=None)
    cosine = jax.jit(lambda k: testing.cosine(est(loss, params, key=k).grads, grad))
    return float(jnp.mean(jnp.stack([cosine(jax.random.key(s)) for s in range(8)])))

  few, many = mean_cosine(1), mean_cosine(64)
  assert many > few + 0.2, (few, many)
  assert many > 0.4, many


@pytest.mark.parametrize(
  "make",
  [
    lambda c: fgjax.estimators.spsa(4, epsilon=1e-2, chunk_size=c),
    lambda c: fgjax.estimators.spsa(4, epsilon=1e-2, central=False, chunk_size=c),
    lambda c: fgjax.estimators.spsa(4, epsilon=1e-2, sign=True, chunk_size=c),
    lambda c: fgjax.estimators.jvp(4, chunk_size=c),
  ],
  ids=["spsa", "one_sided", "sign", "jvp"],
)
def test_vmapped_and_sequential_agree_and_are_deterministic(make):
  loss, params = _mlp_problem()
  key = jax.random.key(7)
  vmapped = jax.jit(lambda p: make(None)(loss, p, key=key))(params)
  sequential = jax.jit(lambda p: make(1)(loss, p, key=key))
  chunked = jax.jit(lambda p: make(3)(loss, p, key=key))(params)
  first, again = sequential(params), sequential(params)
  for other in (first, chunked):
    np.testing.assert_allclose(
      vmapped.metrics["directional_derivatives"],
      other.metrics["directional_derivatives"],
      rtol=2e-3,
      atol=1e-3,
    )
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again), strict=True):
    np.testing.assert_array_equal(a, b)


def test_spsa_matches_its_definition():
  loss, params = _quadratic_problem()
  key, eps = jax.random.key(2), 0.05
  for central in (True, False):
    estimate = fgjax.estimators.spsa(3, epsilon=eps, central=central)(loss, params, key=key)
    directions = fgjax.estimators.sample_directions(key, params, 3)
    for k, z in enumerate(directions):
      plus = loss(jax.tree.map(lambda w, v: w + eps * v, params, z))
      if central:
        minus = loss(jax.tree.map(lambda w, v: w - eps * v, params, z))
        expected = (plus - minus) / (2 * eps)
      else:
        expected = (plus - loss(params)) / eps
      got = estimate.metrics["directional_derivatives"][k]
      np.testing.assert_allclose(got, expected, rtol=1e-3)


def test_sign_spsa_uses_only_signs():
  loss, params = _quadratic_problem()
  key = jax.random.key(5)
  estimate = fgjax.estimators.spsa(2, epsilon=0.1, sign=True, sign_scale=0.5)(loss, params, key=key)
  directions = fgjax.estimators.sample_directions(key, params, 2)
  signs = jnp.sign(estimate.metrics["directional_derivatives"])
  expected = jax.tree.map(lambda a, b: 0.5 * (signs[0] * a + signs[1] * b) / 2, *directions)
  for got, want in zip(jax.tree.leaves(estimate.grads), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize(
  "est",
  [
    fgjax.estimators.spsa(2, epsilon=0.1),
    fgjax.estimators.spsa(2, epsilon=0.1, central=False),
    fgjax.estimators.jvp(2),
    fgjax.estimators.backprop(),
  ],
  ids=["spsa", "one_sided", "jvp", "backprop"],
)
@pytest.mark.parametrize("as_predicate", [False, True])
def test_masked_leaves_are_never_perturbed(est, as_predicate):
  # The loss does not depend on "trained" at all and strongly on "frozen": any perturbation of
  # "frozen" would show up as a non-zero directional derivative.
  def loss(params):
    return 0.0 * jnp.sum(params["trained"]) + 1e3 * jnp.sum(jnp.sin(params["frozen"]))

  params = {"trained": jnp.ones((3,)), "frozen": jnp.ones((4,))}
  mask = (
    (lambda path, leaf: path == "trained") if as_predicate else {"trained": True, "frozen": False}
  )
  masked = type(est)(**{**est.__dict__, "mask": mask})
  estimate = jax.jit(lambda p: masked(loss, p, key=jax.random.key(0)))(params)
  np.testing.assert_array_equal(estimate.grads["frozen"], jnp.zeros((4,)))
  np.testing.assert_array_equal(estimate.grads["trained"], jnp.zeros((3,)))
  np.testing.assert_array_equal(estimate.metrics["directional_derivatives"], 0.0)


def test_masked_gradient_equals_backprop_on_selected_leaves():
  loss, params = _mlp_problem()
  mask = fgjax.path_mask(r"^head/")
  exact = fgjax.estimators.backprop(mask=mask)(loss, params).grads
  grad = jax.grad(loss)(params)
  np.testing.assert_allclose(exact["head"]["kernel"], grad["head"]["kernel"], rtol=1e-6)
  assert not jnp.any(exact["Dense_0"]["kernel"])


@pytest.mark.parametrize(
  ("factory", "kwargs", "name"),
  [
    (fgjax.estimators.spsa, {"num_directions": 0}, "num_directions"),
    (fgjax.estimators.jvp, {"num_directions": 0}, "num_directions"),
    (fgjax.estimators.spsa, {"num_directions": 2.5}, "num_directions"),
    (fgjax.estimators.spsa, {"epsilon": 0.0}, "epsilon"),
    (fgjax.estimators.spsa, {"epsilon": -1e-3}, "epsilon"),
    (fgjax.estimators.spsa, {"distribution": "uniform"}, "distribution"),
    (fgjax.estimators.jvp, {"distribution": "cauchy"}, "distribution"),
    (fgjax.estimators.spsa, {"chunk_size": 0}, "chunk_size"),
  ],
)
def test_bad_arguments_raise_naming_the_argument(factory, kwargs, name):
  with pytest.raises(ValueError, match=name):
    factory(**kwargs)


@pytest.mark.parametrize("mask", [{"w": True}, {"w": True, "b": 1}, {"w": False, "b": False}])
def test_mask_that_does_not_match_raises(mask):
  loss, params = _quadratic_problem()
  with pytest.raises(ValueError, match="mask"):
    fgjax.estimators.spsa(1, mask=mask)(loss, params, key=jax.random.key(0))


def test_value_and_grad_mirrors_jax():
  loss, params = _mlp_problem()
  value, grads = fgjax.value_and_grad(loss, fgjax.estimators.backprop())(params)
  want_value, want_grads = jax.value_and_grad(loss)(params)
  np.testing.assert_allclose(value, want_value)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
    np.testing.assert_allclose(a, b)
  value, grads, metrics = fgjax.value_and_grad(loss, fgjax.estimators.spsa(2), with_metrics=True)(
    params, key=jax.random.key(0)
  )
  assert metrics["directional_derivatives"].shape == (2,)
  with pytest.raises(ValueError, match="key"):
    fgjax.value_and_grad(loss, fgjax.estimators.spsa(2))(params)


def test_loss_must_be_scalar():
  with pytest.raises(ValueError, match="scalar"):
    fgjax.estimators.spsa(1)(lambda p: p["w"], {"w": jnp.ones(3)}, key=jax.random.key(0))


def test_zero_difference_fraction_counts_vanished_perturbations():
  # A loss that rounds to a coarse grid: tiny perturbations leave it unchanged.
  def loss(params):
    return jnp.round(jnp.sum(params["w"]))

  estimate = fgjax.estimators.spsa(8, epsilon=1e-4)(
    loss, {"w": jnp.full((4,), 0.1)}, key=jax.random.key(0)
  )
  assert float(estimate.metrics["zero_difference_fraction"]) == 1.0


def test_random_directions_have_unit_moments_and_are_independent():
  for distribution in DISTRIBUTIONS:
    leaf = jnp.zeros((200_000,))
    z1 = _perturbation.direction(jax.random.key(0), 0, leaf, distribution)
    z2 = _perturbation.direction(jax.random.key(1), 0, leaf, distribution)
    z3 = _perturbation.direction(jax.random.key(0), 1, leaf, distribution)
    tol = 5 / np.sqrt(leaf.size)
    assert abs(float(z1.mean())) < tol
    assert abs(float(jnp.mean(z1**2)) - 1) < 5 * tol
    assert abs(float(jnp.mean(z1 * z2))) < tol
    assert abs(float(jnp.mean(z1 * z3))) < tol
  normal = _perturbation.direction(jax.random.key(0), 0, jnp.zeros((200_000,)), "normal")
  assert abs(float(jnp.mean(normal**4)) - 3) < 0.1  # Gaussian kurtosis, not Rademacher's 1.
