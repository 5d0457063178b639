"""Exact integer products on an int8 x int8 -> int32 multiply-accumulate unit (an NPU's MAC).

Why: an integer weight of 16 bits times an 8-bit activation, summed over a fan-in of K, needs up
to log2(K · 127 · 32767) bits: more than an int32 accumulator holds from K = 517 on, and more than
float32's 24-bit mantissa holds exactly from much smaller sums. Many NPUs only multiply int8 by
int8 into int32 accumulators. So every integer product here runs on that unit alone:

1. Each operand is split into int8 *planes*. An operand of at most 8 bits is one plane. A 9..16-bit
   integer `v` is `v = 256 h + l + 128` with `h = v >> 8` (signed) and `l = (v & 255) - 128`, both
   in [-128, 127]; the constant `128` is a plane of ones (the same contraction with an all-ones
   operand, which also counts the valid positions of a padded convolution window).
2. Each pair of planes is one int8 x int8 contraction with int32 accumulation
   (`preferred_element_type=int32`): `1 x 3` products for w16a8, `3 x 3` for w16a16. An int32 sum
   of K products bounded by `|a| |b| <= 127 · 128` is exact for K <= 132,104; a longer contraction
   is cut into chunks that each fit (the hardware's tiling of a long dot product).
3. The weighted sum `Σ 2^p · acc` (p <= 16) of the partial sums over pairs and chunks is carried in
   two int32 limbs, `y = H · 2^16 + L`, with no overflow for fan-ins up to about 2^24 (so the
   *emulated accumulator* is 48 bits wide, built from int32 registers).
4. Only the final conversion to float32, `float(H) · 2^16 + float(L)`, rounds (once, when |y| >=
   2^24), just before the rescale by the operands' scales (as an NPU's requantization does).

The result is bit-exact against an int64 reference (`ExactSum.to_int64`, tested at fan-ins 517,
3072 and 131,078) for every precision of `fgjax.quant` (2..16 bits on either side).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fgjax.quant._integer import max_int

# The emulated hardware: int8 operands, int32 accumulators.
OPERAND_BITS = 8
ACCUMULATOR_BITS = 32
_ACC_MAX = 2 ** (ACCUMULATOR_BITS - 1) - 1
_LIMB_SHIFT = 16


class ExactSum(NamedTuple):
  """An exact integer result held in two int32 limbs: `value = high · 2^16 + low`.

  Attributes:
    high: int32, the multiple of 2^16.
    low: int32, the rest (non-negative, below a few times 2^16).
  """

  high: jax.Array
  low: jax.Array

  def to_float(self) -> jax.Array:
    """float32 of the exact value: `float(high) · 2^16 + float(low)` (one rounding if large)."""
    return self.high.astype(jnp.float32) * float(2**_LIMB_SHIFT) + self.low.astype(jnp.float32)

  def to_int64(self) -> np.ndarray:
    """The exact value as a NumPy int64 array (host side; for tests and inspection)."""
    return np.asarray(self.high, np.int64) * 2**_LIMB_SHIFT + np.asarray(self.low, np.int64)


class _Plane(NamedTuple):
  values: jax.Array | None  # int8 array; None: the all-ones plane
  shift: int  # the plane is weighted by 2^shift
  bound: int  # max |value|


def _planes(values: jax.Array, bits: int) -> list[_Plane]:
  """int8 planes of an integral array on the symmetric `bits`-bit grid (see module docstring)."""
  if bits <= OPERAND_BITS:
    return [_Plane(values.astype(jnp.int8), 0, max_int(bits))]
  if bits > 2 * OPERAND_BITS:
    raise ValueError(f"integer products support up to {2 * OPERAND_BITS} bits, got {bits}.")
  v = values.astype(jnp.int32)
  high = (v >> 8).astype(jnp.int8)  # arithmetic shift: in [-2^(bits-9), 2^(bits-9) - 1]
  low = ((v & 255) - 128).astype(jnp.int8)
  return [
    _Plane(high, 8, 2 ** (bits - 9)),
    _Plane(low, 0, 128),
    _Plane(None, 7, 1),
  ]


def pair_bound(lhs_bits: int, rhs_bits: int) -> int:
  """The largest |a · b| of one pair of int8 planes: the growth of the accumulator per term."""
  lhs = max(p.bound for p in _planes(jnp.zeros((), jnp.int32), lhs_bits))
  rhs = max(p.bound for p in _planes(jnp.zeros((), jnp.int32), rhs_bits))
  return lhs * rhs


def max_chunk(lhs_bits: int, rhs_bits: int) -> int:
  """The longest contraction whose int32 partial sums cannot overflow (132,104 for w16a8)."""
  return _ACC_MAX // pair_bound(lhs_bits, rhs_bits)


def _add_weighted(high, low, acc: jax.Array, shift: int):
  """(high, low) + acc · 2^shift in two limbs, without int32 overflow (0 <= shift <= 16)."""
  keep = _LIMB_SHIFT - shift
  high = high + (acc >> keep)
  low = low + ((acc & ((1 << keep) - 1)) << shift)
  return high, low


def _exact_chunk(
  contract: Callable, lhs, lhs_bits, rhs, rhs_bits, lhs_ones_shape, rhs_ones_shape, expand
) -> ExactSum:
  high = low = None
  for a in _planes(lhs, lhs_bits):
    for b in _planes(rhs, rhs_bits):
      if a.values is None and b.values is None:
        continue  # Handled below with one contraction of ones by ones.
      left = a.values if a.values is not None else jnp.ones(lhs_ones_shape, jnp.int8)
      right = b.values if b.values is not None else jnp.ones(rhs_ones_shape, jnp.int8)
      acc = contract(left, right)
      if b.values is None:
        acc = expand(acc)
      if high is None:
        high = jnp.zeros(acc.shape, jnp.int32)
        low = jnp.zeros(acc.shape, jnp.int32)
      high, low = _add_weighted(high, low, acc, a.shift + b.shift)
  if lhs_bits > OPERAND_BITS and rhs_bits > OPERAND_BITS:
    count = expand(contract(jnp.ones(lhs_ones_shape, jnp.int8), jnp.ones(rhs_ones_shape, jnp.int8)))
    high, low = _add_weighted(high, low, count, 14)
  return ExactSum(high, low)


def _sum(parts: Sequence[ExactSum]) -> ExactSum:
  high = parts[0].high
  low = parts[0].low
  for part in parts[1:]:
    high, low = high + part.high, low + part.low
  return ExactSum(high, low)


def _chunks(size: int, other: int, limit: int) -> list[tuple[int, int]]:
  """Slices of an axis of `size` so that `other · length <= limit` for each."""
  length = limit // other
  if length < 1:
    raise ValueError(
      f"a contraction of {other} terms outside the chunked axis exceeds the exact limit {limit}."
    )
  return [(start, min(start + length, size)) for start in range(0, size, length)]


def integer_dot_general(
  lhs: jax.Array,
  rhs: jax.Array,
  dimension_numbers,
  *,
  lhs_bits: int,
  rhs_bits: int,
) -> ExactSum:
  """The exact integer `lax.dot_general(lhs, rhs)` on an int8 x int8 -> int32 unit.

  .. math:: y = \\sum_{k} q_{x,k}\\, q_{w,k}, \\quad q_x \\in [-(2^{b_x-1}-1), 2^{b_x-1}-1],\\;
     q_w \\in [-(2^{b_w-1}-1), 2^{b_w-1}-1],

  computed with int8 planes and int32 accumulators (module docstring), chunked along the longest
  contracting axis beyond `max_chunk(lhs_bits, rhs_bits)` terms.

  Args:
    lhs: integral array (any int or float dtype holding integers) on the `lhs_bits` grid.
    rhs: integral array on the `rhs_bits` grid.
    dimension_numbers: as `lax.dot_general`'s.
    lhs_bits: bit width of `lhs` (2..16).
    rhs_bits: bit width of `rhs` (2..16).

  Returns:
    `ExactSum(high, low)`; `.to_float()` is the float32 product, `.to_int64()` the exact one.

  Example:
    >>> x = jnp.full((1, 3072), 127, jnp.int8); w = jnp.full((3072, 1), 32767, jnp.int16)
    >>> dims = (((1,), (0,)), ((), ()))
    >>> integer_dot_general(x, w, dims, lhs_bits=8, rhs_bits=16).to_int64()  # 3072 * 127 * 32767
    array([[12782862336]])
  """
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  lhs_contract, rhs_contract = tuple(lhs_contract), tuple(rhs_contract)
  lhs_int = jnp.asarray(lhs).astype(jnp.int32)
  rhs_int = jnp.asarray(rhs).astype(jnp.int32)

  def contract(a, b):
    return lax.dot_general(a, b, dimension_numbers, preferred_element_type=jnp.int32)

  def one_chunk(a, b):
    lhs_keep = set(lhs_contract) | set(lhs_batch)
    rhs_keep = set(rhs_contract) | set(rhs_batch)
    lhs_ones = tuple(d if i in lhs_keep else 1 for i, d in enumerate(a.shape))
    rhs_ones = tuple(d if i in rhs_keep else 1 for i, d in enumerate(b.shape))
    return _exact_chunk(contract, a, lhs_bits, b, rhs_bits, lhs_ones, rhs_ones, lambda y: y)

  fan_in = math.prod(lhs_int.shape[a] for a in lhs_contract)
  limit = max_chunk(lhs_bits, rhs_bits)
  if fan_in <= limit:
    return one_chunk(lhs_int, rhs_int)
  # Cut the longest contracting axis so that each chunk's int32 partial sums are exact.
  which = max(range(len(lhs_contract)), key=lambda i: lhs_int.shape[lhs_contract[i]])
  lhs_axis, rhs_axis = lhs_contract[which], rhs_contract[which]
  size = lhs_int.shape[lhs_axis]
  parts = [
    one_chunk(
      lax.slice_in_dim(lhs_int, start, stop, axis=lhs_axis),
      lax.slice_in_dim(rhs_int, start, stop, axis=rhs_axis),
    )
    for start, stop in _chunks(size, fan_in // size, limit)
  ]
  return _sum(parts)


def integer_conv_general_dilated(
  lhs: jax.Array,
  rhs: jax.Array,
  window_strides: Sequence[int],
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count: int = 1,
  batch_group_count: int = 1,
  *,
  lhs_bits: int,
  rhs_bits: int,
) -> ExactSum:
  """The exact integer `lax.conv_general_dilated(lhs, rhs, ...)` on an int8 x int8 -> int32 unit.

  As `integer_dot_general`; the all-ones planes are convolved with the same padding, so they
  count the valid positions of each window. Beyond `max_chunk` terms per output, the input
  features are cut into chunks (`feature_group_count == 1` only).

  Args:
    lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count, batch_group_count: as `lax.conv_general_dilated`.
    lhs_bits: bit width of the integral `lhs` (2..16).
    rhs_bits: bit width of the integral `rhs` (2..16).

  Returns:
    `ExactSum(high, low)` of the convolution's output shape.
  """
  lhs_int = jnp.asarray(lhs).astype(jnp.int32)
  rhs_int = jnp.asarray(rhs).astype(jnp.int32)
  dnums = lax.conv_dimension_numbers(lhs_int.shape, rhs_int.shape, dimension_numbers)
  lhs_batch_axis, lhs_feature_axis = dnums.lhs_spec[0], dnums.lhs_spec[1]
  rhs_out_axis, rhs_in_axis = dnums.rhs_spec[0], dnums.rhs_spec[1]
  out_feature_axis = dnums.out_spec[1]
  needs_rhs_ones = lhs_bits > OPERAND_BITS
  if needs_rhs_ones and batch_group_count != 1:
    raise NotImplementedError("16-bit activations with batch_group_count > 1.")
  out_features = rhs_int.shape[rhs_out_axis]

  def contract(a, b):
    return lax.conv_general_dilated(
      a,
      b,
      window_strides,
      padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dnums,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count,
      preferred_element_type=jnp.int32,
    )

  def expand(y):
    # The all-ones kernel has one output channel per feature group: repeat it to each channel.
    if y.shape[out_feature_axis] == out_features:
      return y
    if feature_group_count == 1:
      return y
    return jnp.repeat(y, out_features // feature_group_count, axis=out_feature_axis)

  def one_chunk(a, b):
    lhs_ones = tuple(1 if i == lhs_batch_axis else d for i, d in enumerate(a.shape))
    rhs_ones = tuple(feature_group_count if i == rhs_out_axis else d for i, d in enumerate(b.shape))
    return _exact_chunk(contract, a, lhs_bits, b, rhs_bits, lhs_ones, rhs_ones, expand)

  fan_in = rhs_int.size // out_features
  limit = max_chunk(lhs_bits, rhs_bits)
  if fan_in <= limit:
    return one_chunk(lhs_int, rhs_int)
  if feature_group_count != 1 or batch_group_count != 1:
    raise NotImplementedError(
      f"an exact grouped convolution with fan-in {fan_in} > {limit} (chunking needs groups = 1)."
    )
  size = rhs_int.shape[rhs_in_axis]
  parts = [
    one_chunk(
      lax.slice_in_dim(lhs_int, start, stop, axis=lhs_feature_axis),
      lax.slice_in_dim(rhs_int, start, stop, axis=rhs_in_axis),
    )
    for start, stop in _chunks(size, fan_in // size, limit)
  ]
  return _sum(parts)
