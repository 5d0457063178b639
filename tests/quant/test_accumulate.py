"""Exact integer products on an int8 x int8 -> int32 unit, against an int64 NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgjax import quant
from fgjax.quant import _accumulate

DOT = (((1,), (0,)), ((), ()))


def _extreme_integers(seed, shape, bits):
  """Integers on the `bits` grid, mostly at the bounds (the worst case for an accumulator)."""
  rng = np.random.default_rng(seed)
  bound = 2 ** (bits - 1) - 1
  values = rng.integers(-bound, bound + 1, size=shape)
  extreme = rng.random(shape) < 0.7
  return np.where(extreme, np.where(rng.random(shape) < 0.8, bound, -bound), values)


def _dtype(bits):
  return jnp.int8 if bits <= 8 else jnp.int16


def _contraction_dtypes(fn, *args):
  return [dtypes for _, dtypes, _ in quant.contraction_operand_dtypes(fn, *args)]


@pytest.mark.parametrize(
  "fan_in,lhs_bits,rhs_bits",
  [
    (517, 8, 16),
    (3072, 8, 16),
    (131078, 8, 16),
    (3072, 16, 16),
    (131078, 8, 8),
    (517, 4, 16),
  ],
)
def test_integer_dot_is_exact_at_every_fan_in(fan_in, lhs_bits, rhs_bits):
  x = _extreme_integers(0, (2, fan_in), lhs_bits)
  w = _extreme_integers(1, (fan_in, 3), rhs_bits)
  fn = jax.jit(
    lambda a, b: _accumulate.integer_dot_general(a, b, DOT, lhs_bits=lhs_bits, rhs_bits=rhs_bits)
  )
  args = (jnp.asarray(x, _dtype(lhs_bits)), jnp.asarray(w, _dtype(rhs_bits)))
  result = fn(*args)
  expected = x.astype(np.int64) @ w.astype(np.int64)
  np.testing.assert_array_equal(result.to_int64(), expected)
  # The float32 result is the exact sum rounded (at most twice: relative error <= 2^-23).
  np.testing.assert_allclose(result.to_float(), expected.astype(np.float64), rtol=2.0**-23)
  # Every product runs on int8 operands with int32 accumulation.
  dtypes = _contraction_dtypes(fn, *args)
  assert dtypes and all(d == ("int8", "int8", "int32") for d in dtypes)


def test_chunked_contraction_is_exact_beyond_one_int32_accumulator():
  # 16 x 16 bits: one pair of planes can reach 128 * 128 per term, so 131078 terms overflow a
  # single int32 accumulator; the contraction is cut into chunks.
  assert _accumulate.max_chunk(16, 16) < 131078 < _accumulate.max_chunk(8, 16)
  x = np.full((1, 131078), 32767)
  w = np.full((131078, 1), -32767)
  fn = jax.jit(lambda a, b: _accumulate.integer_dot_general(a, b, DOT, lhs_bits=16, rhs_bits=16))
  result = fn(jnp.asarray(x, jnp.int16), jnp.asarray(w, jnp.int16))
  np.testing.assert_array_equal(result.to_int64(), [[-131078 * 32767 * 32767]])


@pytest.mark.parametrize("lhs_bits,rhs_bits,groups", [(8, 16, 1), (16, 16, 2), (8, 8, 2)])
def test_integer_conv_is_exact_with_padding_strides_and_groups(lhs_bits, rhs_bits, groups):
  x = _extreme_integers(2, (2, 7, 6, 4), lhs_bits)
  w = _extreme_integers(3, (3, 3, 4 // groups, 6), rhs_bits)
  kwargs = dict(
    window_strides=(2, 1),
    padding=((1, 1), (2, 0)),
    rhs_dilation=(1, 2),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=groups,
  )
  fn = jax.jit(
    lambda a, b: _accumulate.integer_conv_general_dilated(
      a, b, lhs_bits=lhs_bits, rhs_bits=rhs_bits, **kwargs
    )
  )
  result = fn(jnp.asarray(x, _dtype(lhs_bits)), jnp.asarray(w, _dtype(rhs_bits)))
  # float64 holds these sums exactly (|y| < 2^53): the int64-exact reference.
  with jax.enable_x64(True):
    expected = jax.lax.conv_general_dilated(
      jnp.asarray(x, jnp.float64), jnp.asarray(w, jnp.float64), **kwargs
    )
    expected = np.asarray(expected).astype(np.int64)
  np.testing.assert_array_equal(result.to_int64(), expected)


@pytest.mark.parametrize("name", ["w16a8", "w16a16"])
def test_quantized_dense_runs_int8_operands_and_is_exact_at_large_fan_in(name):
  # Fan-in 600 > 516: int16 x int16 with int32 accumulation could overflow here.
  config = quant.preset(name)
  x = jax.random.normal(jax.random.key(0), (2, 600))
  layer = quant.Dense(3, use_bias=False, quant=config)
  variables = jax.jit(layer.init)(jax.random.key(1), x)
  dtypes = _contraction_dtypes(lambda v: layer.apply(v, x), variables)
  integer = [d for d in dtypes if d[0] != "float32"]
  assert integer and all(d == ("int8", "int8", "int32") for d in integer)

  kernel = variables["params"]["kernel"]
  # The quantizers multiply by the reciprocal of the scale, as AQT does.
  s_w = jnp.max(jnp.abs(kernel), axis=0, keepdims=True) / quant.max_int(config.weight_bits)
  q_w = jnp.round(kernel * (1.0 / s_w))
  s_x = jnp.max(jnp.abs(x)) / quant.max_int(config.act_bits)
  q_x = jnp.round(x * (1.0 / s_x))
  exact = np.asarray(q_x, np.int64) @ np.asarray(q_w, np.int64)
  expected = exact.astype(np.float64) * np.float64(s_x) * np.asarray(s_w, np.float64)
  np.testing.assert_allclose(jax.jit(layer.apply)(variables, x), expected, rtol=1e-6, atol=1e-7)
