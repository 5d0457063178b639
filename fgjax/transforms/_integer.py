"""Integer (fixed-point) updates: float updates rounded onto the weight grid, added with saturation.

In fixed-point training (QZO-FF, Chen et al., "Stepping Forward on the Last Mile", NeurIPS 2024)
the weights are integers `q` on a grid of step `s` (`w = s q`) and an optimizer's float update `u`
is expressed in quantization steps. It must become an integer before it can be added:

- `"nearest"`: `Δ = round(u)`. An update below half a step rounds to zero and the weight never
  moves: the paper's explanation of why 8-bit weights (w8a8) stall where 16-bit ones (w16a8) learn.
- `"stochastic"`: `Δ = ⌊u + ξ⌋, ξ ~ U[0, 1)`, so `E[Δ] = u`: small updates move a weight with
  probability `|u|` (unbiased; the key lives in the state).
- `"error_feedback"`: a float residual `r` per integer weight keeps what rounding dropped,
  `r ← r + u; Δ = round(r); r ← r − Δ`, so sub-step updates accumulate until they cross a step
  (deterministic; Seide et al., "1-bit SGD", 2014; Karimireddy et al., "EF-SGD", 2019).

The integer is then added with saturation at the symmetric `bits`-bit bounds `±(2^{b-1} − 1)`
(never wrap-around), e.g. ±7 for 4-bit weights held in int8.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fgjax import _masks
from fgjax.quant._integer import round_nearest, round_stochastic, saturating_add

PyTree = Any
ROUNDINGS = ("nearest", "stochastic", "error_feedback")
# Float updates are clipped to ±2^30 steps before the cast to int32: far beyond any 16-bit range,
# and small enough that `bound - delta` in `saturating_add` cannot overflow.
_DELTA_LIMIT = 2**30


def _is_integer(leaf) -> bool:
  return leaf is not None and jnp.issubdtype(jnp.result_type(leaf), jnp.integer)


def _resolve_bits(bits, params: PyTree) -> list[int | None]:
  """One bit width per leaf of `params` (None for float leaves)."""
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  leaves = [leaf for _, leaf in paths_leaves]
  if bits is None or isinstance(bits, int):
    per_leaf = [bits] * len(leaves)
  elif callable(bits):
    per_leaf = [bits(_masks.path_to_str(p), leaf) for p, leaf in paths_leaves]
  else:
    per_leaf = treedef.flatten_up_to(bits)
  out = []
  for leaf, width in zip(leaves, per_leaf, strict=True):
    if not _is_integer(leaf):
      out.append(None)
      continue
    dtype_bits = jnp.iinfo(jnp.result_type(leaf)).bits
    width = dtype_bits if width is None else int(width)
    if not 2 <= width <= dtype_bits:
      raise ValueError(f"bits: {width} does not fit an integer leaf of dtype {leaf.dtype}.")
    out.append(width)
  return out


def _integer_delta(update: jax.Array) -> jax.Array:
  """An integral update (float holding integers, or integer) as int32, clipped to ±2^30."""
  if jnp.issubdtype(update.dtype, jnp.integer):
    return jnp.clip(update.astype(jnp.int32), -_DELTA_LIMIT, _DELTA_LIMIT)
  return jnp.clip(update, -_DELTA_LIMIT, _DELTA_LIMIT).astype(jnp.int32)


def apply_integer_updates(params: PyTree, updates: PyTree, bits=None) -> PyTree:
  """`params + updates`, with a saturating add on the integer leaves (never wrap-around).

  .. math:: q' = \\operatorname{clip}(q + \\operatorname{round}(u), -(2^{b-1}-1), 2^{b-1}-1)

  Integer leaves take integer updates (from `integer_updates`) as they are; a float update on an
  integer leaf is rounded to nearest first. Float leaves: `(p + u).astype(p.dtype)` as
  `optax.apply_updates`, which must not be used for integer leaves (it adds in the promoted dtype
  and casts back, so 127 + 1 wraps to -128 in int8).

  Args:
    params: a pytree of float and integer arrays.
    updates: a pytree with the structure of `params`.
    bits: the bit width of the integer grid: None (the dtype's width: int8 -> 8, int16 -> 16), an
      int for every integer leaf, a pytree of ints/None with the structure of `params`, or a
      predicate `(path "a/b/kernel", leaf) -> int | None`. 4-bit weights are held in int8, so pass
      `bits=4` for them.

  Returns:
    The updated parameters, each leaf in its own dtype; integer leaves inside `±(2^{b-1}-1)`.

  Example:
    >>> apply_integer_updates({"w": jnp.int8([120, -3])}, {"w": jnp.float32([20.0, 0.6])})
    {'w': Array([127, -2], dtype=int8)}
  """
  leaves, treedef = jax.tree_util.tree_flatten(params)
  update_leaves = treedef.flatten_up_to(updates)
  widths = _resolve_bits(bits, params)
  out = []
  for param, update, width in zip(leaves, update_leaves, widths, strict=True):
    if update is None:
      out.append(param)
    elif width is None:
      out.append(jnp.asarray(param + update).astype(jnp.result_type(param)))
    else:
      update = jnp.asarray(update)
      if not jnp.issubdtype(update.dtype, jnp.integer):
        update = round_nearest(update.astype(jnp.float32))
      out.append(saturating_add(param, _integer_delta(update), bits=width))
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
      moves (after saturation): 1 − this is the zero-update rate.
  """

  key: jax.Array
  residual: PyTree
  changed_fraction: jax.Array


def integer_updates(
  rounding: str = "nearest", seed: int = 0, *, bits=None, mask=None
) -> optax.GradientTransformationExtraArgs:
  """Turns float updates of integer leaves into integer updates that stay on the `bits`-bit grid.

  For an integer leaf `q` with float update `u` (in quantization steps, e.g. `-lr · ĝ` from
  `optax.sgd` after an SPSA estimate on integer weights) the output is the int32 update

  .. math:: \\Delta' = \\operatorname{clip}(q + \\Delta, -(2^{b-1}-1), 2^{b-1}-1) - q,

  with `Δ` from the rounding mode (module docstring): `"nearest"`, `"stochastic"`
  (`E[Δ] = u`) or `"error_feedback"` (residual in the state). Since `q + Δ'` is already in range,
  `apply_integer_updates` (or even `optax.apply_updates`) adds it without overflow. Float leaves
  pass through untouched. Put this transform last in the chain; it needs `params`.

    >>> opt = optax.chain(
    ...   fgjax.forward_gradient(fgjax.estimators.spsa(
    ...     4, epsilon=1.0, sign=True, distribution="rademacher", mask=fgjax.path_mask("head"))),
    ...   optax.sgd(0.3),
    ...   fgjax.integer_updates("stochastic"),
    ... )
    >>> updates, state = opt.update(params, state, params, value_fn=loss_of_params)
    >>> params = fgjax.apply_integer_updates(params, updates)

  Paper: Chen et al., "Stepping Forward on the Last Mile" (NeurIPS 2024), QZO-FF's quantized update.

  Args:
    rounding: `"nearest"`, `"stochastic"` or `"error_feedback"`.
    seed: seeds the stochastic-rounding key.
    bits: the grid's bit width: None (the dtype's), an int, a pytree or a predicate (see
      `apply_integer_updates`); pass 4 for 4-bit weights held in int8.
    mask: which integer leaves get an error-feedback residual and are counted in
      `changed_fraction` (None: all integer leaves; pytree of bools or predicate on paths). Leaves
      outside it are still rounded (to nearest under error feedback).

  Returns:
    An `optax.GradientTransformationExtraArgs` with state `IntegerUpdatesState`.
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
    leaves, treedef = jax.tree_util.tree_flatten(params)
    update_leaves = treedef.flatten_up_to(updates)
    residual_leaves = treedef.flatten_up_to(state.residual)
    widths = _resolve_bits(bits, params)
    key, step_key = jax.random.split(state.key)
    out, new_residual = [], []
    changed = jnp.zeros((), jnp.float32)
    total = 0
    for index, (param, update, residual, width, counted) in enumerate(
      zip(leaves, update_leaves, residual_leaves, widths, flags(params), strict=True)
    ):
      if width is None or update is None:
        out.append(update)
        new_residual.append(residual)
        continue
      update = jnp.asarray(update)
      if jnp.issubdtype(update.dtype, jnp.integer):
        step = update
      else:
        update = update.astype(jnp.float32)
        if rounding == "stochastic":
          step = round_stochastic(jax.random.fold_in(step_key, index), update)
        elif rounding == "error_feedback" and not isinstance(residual, optax.MaskedNode):
          accumulated = residual + update
          step = round_nearest(accumulated)
          # The residual drops the rounded step even where saturation clips it, so it stays in
          # [-1/2, 1/2] instead of growing against a bound.
          residual = accumulated - step
        else:
          step = round_nearest(update)
      moved = saturating_add(param, _integer_delta(step), bits=width)
      delta = moved.astype(jnp.int32) - param.astype(jnp.int32)
      out.append(delta)
      new_residual.append(residual)
      if counted:
        changed = changed + jnp.sum(delta != 0).astype(jnp.float32)
        total += int(np.size(param))
    return jax.tree_util.tree_unflatten(treedef, out), IntegerUpdatesState(
      key=key,
      residual=jax.tree_util.tree_unflatten(treedef, new_residual),
      changed_fraction=changed / max(total, 1),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
