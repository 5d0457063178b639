"""Evaluate a loss with parameter leaves replaced lazily, each just before the op that reads it.

The memory of MeZO ("memory equals inference") needs each layer's perturbed weights to exist only
while that layer runs. Passing a whole perturbed tree to the loss lets XLA compute all of them up
front (a copy of the parameters). Instead we trace the loss to a jaxpr once and re-emit it; when an
equation first reads a trainable leaf, the replacement is computed there, given that equation's
other operands (the incoming activation) to depend on (see `_perturbation.tie`), so XLA cannot
hoist it earlier. Works for any JAX loss function; `jit`-wrapped sub-functions are inlined so the
tie stays at layer granularity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.extend import core as jex_core

# replace(index, leaf, tie) -> (new leaf, tie'): `tie` is a tuple of values the replacement must
# follow (its draw is made to depend on them); the equation then reads the returned tie' values,
# so a replacement may also pass them through an op of its own.
Replace = Callable[[int, jax.Array, tuple], tuple[jax.Array, tuple]]

_INLINED = ("pjit", "jit", "closed_call")
_LAYER_OPS = ("dot_general", "conv_general_dilated")

# The replacements are tied to the activations only when they could cost memory: when the selected
# leaves take more than this fraction of the forward's largest intermediate value. Below it (a
# small CNN on large images: 0.26 MB of weights against 8 MB for one activation) XLA may compute
# the replacements wherever it likes, which costs at most that fraction of one activation, and
# keeps the forward's fusions whole. A tie reads an activation, and an extra reader splits XLA:CPU's
# YNNPACK fusion of the whole network into one fusion per convolution plus a pass over the
# activation for each bias and ReLU (SmallCNN, batch 64: the two ±ε forwards took 24.5 ms tied
# against 10.3 ms untied and 10.4 ms for two plain forwards; issue 15).
UNTIED_FRACTION = 0.1


def call_with_replaced_leaves(
  loss: Callable[[list[jax.Array]], Any],
  leaves: Sequence[jax.Array],
  selected: Sequence[bool],
  replace: Replace,
) -> Any:
  """Returns loss(leaves') where leaves'[i] = replace(i, leaves[i], tie) for selected leaves."""
  closed, out_shape = jax.make_jaxpr(loss, return_shape=True)(list(leaves))
  flat_leaves = list(leaves)
  pending = {}  # jaxpr var -> leaf index, for selected leaves not yet replaced
  for index, (var, on) in enumerate(zip(closed.jaxpr.invars, selected, strict=True)):
    if on:
      pending[var] = index
  # leaf index -> replacement; the last values computed; the latest matmul or convolution output
  # and its number; for each value computed, the number of the latest matmul or convolution it
  # depends on (by id, holding the value so that the id stays its own).
  selected_bytes = sum(leaf.nbytes for leaf, on in zip(leaves, selected, strict=True) if on)
  tied = selected_bytes > UNTIED_FRACTION * _largest_intermediate(closed.jaxpr)
  state = {"done": {}, "last": (), "anchor": None, "layers": 0, "after": {}, "tied": tied}
  out = _eval(closed.jaxpr, closed.consts, flat_leaves, pending, replace, state)
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), out)


def _eval(jaxpr, consts, args, pending, replace, state):
  env: dict[Any, Any] = {}
  lazy: dict[Any, int] = {}  # var -> leaf index, for vars that stand for a selected leaf

  def is_lazy(var) -> bool:
    return not isinstance(var, jex_core.Literal) and var in lazy

  def read(var):
    if isinstance(var, jex_core.Literal):
      return var.val
    if var in lazy:
      return state["done"][lazy[var]]
    return env[var]

  for var, value in zip(jaxpr.constvars, consts, strict=True):
    env[var] = value
  for var, value in zip(jaxpr.invars, args, strict=True):
    env[var] = value
    if var in pending:
      lazy[var] = pending[var]

  for eqn in jaxpr.eqns:
    inline = eqn.primitive.name in _INLINED and "jaxpr" in eqn.params
    variables = _unique(v for v in eqn.invars if not isinstance(v, jex_core.Literal))
    fresh = [v for v in variables if v in lazy and lazy[v] not in state["done"]]
    if fresh and not inline:
      # Replace the leaves this equation reads first, after its other operands exist and after the
      # latest matmul or convolution: a layer whose input was ready early (a residual shortcut)
      # would otherwise get its replacement early, and hold it beside the activations.
      plain = [v for v in variables if v not in lazy] if state["tied"] else []
      tie = tuple(env[v] for v in plain) if plain else state["last"] if state["tied"] else ()
      # The anchor is only added when the operands do not already depend on it: an extra reader
      # of a convolution's output keeps it alive beyond the op that consumes it (on SmallCNN the
      # ReLU could then not overwrite the convolution's buffer: 3 MiB more).
      anchor = state["anchor"]
      follows = max((_after(state, t) for t in tie), default=-1) >= state["layers"]
      extra = () if anchor is None or follows or not state["tied"] else (anchor,)
      tie = tuple(tie) + extra
      for var in fresh:
        state["done"][lazy[var]], tie = replace(lazy[var], env[var], tuple(tie))
      tie = tuple(tie)[: len(tie) - len(extra)]
      if plain:
        for var, value in zip(plain, tie, strict=True):
          env[var] = value
    if inline:
      sub = eqn.params["jaxpr"]
      sub_pending, values = {}, []
      for var, sub_var in zip(eqn.invars, sub.jaxpr.invars, strict=True):
        if is_lazy(var) and lazy[var] not in state["done"]:
          sub_pending[sub_var] = lazy[var]
          values.append(env[var])
        else:
          values.append(read(var))
      outs = _eval(sub.jaxpr, sub.consts, values, sub_pending, replace, state)
    else:
      values = [read(v) for v in eqn.invars]
      with eqn.ctx.manager:
        outs = eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))
      if not eqn.primitive.multiple_results:
        outs = [outs]
    if not inline:
      after = max((_after(state, read(v)) for v in eqn.invars), default=-1)
      if eqn.primitive.name in _LAYER_OPS:
        state["layers"] += 1
        state["anchor"] = outs[0]
        after = state["layers"]
      for out in outs:
        state["after"][id(out)] = (after, out)
    for var, value in zip(eqn.outvars, outs, strict=True):
      env[var] = value
    state["last"] = tuple(o for o in outs if hasattr(o, "shape"))
  return [read(v) for v in jaxpr.outvars]


def _largest_intermediate(jaxpr) -> int:
  """Bytes of the largest value computed by `jaxpr` or the jaxprs it calls."""
  largest = 0
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      aval = getattr(var, "aval", None)
      if hasattr(aval, "shape") and hasattr(aval, "dtype"):
        largest = max(largest, math.prod(aval.shape) * aval.dtype.itemsize)
    for sub in jex_core.jaxprs_in_params(eqn.params):
      largest = max(largest, _largest_intermediate(sub))
  return largest


def _after(state, value) -> int:
  """The number of the latest matmul or convolution `value` depends on (-1: none)."""
  entry = state["after"].get(id(value))
  return entry[0] if entry is not None and entry[1] is value else -1


def _unique(variables) -> list:
  seen, out = set(), []
  for var in variables:
    if id(var) not in seen:
      seen.add(id(var))
      out.append(var)
  return out
