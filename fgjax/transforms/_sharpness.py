"""`sharpness_aware`: SAM's two-step update with both gradients estimated from forward calls.

Sharpness-aware minimization (SAM, Foret et al., ICLR 2021) descends along the gradient taken at
a neighbouring point, ŵ = w + ρ g / ‖g‖, the worst case within a ball of radius ρ to first
order; it prefers flat minima, which transfer better under distribution shift. With backprop both
gradients come from backward passes. Here both are any fgjax estimator's (SPSA, sign-m-SPSA,
jvp), so the step stays forward-only: Chen et al., "Stepping Forward on the Last Mile" (NeurIPS
2024), list it among the enhancements of zeroth-order fine-tuning.

The wrapper is itself an estimator (same interface), so it composes with `forward_gradient`,
`fgjax.value_and_grad`, the direction schedules of `_schedule`, masks and integer weights:
- the ascent moves only what the inner estimate moves (its mask: frozen leaves get exact zeros);
- on an integer leaf `q` with grid step `s` the ascent is `ρ g / ‖g‖ / s` grid steps, rounded
  stochastically (its expectation is the float move; nearest rounding would drop every coordinate
  below half a step, which for a move of total length ρ spread over n weights is most of them)
  and added with saturation, so the neighbour is again a valid fixed-point model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from fgjax import _masks
from fgjax.estimators import Estimate
from fgjax.quant._integer import saturating_add


@dataclasses.dataclass(frozen=True)
class SharpnessAware:
  """SAM around an estimator; build it with `fgjax.transforms.sharpness_aware`."""

  estimator: Callable
  rho: float = 0.05
  scales: dict | None = dataclasses.field(default=None, compare=False)

  @property
  def mask(self):
    return getattr(self.estimator, "mask", None)

  def __call__(self, loss_fn, params, *args, key=None, **kwargs) -> Estimate:
    # The second (descent) estimate uses `key` itself, so with rho = 0 the result is exactly the
    # inner estimator's at `key`; the first (ascent) estimate and the rounding use derived keys.
    if key is None:
      ascent_key = rounding_key = None
    else:
      ascent_key, rounding_key = jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)
    first = self.estimator(loss_fn, params, *args, key=ascent_key, **kwargs)
    norm = jnp.sqrt(
      sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(first.grads))
    )
    # A zero estimate (every difference equal) has no ascent direction: stay at w.
    factor = jnp.where(norm > 0, self.rho / jnp.where(norm > 0, norm, 1.0), 0.0)
    neighbour = self._move(params, first.grads, factor, rounding_key)
    second = self.estimator(loss_fn, neighbour, *args, key=key, **kwargs)
    metrics = dict(second.metrics)
    metrics["ascent_norm"] = norm
    # L(ŵ) − L(w): the sharpness SAM minimises, from the two values already computed.
    metrics["sharpness"] = jnp.asarray(second.value - first.value, jnp.float32)
    return Estimate(first.value, second.grads, metrics)

  def _move(self, params, grads, factor, rounding_key):
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    grad_leaves = treedef.flatten_up_to(grads)
    trainable = _masks.resolve_mask(self.mask, params)
    scales = self.scales if self.scales is not None else getattr(self.estimator, "scales", None)
    out = []
    for index, ((path, leaf), grad, on) in enumerate(
      zip(paths_leaves, grad_leaves, trainable, strict=True)
    ):
      if not on:
        out.append(leaf)
      elif not jnp.issubdtype(jnp.result_type(leaf), jnp.integer):
        out.append((leaf + factor * grad).astype(jnp.result_type(leaf)))
      else:
        name = _masks.path_to_str(path)
        if scales is None or name not in scales:
          raise ValueError(
            f"scales: integer leaf {name!r} needs its grid step for the ascent move: pass "
            "scales=fgjax.quant.leaf_scales(params, frozen) to the estimator or to "
            "sharpness_aware, or mask the leaf out."
          )
        steps = factor * grad.astype(jnp.float32) / jnp.asarray(scales[name], jnp.float32)
        if rounding_key is None:
          rounded = jnp.round(steps)
        else:
          noise = jax.random.uniform(jax.random.fold_in(rounding_key, index), jnp.shape(steps))
          rounded = jnp.floor(steps + noise)
        rounded = jnp.clip(rounded, -(2.0**30), 2.0**30).astype(jnp.int32)
        out.append(saturating_add(leaf, rounded))
    return jax.tree_util.tree_unflatten(treedef, out)


def sharpness_aware(estimator, rho: float = 0.05, *, scales: dict | None = None) -> SharpnessAware:
  r"""Sharpness-aware (SAM) gradient estimate from an estimator's forward calls only.

  With ĝ(w) the inner estimator's estimate at w:

    ascent:     ĝ₁ = ĝ(w; key₁),   ŵ = w + ρ ĝ₁ / ‖ĝ₁‖   (ŵ = w when ĝ₁ = 0)
    estimate:   ĝ_SAM = ĝ(ŵ; key)

  ‖·‖ is the global L2 norm over the trainable leaves (weight units). With exact gradients
  (`fgjax.estimators.backprop`) this is SAM's update direction ∇L(w + ρ ∇L/‖∇L‖); with rho = 0 it
  is the inner estimate at `key`. The cost is twice the inner estimator's forward calls (4K for
  central SPSA). The returned value is L(w) from the first estimate; the metrics are the second
  estimate's plus "ascent_norm" (‖ĝ₁‖) and "sharpness" (L(ŵ) − L(w), as the estimators see it).

  Integer (fixed-point) leaves move by stochastically rounded grid steps, ρ ĝ₁ / (‖ĝ₁‖ s), with
  saturation: in expectation the float move, and ŵ stays on the grid.

  Paper: Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization"
  (ICLR 2021); forward-only SAM as an enhancement in Chen et al., "Stepping Forward on the Last
  Mile" (NeurIPS 2024).

  Args:
    estimator: any fgjax estimator (spsa, sign-m-SPSA, jvp, backprop); its mask decides what moves.
    rho: ρ >= 0, the radius of the ascent step in weight units.
    scales: `{leaf path: grid step}` of trainable integer leaves; default: the estimator's own
      `scales` (SPSA's).

  Returns:
    An estimator `est(loss_fn, params, *args, key=key) -> Estimate(value, grads, metrics)`.

  Example:
    >>> est = fgjax.transforms.sharpness_aware(fgjax.estimators.spsa(4, sign=True), rho=0.05)
    >>> opt = optax.chain(fgjax.forward_gradient(est), optax.sgd(1e-2))
  """
  if not callable(estimator):
    raise ValueError(f"estimator: expected an estimator from fgjax.estimators, got {estimator!r}.")
  if not (isinstance(rho, int | float) and math.isfinite(rho) and rho >= 0):
    raise ValueError(f"rho: expected a finite number >= 0, got {rho!r}.")
  if scales is not None and not isinstance(scales, dict):
    raise ValueError(f"scales: expected a dict {{leaf path: grid step}}, got {type(scales)}.")
  return SharpnessAware(estimator, float(rho), scales)
