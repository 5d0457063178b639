"""Integer (fixed-point) updates: float updates in weight units, rounded onto each leaf's grid.

In fixed-point training (QZO-FF, Chen et al., "Stepping Forward on the Last Mile", NeurIPS 2024)
a weight is an integer `q` on a grid of step `s` (`w = s q`); the leaf's dtype is its bit width
(int4, int8, int16). An optimizer's update `u` is in weight units (the same learning rate means
the same step in weight space at every precision), so it is `u / s` grid steps, which must become
an integer before it can be added:

- `"nearest"`: `Δ = round(u / s)`. An update below half a step rounds to zero and the weight never
  moves: the paper's explanation of why 8-bit weights (w8a8) stall where 16-bit ones (w16a8) learn.
- `"stochastic"`: `Δ = ⌊u / s + ξ⌋, ξ ~ U[0, 1)`, so `E[Δ] = u / s` before saturation: small
  updates move a weight with probability `|u| / s` (the key lives in the state).
- `"error_feedback"`: a float residual `r` per integer weight keeps what rounding dropped,
  `r ← r + u / s; Δ = round(r); r ← r − Δ`, so sub-step updates accumulate until they cross a step
  (deterministic; Seide et al., "1-bit SGD", 2014; Karimireddy et al., "EF-SGD", 2019).

The integer is then added with saturation at the dtype's symmetric bounds `±(2^{b-1} − 1)`
(never wrap-around), e.g. ±7 for int4 weights.

`integer_optimizer` makes any optax chain (Adam, momentum, the forward-gradient estimate) run on
integer weights: its state lives in float (on `w = s q`), the integer rounding comes last.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fgjax import _masks
from fgjax.estimators import _perturbation
from fgjax.quant._integer import round_nearest, saturating_add

PyTree = Any
ROUNDINGS = ("nearest", "stochastic", "error_feedback")
# Float updates are clipped to ±2^30 steps before the cast to int32: far beyond any 16-bit range,
# and small enough that `bound - delta` in `saturating_add` cannot overflow.
_DELTA_LIMIT = 2**30
# `changed_fraction` counts the moved weights of each leaf on a strided sample of at most this many
# (all of them for smaller leaves): an exact count over every weight would keep a buffer of the
# leaf's integer steps alive beside the update (XLA cannot fuse the count into the update).
CHANGED_FRACTION_SAMPLE = 4096


def _uniform(key: jax.Array, size: int, stream: int) -> jax.Array:
  """U[0, 1) per flat index from a counter-based hash (`_perturbation.random_bits`): fused into
  its consumer, no PRNG buffer the size of the leaf (jax.random's threefry keeps two)."""
  bits = _perturbation.random_bits(key, (size,), stream=stream)
  return (bits >> 8).astype(jnp.float32) * (2.0**-24)


def _strided(x: jax.Array) -> jax.Array:
  """The flat strided sample of `x` that `changed_fraction` is counted on."""
  flat = jnp.reshape(x, (-1,))
  stride = -(-flat.shape[0] // CHANGED_FRACTION_SAMPLE)
  return flat[::stride]


def _is_integer(leaf) -> bool:
  return leaf is not None and jnp.issubdtype(jnp.result_type(leaf), jnp.integer)


def _scales_of(scales, params: PyTree, needed) -> list:
  """The grid step of each integer leaf with `needed[i]`, from `scales` ({path: step})."""
  out = []
  for (path, _), need in zip(jax.tree_util.tree_flatten_with_path(params)[0], needed, strict=True):
    if not need:
      out.append(None)
      continue
    name = _masks.path_to_str(path)
    if scales is None or name not in scales:
      raise ValueError(
        f"scales: integer leaf {name!r} needs its grid step to turn weight-unit updates into "
        "grid steps: pass scales=fgjax.quant.leaf_scales(params, frozen)."
      )
    out.append(jnp.asarray(scales[name], jnp.float32))
  return out


def _integer_delta(update: jax.Array) -> jax.Array:
  """An integral update (float holding integers, or integer) as int32, clipped to ±2^30."""
  if jnp.issubdtype(update.dtype, jnp.integer):
    return jnp.clip(update.astype(jnp.int32), -_DELTA_LIMIT, _DELTA_LIMIT)
  return jnp.clip(update, -_DELTA_LIMIT, _DELTA_LIMIT).astype(jnp.int32)


def apply_integer_updates(params: PyTree, updates: PyTree) -> PyTree:
  """`params + updates`, with a saturating add on the integer leaves (never wrap-around).

  .. math:: q' = \\operatorname{clip}(q + \\Delta, -(2^{b-1}-1), 2^{b-1}-1)

  with `b` the bit width of the leaf's dtype. Integer leaves take integer updates (grid steps,
  from `integer_updates` / `integer_optimizer`); float leaves: `(p + u).astype(p.dtype)` as
  `optax.apply_updates`, which must not be used for integer leaves (it adds in the promoted dtype
  and casts back, so 127 + 1 wraps to -128 in int8).

  Args:
    params: a pytree of float and integer arrays.
    updates: a pytree with the structure of `params`.

  Returns:
    The updated parameters, each leaf in its own dtype; integer leaves inside `±(2^{b-1}-1)`.

  Raises:
    ValueError: a float update on an integer leaf (its unit, weight or grid step, is unknown: end
      the chain with `integer_updates`, or use `integer_optimizer`).

  Example:
    >>> apply_integer_updates({"w": jnp.int8([120, -3])}, {"w": jnp.int32([20, 1])})
    {'w': Array([127, -2], dtype=int8)}
  """
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  update_leaves = treedef.flatten_up_to(updates)
  out = []
  for (path, param), update in zip(paths_leaves, update_leaves, strict=True):
    if update is None:
      out.append(param)
    elif not _is_integer(param):
      out.append(jnp.asarray(param + update).astype(jnp.result_type(param)))
    else:
      update = jnp.asarray(update)
      if not jnp.issubdtype(update.dtype, jnp.integer):
        raise ValueError(
          f"updates: integer leaf {_masks.path_to_str(path)!r} got a {update.dtype} update; end "
          "the chain with fgjax.integer_updates(...) or wrap it in fgjax.integer_optimizer(...)."
        )
      out.append(saturating_add(param, _integer_delta(update)))
  return jax.tree_util.tree_unflatten(treedef, out)


def changed_fraction(old: PyTree, new: PyTree, mask=None) -> jax.Array:
  """The fraction of weights whose value changed between `old` and `new`.

  .. math:: \\frac{\\sum_{\\ell \\in M} \\#\\{i: q'_{\\ell,i} \\neq q_{\\ell,i}\\}}
     {\\sum_{\\ell \\in M} |q_\\ell|}

  In fixed-point training this is the health metric of the update: 0 means the step rounded away
  entirely (the w8a8 stall of Chen et al. 2024).

  Args:
    old: parameters before the step.
    new: parameters after the step (same structure).
    mask: the leaves counted: None (every integer leaf; every leaf if none is integer), a pytree of
      bools, or a predicate `(path, leaf) -> bool` (see `fgjax.path_mask`).

  Returns:
    A float32 scalar in [0, 1] (0 when the counted leaves are empty).
  """
  old_leaves, treedef = jax.tree_util.tree_flatten(old)
  new_leaves = treedef.flatten_up_to(new)
  if mask is None:
    flags = [_is_integer(leaf) for leaf in old_leaves]
    if not any(flags):
      flags = [True] * len(old_leaves)
  else:
    flags = _masks.resolve_mask(mask, old)
  changed = jnp.zeros((), jnp.float32)
  total = 0
  for a, b, on in zip(old_leaves, new_leaves, flags, strict=True):
    if on:
      changed = changed + jnp.sum(jnp.asarray(a) != jnp.asarray(b)).astype(jnp.float32)
      total += int(np.size(a))
  return changed / max(total, 1)


class IntegerUpdatesState(NamedTuple):
  """State of `integer_updates`.

  Attributes:
    key: PRNG key for stochastic rounding (split every step; unused by the other modes).
    residual: error feedback's float32 residual `r` (in quantization steps, in [-1/2, 1/2]) for
      every integer leaf in the mask; `optax.MaskedNode()` elsewhere and for the other modes, so
      they hold no memory the size of the weights.
    changed_fraction: the fraction of integer weights in the mask that the last step's update
      moves (after saturation): 1 − this is the zero-update rate. Exact for leaves of up to
      `CHANGED_FRACTION_SAMPLE` weights; larger leaves are counted on a strided sample of that
      many (an unbiased estimate; `fgjax.changed_fraction(old, new)` counts every weight).
  """

  key: jax.Array
  residual: PyTree
  changed_fraction: jax.Array


def integer_updates(
  rounding: str = "nearest", seed: int = 0, *, scales=None, mask=None
) -> optax.GradientTransformationExtraArgs:
  """Turns float updates of integer leaves (weight units) into integer steps on their grid.

  For an integer leaf `q` with grid step `s` and float update `u` (in weight units, e.g.
  `-lr · ĝ` from `optax.sgd` after an estimate on integer weights) the output is the int32 update

  .. math:: \\Delta' = \\operatorname{clip}(q + \\Delta, -(2^{b-1}-1), 2^{b-1}-1) - q,

  with `Δ` from the rounding mode applied to `u / s` (module docstring): `"nearest"`,
  `"stochastic"` (`E[Δ] = u / s`) or `"error_feedback"` (residual in the state), and `b` the bit
  width of the leaf's dtype. Since `q + Δ'` is in range, `apply_integer_updates` adds it without
  overflow. Float leaves pass through untouched. Put this transform last in the chain; it needs
  `params`. Most users want `integer_optimizer`, which also keeps the optimizer state in float.

  Paper: Chen et al., "Stepping Forward on the Last Mile" (NeurIPS 2024), QZO-FF's quantized update.

  Args:
    rounding: `"nearest"`, `"stochastic"` or `"error_feedback"`.
    seed: seeds the stochastic-rounding key.
    scales: `{leaf path: grid step}` (`fgjax.quant.leaf_scales`); required for every integer
      leaf that gets a float update.
    mask: which integer leaves get an error-feedback residual and are counted in
      `changed_fraction` (None: all integer leaves; pytree of bools or predicate on paths).

  Returns:
    An `optax.GradientTransformationExtraArgs` with state `IntegerUpdatesState`.

  Raises:
    ValueError: unknown rounding; at update, an integer leaf without its scale, or error feedback
      for an integer leaf that `init` saw as float (it has no residual).
  """
  if rounding not in ROUNDINGS:
    raise ValueError(f"rounding: unknown {rounding!r}; valid: {', '.join(ROUNDINGS)}.")

  def flags(params):
    integer = [_is_integer(leaf) for leaf in jax.tree_util.tree_leaves(params)]
    if mask is None:
      return integer
    return [a and b for a, b in zip(integer, _masks.resolve_mask(mask, params), strict=True)]

  def init_fn(params) -> IntegerUpdatesState:
    leaves, treedef = jax.tree_util.tree_flatten(params)
    residual = [
      jnp.zeros(jnp.shape(leaf), jnp.float32)
      if on and rounding == "error_feedback"
      else optax.MaskedNode()
      for leaf, on in zip(leaves, flags(params), strict=True)
    ]
    return IntegerUpdatesState(
      key=jax.random.key(seed),
      residual=jax.tree_util.tree_unflatten(treedef, residual),
      changed_fraction=jnp.zeros((), jnp.float32),
    )

  def update_fn(updates, state: IntegerUpdatesState, params=None, **extra):
    del extra
    if params is None:
      raise ValueError("params: integer_updates needs the parameters (to know the integer leaves).")
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [leaf for _, leaf in paths_leaves]
    update_leaves = treedef.flatten_up_to(updates)
    residual_leaves = treedef.flatten_up_to(state.residual)
    needs_scale = [
      _is_integer(p) and u is not None and not jnp.issubdtype(jnp.result_type(u), jnp.integer)
      for p, u in zip(leaves, update_leaves, strict=True)
    ]
    grid = _scales_of(scales, params, needs_scale)
    key, step_key = jax.random.split(state.key)
    out, new_residual = [], []
    changed = jnp.zeros((), jnp.float32)
    total = 0
    for index, ((path, param), update, residual, step_size, counted) in enumerate(
      zip(paths_leaves, update_leaves, residual_leaves, grid, flags(params), strict=True)
    ):
      if not _is_integer(param) or update is None:
        out.append(update)
        new_residual.append(residual)
        continue
      update = jnp.asarray(update)
      if rounding == "error_feedback" and isinstance(residual, optax.MaskedNode) and counted:
        if not jnp.issubdtype(update.dtype, jnp.integer):
          raise ValueError(
            f"error_feedback: integer leaf {_masks.path_to_str(path)!r} has no residual "
            "(init saw it as float); init with the integer parameters."
          )

      def integer_step(param, update, residual, noise, step_size=step_size):
        """(delta, new residual): the saturated integer move of `param` for `update`."""
        if jnp.issubdtype(update.dtype, jnp.integer):
          step = update
        else:
          steps = update.astype(jnp.float32) / step_size
          if rounding == "stochastic":
            step = jnp.floor(steps + noise)
          elif rounding == "error_feedback" and not isinstance(residual, optax.MaskedNode):
            accumulated = residual + steps
            step = round_nearest(accumulated)
            # The residual drops the rounded step even where saturation clips it, so it stays
            # in [-1/2, 1/2] instead of growing against a bound.
            residual = accumulated - step
          else:
            step = round_nearest(steps)
        moved = saturating_add(param, _integer_delta(step))
        return moved.astype(jnp.int32) - param.astype(jnp.int32), residual

      size = int(np.size(param))
      noise = None
      if rounding == "stochastic":
        noise = _uniform(step_key, size, index).reshape(jnp.shape(param))
      after = None
      if counted:
        # The count on a sample recomputes the (cheap, elementwise) step there, so the full
        # steps have one consumer and fuse into the weight update.
        def sample(x, shape=None):
          if x is None or isinstance(x, optax.MaskedNode):
            return x
          return _strided(jnp.broadcast_to(x, shape))

        shape = jnp.shape(param)
        sampled_delta, _ = integer_step(
          sample(param, shape),
          sample(update, shape),
          sample(residual, shape),
          sample(noise, shape),
          step_size=sample(step_size, shape),
        )
        leaf_changed = jnp.mean((sampled_delta != 0).astype(jnp.float32))
        changed = changed + leaf_changed * size
        total += size
        # The full update waits for the sample (a zero XLA cannot fold): read before the weights
        # are updated in place, the sample then needs no copy of them.
        after = (leaf_changed != leaf_changed).astype(jnp.int32)
      delta, updated_residual = integer_step(param, update, residual, noise)
      out.append(delta if after is None else delta + after)
      new_residual.append(updated_residual)
    return jax.tree_util.tree_unflatten(treedef, out), IntegerUpdatesState(
      key=key,
      residual=jax.tree_util.tree_unflatten(treedef, new_residual),
      changed_fraction=changed / max(total, 1),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def float_view(params: PyTree, scales=None) -> PyTree:
  """Integer leaves as their weights `s q` in float32 (or `q` itself where no scale is given).

  Args:
    params: float and integer leaves.
    scales: `{leaf path: grid step}`; None: integer leaves are only cast.

  Returns:
    `params` with every integer leaf a float32 array.
  """
  scales = scales or {}

  def view(path, leaf):
    if not _is_integer(leaf):
      return leaf
    value = jnp.asarray(leaf).astype(jnp.float32)
    step = scales.get(_masks.path_to_str(path))
    return value if step is None else value * jnp.asarray(step, jnp.float32)

  return jax.tree_util.tree_map_with_path(view, params)


class IntegerOptimizerState(NamedTuple):
  """State of `integer_optimizer`.

  Attributes:
    inner: the wrapped optimizer's state, initialised on the float view `s q` (so momentum and
      Adam moments are float32, in weight units).
    integer: the final `integer_updates` link's `IntegerUpdatesState` (rounding key, residual,
      `changed_fraction`).
  """

  inner: Any
  integer: IntegerUpdatesState


def integer_optimizer(
  optimizer: optax.GradientTransformation,
  *,
  scales,
  rounding: str = "stochastic",
  seed: int = 0,
  mask=None,
) -> optax.GradientTransformationExtraArgs:
  """Runs any optax optimizer (chain) on integer weights: float state, integer update at the end.

  `optimizer` (e.g. `optax.chain(fgjax.forward_gradient(est), optax.adam(1e-3))`) is initialised
  and updated on the float view of the parameters, `w = s q` in weight units, so its state is
  float32 and its learning rate means the same step at every precision; its float updates then
  go through `integer_updates(rounding, scales=scales)`, which turns them into integer grid steps
  (and leaves float leaves' updates as they are). `fgjax.forward_gradient` inside the chain gets
  the integer parameters themselves (the extra argument `integer_params`), so SPSA perturbs them
  on their grid.

    >>> fixed = fgjax.quant.to_fixed_point(variables, fgjax.quant.preset("w16a8"))
    >>> est = fgjax.estimators.spsa(4, epsilon=1e-3, sign=True, scales=fixed.scales)
    >>> opt = fgjax.integer_optimizer(
    ...   optax.chain(fgjax.forward_gradient(est), optax.adam(1e-3)), scales=fixed.scales)
    >>> state = opt.init(fixed.params)
    >>> updates, state = opt.update(fixed.params, state, fixed.params, value_fn=loss_of_params)
    >>> params = fgjax.apply_integer_updates(fixed.params, updates)

  Args:
    optimizer: any optax `GradientTransformation` (extra args are passed on).
    scales: `{leaf path: grid step}` of the integer leaves (`fgjax.quant.leaf_scales`).
    rounding: `"nearest"`, `"stochastic"` or `"error_feedback"`.
    seed: seeds the stochastic-rounding key.
    mask: the integer leaves counted in `changed_fraction` and given an error-feedback residual.

  Returns:
    An `optax.GradientTransformationExtraArgs` with state `IntegerOptimizerState`; its updates
    are int32 grid steps on integer leaves, for `apply_integer_updates`.
  """
  if not isinstance(optimizer, optax.GradientTransformation):
    raise ValueError(f"optimizer: expected an optax GradientTransformation, got {optimizer!r}.")
  if not isinstance(scales, dict):
    raise ValueError(f"scales: expected a dict {{leaf path: grid step}}, got {type(scales)}.")
  link = integer_updates(rounding, seed, scales=scales, mask=mask)
  inner = optax.with_extra_args_support(optimizer)

  def init_fn(params) -> IntegerOptimizerState:
    return IntegerOptimizerState(inner.init(float_view(params, scales)), link.init(params))

  def update_fn(updates, state: IntegerOptimizerState, params=None, **extra):
    if params is None:
      raise ValueError("params: integer_optimizer needs the (integer) parameters.")
    float_updates, inner_state = inner.update(
      updates, state.inner, float_view(params, scales), integer_params=params, **extra
    )
    steps, integer_state = link.update(float_updates, state.integer, params)
    return steps, IntegerOptimizerState(inner_state, integer_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
