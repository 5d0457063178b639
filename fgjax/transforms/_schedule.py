"""Schedules of the number of directions m ("nFold"): more forward calls when they pay off.

An estimate from m directions has variance ∝ 1/m and costs m (jvp) or 2m (central SPSA) forward
calls. Early in fine-tuning a few noisy directions make progress; near a minimum the noise
dominates and more directions help (Chen et al., "Stepping Forward on the Last Mile", NeurIPS
2024, study m and grow it during training). Two schedules, one mechanism:

- `num_directions_schedule(estimator, [(0, 1), (200, 3), (500, 8)])`: m by step.
- `num_directions_on_plateau(estimator, (1, 3, 8), patience=50)`: m moves to the next level when
  a smoothed loss has not improved for `patience` steps (as `optax.contrib.reduce_on_plateau`
  lowers a learning rate).

m is an array shape, so each level is its own copy of the estimator (`dataclasses.replace` of
`num_directions`, also inside wrappers such as `sharpness_aware`), and the step runs one of them
through `lax.switch`: one compilation for the whole schedule, and each step costs only its own
level's forward calls (the memory is the largest level's).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fgjax.transforms._forward_gradient import forward_gradient


class NumDirectionsState(NamedTuple):
  """State of the direction schedules.

  Attributes:
    key: PRNG key of the next step's perturbations (each step splits it).
    step: steps taken so far (int32).
    level: index of the current m in the schedule's levels (int32).
    smoothed: bias-corrected exponential moving average of the loss (plateau schedule).
    best: the lowest `smoothed` since the level last changed (plateau schedule); the float32
      maximum before the first step (not inf: checkpoints refuse non-finite states).
    since_best: steps since `best` last improved (plateau schedule).
    value: the loss the last estimate saw (`Estimate.value`).
    metrics: the last estimate's metrics, arrays padded to the largest level's shapes, plus
      "num_directions", the m that step used.
  """

  key: jax.Array
  step: jax.Array
  level: jax.Array
  smoothed: jax.Array
  best: jax.Array
  since_best: jax.Array
  value: jax.Array
  metrics: dict[str, jax.Array]


def with_num_directions(estimator, num_directions: int):
  """A copy of `estimator` with `num_directions` replaced (looking inside wrappers' `estimator`)."""
  if dataclasses.is_dataclass(estimator):
    fields = {f.name for f in dataclasses.fields(estimator)}
    if "num_directions" in fields:
      return dataclasses.replace(estimator, num_directions=num_directions)
    if "estimator" in fields:
      inner = with_num_directions(estimator.estimator, num_directions)
      return dataclasses.replace(estimator, estimator=inner)
  raise ValueError(
    f"estimator: {estimator!r} has no num_directions to schedule (use spsa or jvp, possibly "
    "wrapped in sharpness_aware)."
  )


def _check_levels(levels: Sequence[int]) -> tuple[int, ...]:
  levels = tuple(levels)
  if not levels:
    raise ValueError("levels: expected at least one number of directions.")
  for m in levels:
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
      raise ValueError(f"levels: every number of directions must be an integer >= 1, got {m!r}.")
  return levels


def _pad(x: jax.Array, shape) -> jax.Array:
  if x.shape == tuple(shape):
    return x
  return jnp.pad(x, [(0, t - s) for s, t in zip(x.shape, shape, strict=True)])


def _scheduled(estimator, levels, seed, next_level, name) -> optax.GradientTransformationExtraArgs:
  variants = [with_num_directions(estimator, m) for m in levels]
  largest = variants[levels.index(max(levels))]

  def init_fn(params) -> NumDirectionsState:
    # forward_gradient's init refuses integer parameters outside integer_optimizer.
    base = forward_gradient(largest, seed).init(params)
    metrics = dict(base.metrics)
    metrics["num_directions"] = jnp.zeros((), jnp.int32)
    return NumDirectionsState(
      key=base.key,
      step=jnp.zeros((), jnp.int32),
      level=next_level.initial(),
      smoothed=jnp.zeros((), jnp.float32),
      best=jnp.full((), jnp.finfo(jnp.float32).max, jnp.float32),
      since_best=jnp.zeros((), jnp.int32),
      value=base.value,
      metrics=metrics,
    )

  def update_fn(
    updates,
    state: NumDirectionsState,
    params=None,
    *,
    value_fn=None,
    integer_params=None,
    **extra: Any,
  ):
    del updates, extra  # The estimate replaces whatever came in.
    if integer_params is not None:
      params = integer_params  # Under integer_optimizer, as in forward_gradient.
    if params is None:
      raise ValueError(f"params: {name} needs the current parameters to perturb.")
    if value_fn is None:
      raise ValueError(f"value_fn: {name} needs `value_fn(params) -> loss` in update().")
    key, step_key = jax.random.split(state.key)
    level = next_level.current(state)
    shapes = {k: v.shape for k, v in state.metrics.items()}

    def branch(variant):
      def run(p, k):
        estimate = variant(lambda q: value_fn(q), p, key=k)
        metrics = {k: _pad(jnp.asarray(v), shapes[k]) for k, v in estimate.metrics.items()}
        return estimate.grads, jnp.asarray(estimate.value, jnp.float32), metrics

      return run

    grads, value, metrics = jax.lax.switch(level, [branch(v) for v in variants], params, step_key)
    metrics["num_directions"] = jnp.asarray(levels, jnp.int32)[level]
    new_state = NumDirectionsState(
      key=key,
      step=state.step + 1,
      level=level,
      smoothed=state.smoothed,
      best=state.best,
      since_best=state.since_best,
      value=value,
      metrics=metrics,
    )
    return grads, next_level.after(new_state, value)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@dataclasses.dataclass(frozen=True)
class _ByStep:
  boundaries: tuple[int, ...]

  def initial(self):
    return jnp.zeros((), jnp.int32)

  def current(self, state):
    steps = jnp.asarray(self.boundaries, jnp.int32)
    return (jnp.sum(steps <= state.step) - 1).astype(jnp.int32)

  def after(self, state, value):
    del value
    return state


@dataclasses.dataclass(frozen=True)
class _OnPlateau:
  num_levels: int
  patience: int
  min_improvement: float
  smoothing: float

  def initial(self):
    return jnp.zeros((), jnp.int32)

  def current(self, state):
    return state.level

  def after(self, state, value):
    # Bias-corrected EMA (as Adam's moments): the first step's smoothed loss is the loss itself.
    decay = self.smoothing
    count = state.step.astype(jnp.float32)
    # The raw average m_{t-1} = smoothed_{t-1} (1 - decay^{t-1}) is zero at t = 1.
    raw = decay * state.smoothed * (1 - decay ** (count - 1)) + (1 - decay) * value
    smoothed = raw / (1 - decay**count)
    improved = smoothed < state.best - self.min_improvement * jnp.abs(state.best)
    improved = improved | (state.step == 1)  # The first step sets the best.
    best = jnp.where(improved, smoothed, state.best)
    since = jnp.where(improved, 0, state.since_best + 1)
    grow = (since >= self.patience) & (state.level < self.num_levels - 1)
    # A new level gets `patience` fresh steps, measured from where it starts.
    return state._replace(
      level=state.level + grow.astype(jnp.int32),
      smoothed=smoothed,
      best=jnp.where(grow, smoothed, best),
      since_best=jnp.where(grow, 0, since).astype(jnp.int32),
    )


def num_directions_schedule(
  estimator, boundaries: Sequence[tuple[int, int]], seed: int = 0
) -> optax.GradientTransformationExtraArgs:
  """`forward_gradient` whose number of directions m follows a fixed list of (step, m).

  At step t (counted from 0 by this transform) the estimate uses m_i for the last boundary
  (t_i, m_i) with t_i <= t:

    m(t) = m_i,  t_i <= t < t_{i+1}.

  Each level is `estimator` with `num_directions = m_i` (also inside `sharpness_aware`); one
  `lax.switch` runs the current one, so a step costs its own level's forward calls and the whole
  schedule compiles once. With one boundary it is `forward_gradient(estimator with m_0)`: same
  key, same estimate.

  Paper: the number of perturbations m and its schedule ("nFold"), Chen et al., "Stepping Forward
  on the Last Mile" (NeurIPS 2024).

  Args:
    estimator: an SPSA or jvp estimator (possibly wrapped in `sharpness_aware`); its own
      `num_directions` is replaced.
    boundaries: (step, m) pairs; steps strictly increasing from 0, m integers >= 1.
    seed: seeds the PRNG key held in the state.

  Returns:
    An `optax.GradientTransformationExtraArgs` like `forward_gradient` (`value_fn=` in `update`,
    `integer_params=` under `integer_optimizer`), with state `NumDirectionsState`; the metrics
    hold "num_directions", the m each step used.

  Example:
    >>> est = fgjax.estimators.spsa(1, epsilon=1e-3, sign=True)
    >>> opt = optax.chain(
    ...   fgjax.transforms.num_directions_schedule(est, [(0, 1), (200, 3)]), optax.sgd(1e-2))
  """
  boundaries = tuple(tuple(b) for b in boundaries)
  if not boundaries or any(len(b) != 2 for b in boundaries):
    raise ValueError(f"boundaries: expected (step, m) pairs, got {boundaries!r}.")
  steps = [b[0] for b in boundaries]
  if steps[0] != 0 or any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
    raise ValueError(f"boundaries: steps must start at 0 and increase strictly, got {steps}.")
  levels = _check_levels([b[1] for b in boundaries])
  return _scheduled(
    estimator, levels, seed, _ByStep(tuple(int(s) for s in steps)), "num_directions_schedule"
  )


def num_directions_on_plateau(
  estimator,
  levels: Sequence[int] = (1, 3, 8),
  *,
  patience: int = 50,
  min_improvement: float = 0.01,
  smoothing: float = 0.9,
  seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """`forward_gradient` whose number of directions m grows when the loss stalls.

  The loss each estimate sees (free: `Estimate.value`) is smoothed by a bias-corrected moving
  average, ℓ̄_t = EMA_smoothing(ℓ_t). A step improves when ℓ̄_t < best · (1 − min_improvement)
  (for a positive loss; best = the lowest ℓ̄ since the level began). After `patience` steps
  without improvement m moves to the next level and the count restarts; it never goes back, and
  stays at the last level.

  Paper: growing the number of perturbations m ("nFold") when progress stalls, Chen et al.,
  "Stepping Forward on the Last Mile" (NeurIPS 2024).

  Args:
    estimator: an SPSA or jvp estimator (possibly wrapped in `sharpness_aware`).
    levels: the numbers of directions, used in this order (integers >= 1).
    patience: steps without improvement before moving to the next level (>= 1).
    min_improvement: relative decrease of the smoothed loss that counts as progress, in [0, 1).
    smoothing: the moving average's decay, in [0, 1) (0: the raw loss).
    seed: seeds the PRNG key held in the state.

  Returns:
    An `optax.GradientTransformationExtraArgs` like `forward_gradient`, with state
    `NumDirectionsState` (`level` is the index into `levels`).

  Example:
    >>> est = fgjax.estimators.spsa(1, epsilon=1e-3, sign=True)
    >>> opt = optax.chain(
    ...   fgjax.transforms.num_directions_on_plateau(est, (1, 3, 8), patience=50),
    ...   optax.sgd(1e-2))
  """
  levels = _check_levels(levels)
  if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
    raise ValueError(f"patience: expected an integer >= 1, got {patience!r}.")
  if not (isinstance(min_improvement, int | float) and 0 <= min_improvement < 1):
    raise ValueError(f"min_improvement: expected a number in [0, 1), got {min_improvement!r}.")
  if not (isinstance(smoothing, int | float) and math.isfinite(smoothing) and 0 <= smoothing < 1):
    raise ValueError(f"smoothing: expected a number in [0, 1), got {smoothing!r}.")
  rule = _OnPlateau(len(levels), patience, float(min_improvement), float(smoothing))
  return _scheduled(estimator, levels, seed, rule, "num_directions_on_plateau")
