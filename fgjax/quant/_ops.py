"""Quantized `dot_general` and `conv_general_dilated` with a straight-through `custom_jvp`.

Why not AQT's Flax ops directly: `aqt_flax.AqtDotGeneral` wraps its core in a Flax-lifted
`custom_vjp`, so `jax.jvp` refuses it, and without that wrapper the tangent goes through `round`
(zero derivative). Here the forward runs in integers and the tangent follows AQT's backward rule
(`dg_core_vjp_bwd` with `use_fwd_quant=True`): the tangent of each operand is multiplied by its
quantizer's straight-through clipping mask and contracted with the other operand's *dequantized*
value,

.. math::
  \\dot y = (\\dot x \\odot m_x) \\cdot \\hat w + \\hat x \\cdot (\\dot w \\odot m_w),

which is linear in the tangents, so `jax.grad` follows by transposition.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from fgjax.quant import _accumulate
from fgjax.quant._config import QuantConfig
from fgjax.quant._integer import max_int, round_nearest


def _quantize(x, bits, reduce_axes, integer_scale=None):
  """Abs-max symmetric quantization; returns (integral float values, scale, clip mask).

  With `integer_scale` (integer weight storage) `x` already holds integers and is only clipped.
  """
  qmax = max_int(bits)
  if integer_scale is None:
    absmax = jnp.max(jnp.abs(x), axis=reduce_axes, keepdims=True)
    absmax = jnp.where(absmax == 0.0, jnp.ones_like(absmax), absmax)
    scale = lax.stop_gradient(absmax / qmax)
    # Multiply by the reciprocal as AQT does (QTensor.quant), so the integers agree with AQT.
    scaled = x * lax.reciprocal(scale)
  else:
    scale = lax.stop_gradient(integer_scale.astype(jnp.float32))
    scaled = x
  # Straight-through mask: 1 where the value is inside the grid. With abs-max scales nothing is
  # clipped; with stored integer weights a perturbation can push a value off the grid.
  mask = (jnp.abs(scaled) <= qmax + 0.5).astype(x.dtype)
  q = jnp.clip(round_nearest(scaled), -qmax, qmax)
  return q, scale, mask


def _sides(config: QuantConfig, kernel_is_integer: bool):
  w_bits = config.weight_bits
  if kernel_is_integer and w_bits is None:
    raise ValueError("An integer kernel needs QuantConfig.weight_bits.")
  return config.act_bits, w_bits


def _make_op(
  config, contract, integer_contract, kernel_scale, x_reduce_axes, w_reduce_axes, out_scale_fn
):
  """Builds the custom_jvp op; `contract(a, b, preferred, precision)` is the dot or the conv,
  `integer_contract(a, b)` its exact integer form (`fgjax.quant._accumulate`)."""
  x_bits, w_bits = config.act_bits, config.weight_bits

  def pieces(lhs, rhs):
    if x_bits is None:
      x_hat, x_mask, x_int, x_scale = lhs, None, None, None
    else:
      x_int, x_scale, x_mask = _quantize(lhs, x_bits, x_reduce_axes)
      x_hat = x_int * x_scale
    if w_bits is None:
      w_hat, w_mask, w_int, w_scale = rhs, None, None, None
    else:
      w_int, w_scale, w_mask = _quantize(rhs, w_bits, w_reduce_axes, kernel_scale)
      w_hat = w_int * w_scale
    if x_int is not None and w_int is not None:
      # int8 x int8 -> int32 products, exact at every fan-in; one rounding to float32 at the end.
      acc = integer_contract(x_int, w_int).to_float()
      out = acc * out_scale_fn(x_scale, w_scale)
    else:
      out = contract(x_hat, w_hat, jnp.float32)
    return out.astype(lhs.dtype), (x_hat, w_hat, x_mask, w_mask)

  @jax.custom_jvp
  def op(lhs, rhs):
    return pieces(lhs, rhs)[0]

  @op.defjvp
  def op_jvp(primals, tangents):
    lhs, rhs = primals
    dlhs, drhs = tangents
    out, (x_hat, w_hat, x_mask, w_mask) = pieces(lhs, rhs)
    tangent = jnp.zeros_like(out)
    if x_mask is not None:
      dlhs = dlhs * x_mask
    tangent = tangent + contract(dlhs, w_hat, jnp.float32).astype(out.dtype)
    if w_mask is not None:
      drhs = drhs * w_mask
      if kernel_scale is not None:
        # The kernel holds integers: one unit of it is `kernel_scale` in weight space.
        drhs = drhs * lax.stop_gradient(kernel_scale).astype(drhs.dtype)
    tangent = tangent + contract(x_hat, drhs, jnp.float32).astype(out.dtype)
    return out, tangent

  return op


def _float_kernel(rhs):
  """Integer kernels (integer weight storage) enter the op as float32 holding the integers."""
  if jnp.issubdtype(rhs.dtype, jnp.integer):
    # Exact: |q| <= 32767 < 2^24. Integer primals have no tangent; a forward-gradient estimator
    # differentiates with respect to a float32 copy of the integers instead.
    return lax.stop_gradient(rhs.astype(jnp.float32)), True
  return rhs, False


def _bf16(lhs, rhs):
  return lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16)


def dot_general(config: QuantConfig, kernel_scale: jax.Array | None = None):
  """A quantized drop-in for `jax.lax.dot_general` (lhs: activations, rhs: weights).

  The forward quantizes `lhs` with `config.act_bits` (per tensor, or per token = one scale per
  non-contracting index) and `rhs` with `config.weight_bits` (one scale per non-contracting index
  of `rhs`, i.e. per output channel), multiplies the integers exactly on an int8 x int8 -> int32
  unit (a 16-bit side is split into int8 planes; `fgjax.quant.integer_dot_general`), and rescales:

  .. math:: y = (s_x s_w) \\odot (q_x \\cdot q_w) .

  The integer sum is exact at every fan-in; only its conversion to float32 before the rescale
  rounds (once, for sums beyond 2^24). The JVP is the straight-through
  rule of the module docstring, so `jax.jvp`, `jax.linearize` and `jax.grad` all work.

  Args:
    config: the quantization setting. A config without bits gives float (or bfloat16) math.
    kernel_scale: for integer weight storage, the stored per-channel scale, broadcastable to
      `rhs` and constant along the contracting axes; `rhs` then holds integers (any dtype) and its
      tangent is counted in integer units. `None`: the scale is abs-max calibrated per call.

  Returns:
    `fn(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None)`, as Flax's
    `nn.Dense(dot_general=...)` and `nn.DenseGeneral(dot_general=...)` call it. Stateless: it
    holds no calibration, so one can be made per layer and per call.

  Example:
    >>> dg = dot_general(QuantConfig(weight_bits=8, act_bits=8))
    >>> y = dg(jnp.ones((2, 3)), jnp.ones((3, 4)), (((1,), (0,)), ((), ())))
  """

  def fn(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    out_dtype = preferred_element_type
    rhs, kernel_is_integer = _float_kernel(rhs)
    if config.is_float and not kernel_is_integer:
      if config.compute_dtype == "bfloat16":
        lhs, rhs = _bf16(lhs, rhs)
        out = lax.dot_general(
          lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=jnp.float32
        )
        return out if out_dtype is None else out.astype(out_dtype)
      return lax.dot_general(
        lhs, rhs, dimension_numbers, precision, preferred_element_type, **kwargs
      )
    _sides(config, kernel_is_integer)
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    lhs_contract, rhs_contract = tuple(lhs_contract), tuple(rhs_contract)
    if config.act_granularity == "per_tensor":
      x_reduce_axes = tuple(range(lhs.ndim))
    else:
      x_reduce_axes = lhs_contract
    if kernel_scale is not None:
      kscale = jnp.asarray(kernel_scale, jnp.float32)
      kscale = jnp.broadcast_to(kscale, (1,) * (rhs.ndim - kscale.ndim) + kscale.shape)
      if any(kscale.shape[a] != 1 for a in rhs_contract):
        raise ValueError(
          f"kernel_scale of shape {kscale.shape} varies along contracting axes {rhs_contract}."
        )
    else:
      kscale = None
    lhs_scale_shape = tuple(1 if a in lhs_contract else d for a, d in enumerate(lhs.shape))
    rhs_scale_shape = tuple(1 if a in rhs_contract else d for a, d in enumerate(rhs.shape))

    def contract(a, b, preferred, precision_override=None):
      return lax.dot_general(
        a,
        b,
        dimension_numbers,
        precision=precision_override or precision,
        preferred_element_type=preferred,
      )

    def out_scale(x_scale, w_scale):
      # Product of the per-row and per-column scales laid out like the output: a dot_general of
      # the two scale tensors (contracting axes have size 1, so it is one multiply per entry).
      xs = jnp.broadcast_to(x_scale, lhs_scale_shape)
      ws = jnp.broadcast_to(w_scale, rhs_scale_shape)
      return lax.dot_general(xs, ws, dimension_numbers, precision=lax.Precision.HIGHEST)

    def integer_contract(a, b):
      return _accumulate.integer_dot_general(
        a, b, dimension_numbers, lhs_bits=config.act_bits, rhs_bits=config.weight_bits
      )

    op = _make_op(
      config, contract, integer_contract, kscale, x_reduce_axes, rhs_contract, out_scale
    )
    out = op(lhs, rhs)
    return out if out_dtype is None else out.astype(out_dtype)

  return fn


def conv_general_dilated(config: QuantConfig, kernel_scale: jax.Array | None = None):
  """A quantized drop-in for `jax.lax.conv_general_dilated` (lhs: activations, rhs: kernel).

  Same numerics as `dot_general`: per-output-channel weight scales, per-tensor or per-example
  (`act_granularity="per_token"`) activation scales, exact int8 x int8 -> int32 products,
  rescaled per (example, output channel); the JVP is the straight-through rule.

  Args:
    config: the quantization setting.
    kernel_scale: for integer weight storage, the per-output-channel scale broadcastable to `rhs`
      (e.g. shape `(1, ..., 1, out_features)` for Flax's HWIO kernels).

  Returns:
    `fn(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
    dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
    preferred_element_type=None)`, as `nn.Conv(conv_general_dilated=...)` calls it.
  """

  def fn(
    lhs,
    rhs,
    window_strides: Sequence[int],
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
  ):
    rhs, kernel_is_integer = _float_kernel(rhs)
    out_dtype = preferred_element_type

    def contract(a, b, preferred, precision_override=None):
      return lax.conv_general_dilated(
        a,
        b,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision_override or precision,
        preferred_element_type=preferred,
      )

    if config.is_float and not kernel_is_integer:
      if config.compute_dtype == "bfloat16":
        lhs, rhs = _bf16(lhs, rhs)
        out = contract(lhs, rhs, jnp.float32)
      else:
        out = contract(lhs, rhs, preferred_element_type)
      return out if out_dtype is None else out.astype(out_dtype)
    _sides(config, kernel_is_integer)
    dnums = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    lhs_batch_axis = dnums.lhs_spec[0]
    rhs_out_axis = dnums.rhs_spec[0]
    out_batch_axis, out_feature_axis = dnums.out_spec[0], dnums.out_spec[1]
    if config.act_granularity == "per_tensor":
      x_reduce_axes = tuple(range(lhs.ndim))
    else:
      if batch_group_count != 1:
        raise NotImplementedError("per_token activation scales with batch_group_count > 1.")
      x_reduce_axes = tuple(a for a in range(lhs.ndim) if a != lhs_batch_axis)
    w_reduce_axes = tuple(a for a in range(rhs.ndim) if a != rhs_out_axis)
    kscale = None
    if kernel_scale is not None:
      kscale = jnp.asarray(kernel_scale, jnp.float32)
      kscale = jnp.broadcast_to(kscale, (1,) * (rhs.ndim - kscale.ndim) + kscale.shape)
      if any(kscale.shape[a] != 1 for a in w_reduce_axes):
        raise ValueError(f"kernel_scale of shape {kscale.shape} is not per output channel.")

    out_ndim = lhs.ndim

    def out_scale(x_scale, w_scale):
      xs = jnp.reshape(x_scale, (-1,))  # (1,) or (N,)
      ws = jnp.reshape(w_scale, (-1,))  # (C_out,)
      shape_x = [1] * out_ndim
      shape_x[out_batch_axis] = xs.shape[0]
      shape_w = [1] * out_ndim
      shape_w[out_feature_axis] = ws.shape[0]
      return xs.reshape(shape_x) * ws.reshape(shape_w)

    def integer_contract(a, b):
      return _accumulate.integer_conv_general_dilated(
        a,
        b,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        batch_group_count,
        lhs_bits=config.act_bits,
        rhs_bits=config.weight_bits,
      )

    op = _make_op(
      config, contract, integer_contract, kscale, x_reduce_axes, w_reduce_axes, out_scale
    )
    out = op(lhs, rhs)
    return out if out_dtype is None else out.astype(out_dtype)

  return fn
