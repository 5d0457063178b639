"""Small pure integer helpers for fixed-point training: bounds, rounding, saturating updates."""

import jax
import jax.numpy as jnp
import numpy as np


def max_int(bits: int) -> int:
  """Largest level of the symmetric `bits`-bit grid, :math:`2^{b-1} - 1` (127 for 8 bits).

  Args:
    bits: bit width, >= 2.

  Returns:
    The positive bound; the grid is `[-max_int(bits), max_int(bits)]` (`-2^{b-1}` is never used,
    so negation cannot overflow).
  """
  if bits < 2:
    raise ValueError(f"bits must be >= 2, got {bits}.")
  return 2 ** (bits - 1) - 1


# Bit widths that integer weight storage supports: the storage dtype *is* the bit width, so every
# consumer (perturbation, update, saturation, `changed_fraction`) reads it from the leaf itself.
STORAGE_BITS = (4, 8, 16)
_STORAGE_DTYPES = {4: jnp.dtype(jnp.int4), 8: jnp.dtype(jnp.int8), 16: jnp.dtype(jnp.int16)}


def integer_dtype(bits: int) -> jnp.dtype:
  """Storage dtype of `bits`-bit integer weights: int4, int8 or int16 (`STORAGE_BITS`).

  The dtype carries the bit width, so a 4-bit weight saturates at ±7 wherever it is perturbed or
  updated (there is no separate `bits` setting to forget). XLA:CPU rejects int4 dot/conv operands,
  so the quantized ops widen int4 to int8 just before the contraction.

  Raises:
    ValueError: `bits` is not one of `STORAGE_BITS`.
  """
  if bits not in _STORAGE_DTYPES:
    raise ValueError(
      f"integer weight storage supports weight_bits in {STORAGE_BITS} (int4, int8, int16), got "
      f"{bits!r}; other widths need weight_storage='float' (fake quantization)."
    )
  return _STORAGE_DTYPES[bits]


def bits_of(dtype) -> int:
  """Bit width of an integer dtype (int4 -> 4, int8 -> 8, int16 -> 16)."""
  return int(jnp.iinfo(dtype).bits)


def _bits_of(dtype) -> int:
  return bits_of(dtype)


def saturating_add(x: jax.Array, delta: jax.Array, bits: int | None = None) -> jax.Array:
  """`x + delta` clipped to the symmetric `bits`-bit range, without wrap-around.

  .. math:: \\operatorname{clip}(x + \\delta, -(2^{b-1}-1), 2^{b-1}-1)

  computed exactly: the sum is formed in int32 only where it cannot overflow (for int32 inputs the
  overflowing case is detected by comparing against `bound - delta`, which cannot overflow).

  Args:
    x: signed integer array (int4, int8, int16 or int32).
    delta: signed integer array broadcastable to `x`.
    bits: bit width of the range; default (and maximum): the width of `x.dtype`, e.g. ±7 for
      int4 weights.

  Returns:
    An array of `x.dtype` and the broadcast shape, inside the range.

  Example:
    >>> saturating_add(jnp.int8(120), jnp.int8(100))
    Array(127, dtype=int8)
  """
  x = jnp.asarray(x)
  delta = jnp.asarray(delta)
  if not (jnp.issubdtype(x.dtype, jnp.signedinteger) and jnp.issubdtype(delta.dtype, jnp.integer)):
    raise TypeError(f"saturating_add needs integer arrays, got {x.dtype} and {delta.dtype}.")
  bits = _bits_of(x.dtype) if bits is None else bits
  if bits > _bits_of(x.dtype):
    raise ValueError(f"bits={bits} does not fit dtype {x.dtype}.")
  hi = np.int32(max_int(bits))
  lo = -hi
  x32 = jnp.clip(x.astype(jnp.int32), lo, hi)
  if jnp.issubdtype(delta.dtype, jnp.unsignedinteger) and _bits_of(delta.dtype) >= 32:
    delta = jnp.minimum(delta, np.uint32(2**31 - 1))
  d32 = delta.astype(jnp.int32)
  # Both branches are evaluated by jnp.where; the discarded sum may wrap, which is harmless.
  total = x32 + d32
  up = jnp.where(x32 > hi - d32, hi, total)
  down = jnp.where(x32 < lo - d32, lo, total)
  return jnp.where(d32 > 0, up, down).astype(x.dtype)


def round_nearest(x: jax.Array, dtype=None) -> jax.Array:
  """Round to the nearest integer, ties to even (the forward rounding of the quantizers).

  Args:
    x: float array.
    dtype: optional integer dtype to cast the (already integral) result to.

  Returns:
    `round(x)`, in `x.dtype` or `dtype`.
  """
  out = jax.lax.round(x, jax.lax.RoundingMethod.TO_NEAREST_EVEN)
  return out if dtype is None else out.astype(dtype)


def round_stochastic(key: jax.Array, x: jax.Array, dtype=None) -> jax.Array:
  """Unbiased stochastic rounding: up with probability equal to the fractional part.

  .. math:: \\operatorname{sr}(x) = \\lfloor x + u \\rfloor,\\; u \\sim U[0, 1),
     \\qquad \\mathbb{E}[\\operatorname{sr}(x)] = x .

  Used for fixed-point updates smaller than one integer step (paper, Sec. 3: small updates would
  otherwise round to zero).

  Args:
    key: PRNG key.
    x: float array.
    dtype: optional integer dtype for the result.

  Returns:
    An integral array of `x.dtype` (or `dtype`) with the shape of `x`.
  """
  noise = jax.random.uniform(key, jnp.shape(x), dtype=jnp.result_type(x, jnp.float32))
  out = jnp.floor(x + noise)
  return out if dtype is None else out.astype(dtype)


def quantize_kernel(
  kernel: jax.Array, bits: int, reduce_axes: tuple[int, ...] | None = None
) -> tuple[jax.Array, jax.Array]:
  """Symmetric per-output-channel quantization of a float kernel.

  .. math:: s_c = \\max_{i} |w_{i,c}| / (2^{b-1}-1), \\qquad
     q_{i,c} = \\operatorname{round}(w_{i,c} / s_c)

  (a channel of zeros gets :math:`s_c = 1 / (2^{b-1}-1)`, as in AQT).

  Args:
    kernel: float kernel.
    bits: weight bit width, one of `STORAGE_BITS`.
    reduce_axes: the contracting (input) axes, reduced by the abs-max; default: all but the last
      (Dense, Conv). A `DenseGeneral((heads, head_dim))` kernel of shape `(in, heads, head_dim)`
      has one scale per `(head, dim)`: `reduce_axes=(0,)`.

  Returns:
    `(q, scale)`: `q` of `integer_dtype(bits)` and the kernel's shape; `scale` float32 with the
    kernel's rank and size 1 on `reduce_axes`, so `q * scale` broadcasts back.
    `|q * scale - kernel| <= scale / 2`.
  """
  kernel = jnp.asarray(kernel, jnp.float32)
  if reduce_axes is None:
    reduce_axes = tuple(range(kernel.ndim - 1))
  absmax = jnp.max(jnp.abs(kernel), axis=reduce_axes, keepdims=True)
  absmax = jnp.where(absmax == 0.0, 1.0, absmax)
  scale = absmax / max_int(bits)
  q = jnp.clip(round_nearest(kernel / scale), -max_int(bits), max_int(bits))
  return q.astype(integer_dtype(bits)), scale.astype(jnp.float32)


def dequantize(q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
  """Float value of integers on a scaled grid, `q * scale`.

  Args:
    q: integer (or integral float) array.
    scale: float array broadcastable to `q`.
    dtype: result dtype.

  Returns:
    `q * scale` in `dtype`.
  """
  return (q.astype(dtype) * scale).astype(dtype)
