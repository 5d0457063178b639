"""Operation counts from the jaxpr: MACs of matmuls and convolutions, integer MACs, elementwise ops.

A multiply-accumulate (MAC) is one product added to a sum. Per equation of the traced program:

  dot_general:   MACs = Π(batch dims) · Π(lhs free) · Π(rhs free) · Π(contracting dims)
  conv:          MACs = Π(output shape) · Π(kernel spatial dims) · (input features / groups)
  elementwise and reductions: one op per output element (per input element for reductions).

Integer MACs are those whose two operands are integers (AQT's int8 x int8 -> int32 matmuls): what
an NPU that runs only integer inference would execute. Sub-programs are walked: `jit` and custom
derivative calls once, `scan` `length` times, `cond` by its most expensive branch, `while` once
(its trip count is unknown: flagged in `OpCount.unbounded_loops`). Shape-only ops (reshape,
broadcast, transpose, convert, slicing, iota) cost nothing here. Counting the jaxpr counts what the
program says, before XLA fuses or simplifies it; `xla_cost` gives XLA's own count after.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

_FREE = {
  "reshape",
  "broadcast_in_dim",
  "transpose",
  "convert_element_type",
  "squeeze",
  "expand_dims",
  "slice",
  "dynamic_slice",
  "dynamic_update_slice",
  "concatenate",
  "pad",
  "iota",
  "copy",
  "copy_p",
  "gather",
  "rev",
  "bitcast_convert_type",
  "stop_gradient",
  "optimization_barrier",
  "random_bits",
  "random_wrap",
  "random_unwrap",
  "random_seed",
  "random_fold_in",
  "random_split",
  "device_put",
  "pjit",
  "jit",
  "closed_call",
  "custom_jvp_call",
  "custom_vjp_call",
  "custom_vjp_call_jaxpr",
  "scan",
  "while",
  "cond",
  "remat",
  "checkpoint",
}
_REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin"}


@dataclasses.dataclass
class OpCount:
  """What one call of a function executes, from its jaxpr.

  Attributes:
    macs: multiply-accumulates of dot_general and conv_general_dilated.
    integer_macs: the part of `macs` whose operands are both integers.
    elementwise: other arithmetic ops (one per output element; reductions one per input element).
    integer_elementwise: the part of `elementwise` computed in integer dtypes.
    by_primitive: MACs or ops per primitive name.
    unbounded_loops: number of `while` loops counted once (their trip count is unknown).
  """

  macs: int = 0
  integer_macs: int = 0
  elementwise: int = 0
  integer_elementwise: int = 0
  by_primitive: Counter = dataclasses.field(default_factory=Counter)
  unbounded_loops: int = 0

  def add(self, other: OpCount, times: int = 1) -> None:
    self.macs += times * other.macs
    self.integer_macs += times * other.integer_macs
    self.elementwise += times * other.elementwise
    self.integer_elementwise += times * other.integer_elementwise
    for name, value in other.by_primitive.items():
      self.by_primitive[name] += times * value
    self.unbounded_loops += other.unbounded_loops

  @property
  def integer_ops(self) -> int:
    """Integer operations: 2 per integer MAC (multiply, add) plus integer elementwise ops."""
    return 2 * self.integer_macs + self.integer_elementwise


def _is_integer(aval) -> bool:
  return jnp.issubdtype(aval.dtype, jnp.integer)


def _size(aval) -> int:
  return math.prod(getattr(aval, "shape", ()))


def _dot_macs(eqn) -> int:
  lhs, rhs = (v.aval for v in eqn.invars[:2])
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
  del rhs_contract
  contract = math.prod(lhs.shape[d] for d in lhs_contract)
  batch = math.prod(lhs.shape[d] for d in lhs_batch)
  lhs_free = math.prod(
    s for d, s in enumerate(lhs.shape) if d not in lhs_contract and d not in lhs_batch
  )
  rhs_free = math.prod(
    s
    for d, s in enumerate(rhs.shape)
    if d not in eqn.params["dimension_numbers"][0][1] and d not in rhs_batch
  )
  return batch * lhs_free * rhs_free * contract


def _conv_macs(eqn) -> int:
  rhs = eqn.invars[1].aval
  out = eqn.outvars[0].aval
  spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
  kernel_spatial = math.prod(rhs.shape[d] for d in spec[2:])
  in_per_group = rhs.shape[spec[1]]  # already input features / feature_group_count
  return _size(out) * kernel_spatial * in_per_group


def _sub_jaxprs(value):
  if isinstance(value, jex_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jex_core.Jaxpr):
    yield value
  elif isinstance(value, tuple | list):
    for item in value:
      yield from _sub_jaxprs(item)


def count_jaxpr(jaxpr) -> OpCount:
  """Counts one jaxpr (see the module docstring)."""
  total = OpCount()
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general" or name == "conv_general_dilated":
      macs = _dot_macs(eqn) if name == "dot_general" else _conv_macs(eqn)
      total.macs += macs
      total.by_primitive[name] += macs
      if all(_is_integer(v.aval) for v in eqn.invars[:2]):
        total.integer_macs += macs
      continue
    if name == "cond":
      branches = [count_jaxpr(b.jaxpr) for b in eqn.params["branches"]]
      total.add(max(branches, key=lambda c: (c.macs, c.elementwise)))
      continue
    subs = [j for value in eqn.params.values() for j in _sub_jaxprs(value)]
    if subs:
      times = int(eqn.params.get("length", 1)) if name == "scan" else 1
      if name == "while":
        total.unbounded_loops += 1
      if name in ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"):
        subs = subs[:1]  # the primal program; the others are derivative rules
      for sub in subs:
        total.add(count_jaxpr(sub), times)
      continue
    if name in _FREE:
      continue
    ops = (
      sum(_size(v.aval) for v in eqn.invars) if name in _REDUCTIONS else _size(eqn.outvars[0].aval)
    )
    total.elementwise += ops
    total.by_primitive[name] += ops
    if eqn.outvars and _is_integer(eqn.outvars[0].aval):
      total.integer_elementwise += ops
  return total


def count_ops(fn: Callable, *args, **kwargs) -> OpCount:
  """MACs and other operations of one call `fn(*args, **kwargs)`, from its jaxpr.

  Args:
    fn: any JAX-traceable function (a model's forward, a whole training step).
    *args: example arguments (arrays or `jax.ShapeDtypeStruct`s).
    **kwargs: keyword arguments passed to `fn` (closed over, not traced).

  Returns:
    An `OpCount`.

  Example:
    >>> counts = fgjax.efficiency.count_ops(lambda v, x: model.apply(v, x), variables, x)
    >>> counts.macs, counts.integer_macs
  """
  closed = jax.make_jaxpr(lambda *a: fn(*a, **kwargs))(*args)
  return count_jaxpr(closed.jaxpr)
