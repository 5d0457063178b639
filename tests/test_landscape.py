"""fgjax.landscape against closed forms: quadratics, planes built by hand, filter norms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgjax import landscape


def _params():
  keys = jax.random.split(jax.random.key(0), 3)
  return {
    "conv": {"kernel": jax.random.normal(keys[0], (3, 3, 2, 4)), "bias": jnp.ones(4)},
    "head": {"kernel": jax.random.normal(keys[1], (5, 3)), "bias": jnp.ones(3)},
  }


def test_filter_normalized_direction_matches_each_filter_norm():
  params = _params()
  mask = {"conv": {"kernel": True, "bias": True}, "head": {"kernel": False, "bias": True}}
  d = landscape.filter_normalized_direction(jax.random.key(1), params, mask)
  conv_d, conv_p = d["conv"]["kernel"], params["conv"]["kernel"]
  filter_norm = lambda x: np.sqrt(np.sum(np.asarray(x) ** 2, axis=(0, 1, 2)))  # noqa: E731
  np.testing.assert_allclose(filter_norm(conv_d), filter_norm(conv_p), rtol=1e-5)
  # Biases (rank 1) and masked-out leaves do not move (Li et al. 2018).
  for leaf in (d["conv"]["bias"], d["head"]["bias"], d["head"]["kernel"]):
    assert not np.any(np.asarray(leaf))
  # Random, not the weights themselves.
  assert abs(float(jnp.vdot(conv_d, conv_p)) / float(jnp.vdot(conv_p, conv_p))) < 0.9


def test_pca_and_project_recover_a_plane_built_by_hand():
  center = _params()
  flat = lambda t: jnp.concatenate([x.ravel() for x in jax.tree.leaves(t)])  # noqa: E731
  unit = lambda t: jax.tree.map(lambda x: x / jnp.linalg.norm(flat(t)), t)  # noqa: E731
  d1 = unit(jax.tree.map(lambda x: jnp.ones_like(x), center))
  raw = jax.tree.map(lambda x: jax.random.normal(jax.random.key(2), x.shape), center)
  overlap = float(jnp.vdot(flat(raw), flat(d1)))
  d2 = unit(jax.tree.map(lambda r, u: r - overlap * u, raw, d1))
  coords = np.array([[1.0, 0.5], [-2.0, 0.25], [0.5, -1.0], [3.0, 2.0]], np.float32)
  at = lambda a, b: jax.tree.map(lambda c, u, v: c + a * u + b * v, center, d1, d2)  # noqa: E731
  points = [at(a, b) for a, b in coords]
  directions, explained = landscape.pca_directions(points, center)
  assert explained.sum() == pytest.approx(1.0, abs=1e-5)
  # The PCA plane is the plane of d1, d2: projections onto it keep every offset's length.
  projected = landscape.project(points, center, directions)
  np.testing.assert_allclose(
    np.linalg.norm(projected, axis=1), np.linalg.norm(coords, axis=1), 1e-4
  )
  # With the true (non-orthogonal-safe) basis, least squares gives the coordinates back.
  np.testing.assert_allclose(landscape.project(points, center, [d1, d2]), coords, atol=1e-4)


def test_loss_surface_and_sharpness_of_a_quadratic():
  # L(θ) = 0.5 Σ a_i (θ_i - m_i)^2: Hessian diag(a), top eigenvalue max(a).
  curvature = jnp.array([[0.5, 1.0, 4.0], [2.0, 0.1, 3.0]])
  minimum = {"w": jnp.array([[1.0, -2.0, 0.5], [0.3, 1.5, -1.0]])}
  loss = lambda p: 0.5 * jnp.sum(curvature * (p["w"] - minimum["w"]) ** 2)  # noqa: E731
  top, vector = landscape.hessian_top_eigenvalue(
    loss, minimum, jax.random.key(0), num_iterations=60
  )
  assert top == pytest.approx(4.0, rel=1e-3)
  assert abs(float(vector["w"][0, 2])) == pytest.approx(1.0, abs=1e-2)

  d1 = {"w": jnp.zeros((2, 3)).at[0, 0].set(1.0)}
  d2 = {"w": jnp.zeros((2, 3)).at[1, 2].set(1.0)}
  alphas, betas = np.linspace(-1, 1, 5), np.linspace(-2, 2, 3)
  z = landscape.loss_surface(loss, minimum, (d1, d2), alphas, betas)
  expected = 0.5 * 0.5 * alphas[None, :] ** 2 + 0.5 * 3.0 * betas[:, None] ** 2
  np.testing.assert_allclose(z, expected, rtol=1e-5, atol=1e-6)

  # Isotropic curvature c: a filter-normalised step of radius r rises by 0.5 c r^2 ||θ||^2 exactly
  # (the symmetric difference cancels the slope, so θ need not be the minimum).
  iso = lambda p: 0.5 * 2.0 * jnp.sum((p["w"] - minimum["w"]) ** 2)  # noqa: E731
  shifted = {"w": minimum["w"] + 0.3}
  rise = landscape.loss_rise(iso, shifted, jax.random.key(3), radius=0.1, num_samples=4)
  expected_rise = 0.5 * 2.0 * 0.1**2 * float(jnp.sum(shifted["w"] ** 2))
  assert rise["mean"] == pytest.approx(expected_rise, rel=1e-4)
  assert rise["max"] == pytest.approx(expected_rise, rel=1e-4)


def test_mask_restricts_the_hessian():
  curvature = {"a": jnp.array([[1.0, 2.0]]), "b": jnp.array([[10.0, 20.0]])}
  loss = lambda p: 0.5 * sum(jnp.sum(curvature[k] * p[k] ** 2) for k in p)  # noqa: E731
  params = {"a": jnp.ones((1, 2)), "b": jnp.ones((1, 2))}
  top, _ = landscape.hessian_top_eigenvalue(
    loss, params, jax.random.key(0), num_iterations=60, mask={"a": True, "b": False}
  )
  assert top == pytest.approx(2.0, rel=1e-3)
