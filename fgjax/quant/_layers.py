"""Flax layers that take an optional `QuantConfig`, and float <-> integer parameter conversion."""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax.linen import dtypes as flax_dtypes

from fgjax.quant import _ops
from fgjax.quant._config import QuantConfig
from fgjax.quant._integer import (
  dequantize,
  integer_dtype,
  quantize_kernel,
)

QUANT_COLLECTION = "quant"
KERNEL_SCALE = "kernel_scale"


def _keep_integer_kernel(inputs, kernel, bias, dtype=None, inexact=True):
  """Flax's promote_dtype, except that an integer kernel stays integer (int16 is not exact in
  bfloat16; the quantized op reads the integers itself)."""
  inputs, bias = flax_dtypes.promote_dtype(inputs, bias, dtype=dtype, inexact=inexact)
  return inputs, kernel, bias


class _QuantMixin:
  """Shared quantized `__call__`: a plain Flax layer with a quantized op, in this layer's scope.

  The inner layer is the Flax parent class with the same fields plus `dot_general` /
  `conv_general_dilated` replaced by a fresh quantized op, so shapes, padding, batch dims and the
  param tree are Flax's own; `nn.share_scope` keeps its params directly under this layer.
  """

  _op_field = ""

  def _quantized_call(self, flax_cls, inputs):
    config: QuantConfig = self.quant
    if getattr(self, self._op_field) is not None:
      raise ValueError(f"Pass either quant or {self._op_field}, not both.")
    make_op = _ops.dot_general if self._op_field == "dot_general" else _ops.conv_general_dilated
    fields = {
      f.name: getattr(self, f.name)
      for f in dataclasses.fields(flax_cls)
      if f.init and f.name not in ("parent", "name")
    }
    if config.weight_storage == "float":
      fields[self._op_field] = make_op(config)
      inner = flax_cls(**fields)
      nn.share_scope(self, inner)
      return inner(inputs)

    bits = config.weight_bits
    float_init = self.kernel_init
    has_scale = self.has_variable(QUANT_COLLECTION, KERNEL_SCALE)
    # At init the scale comes out of the kernel initializer (one call, one trace); the dict is
    # local to this call, so no calibration state is shared between layers or calls.
    init_scale = {}

    def integer_kernel_init(rng, shape, dtype=None):
      del dtype
      # Flax hands DenseGeneral's initializer a flat (inputs, outputs) shape; the last axis is
      # the output channel for all three layers.
      q, scale = quantize_kernel(float_init(rng, shape, jnp.float32), bits)
      init_scale["value"] = self._kernel_scale_shape(scale)
      return q

    def op(*args, **kwargs):
      if has_scale:
        scale = self.get_variable(QUANT_COLLECTION, KERNEL_SCALE)
        expected = self._kernel_scale_shape(jnp.zeros((1, self._num_features()))).shape
        if tuple(scale.shape) != tuple(expected):
          # A scale calibrated on other axes would broadcast silently (e.g. (1, 1, 4) for a
          # (1, 2, 4) DenseGeneral): refuse it.
          raise ValueError(
            f"{self.name}: kernel_scale has shape {tuple(scale.shape)}, the layer expects "
            f"{tuple(expected)}; convert with quantize_params(..., like=model's variables)."
          )
      else:
        scale = init_scale["value"]
      return make_op(config, kernel_scale=scale)(*args, **kwargs)

    fields[self._op_field] = op
    fields["kernel_init"] = integer_kernel_init
    fields["promote_dtype"] = _keep_integer_kernel
    inner = flax_cls(**fields)
    nn.share_scope(self, inner)
    out = inner(inputs)
    if not has_scale:
      self.variable(QUANT_COLLECTION, KERNEL_SCALE, lambda: init_scale["value"])
    return out


class Dense(_QuantMixin, nn.Dense):
  """`flax.linen.Dense` with an optional `QuantConfig` (`quant=None`: exactly `nn.Dense`).

  With a config the matmul is `fgjax.quant.dot_general(quant)`: integer forward, straight-through
  JVP. With `weight_storage="integer"`, `params["kernel"]` is int8/int16 and the per-output-channel
  scale is `variables["quant"]["kernel_scale"]` of shape `(1, features)`; the bias stays float32.

  Example:
    >>> layer = Dense(4, quant=preset("w8a8"))
    >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 3)))
  """

  quant: QuantConfig | None = None
  _op_field = "dot_general"

  def _num_features(self):
    return self.features

  def _kernel_scale_shape(self, scale):
    return scale

  @nn.compact
  def __call__(self, inputs):
    if self.quant is None:
      return nn.Dense.__call__(self, inputs)
    return self._quantized_call(nn.Dense, inputs)


class DenseGeneral(_QuantMixin, nn.DenseGeneral):
  """`flax.linen.DenseGeneral` with an optional `QuantConfig` (`quant=None`: exactly Flax's).

  Weight scales are per output index (batch and feature axes of the kernel). With
  `weight_storage="integer"` the stored `kernel_scale` is per feature index, shared over
  `batch_dims`: shape `(1,) * (len(batch_dims) + len(axis)) + features`. The bias stays float32.
  """

  quant: QuantConfig | None = None
  _op_field = "dot_general"

  def _num_features(self):
    features = self.features if isinstance(self.features, tuple | list) else (self.features,)
    return math.prod(features)

  def _kernel_scale_shape(self, scale):
    features = self.features if isinstance(self.features, tuple | list) else (self.features,)
    axis = self.axis if isinstance(self.axis, tuple | list) else (self.axis,)
    batch_dims = (
      self.batch_dims if isinstance(self.batch_dims, tuple | list) else (self.batch_dims,)
    )
    return scale.reshape((1,) * (len(batch_dims) + len(axis)) + tuple(features))

  @nn.compact
  def __call__(self, inputs):
    if self.quant is None:
      return nn.DenseGeneral.__call__(self, inputs)
    return self._quantized_call(nn.DenseGeneral, inputs)


class Conv(_QuantMixin, nn.Conv):
  """`flax.linen.Conv` with an optional `QuantConfig` (`quant=None`: exactly `nn.Conv`).

  The convolution is `fgjax.quant.conv_general_dilated(quant)`. With `weight_storage="integer"`
  the kernel is int8/int16 and `kernel_scale` has shape `(1, ..., 1, features)`. Bias: float32.
  """

  quant: QuantConfig | None = None
  _op_field = "conv_general_dilated"

  def _num_features(self):
    return self.features

  def _kernel_scale_shape(self, scale):
    return scale.reshape((1,) * len(self.kernel_size) + (1, self.features))

  @nn.compact
  def __call__(self, inputs):
    if self.quant is None:
      return nn.Conv.__call__(self, inputs)
    return self._quantized_call(nn.Conv, inputs)


def _is_float(x) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def quantize_params(
  variables: Mapping[str, Any], config: QuantConfig, *, like: Mapping[str, Any] | None = None
) -> dict[str, Any]:
  """Converts float (e.g. pretrained) variables to integer weight storage.

  Every float `kernel` becomes `quantize_kernel(kernel, config.weight_bits, axes)`: symmetric, one
  scale per output index, :math:`s = \\max|w| / (2^{b-1}-1)` over the contracting axes. Those axes
  are read from `like`, the integer-storage variables of the model (or their shapes,
  `jax.eval_shape(model.init, ...)`): its `kernel_scale` has size 1 exactly on them, so a
  `DenseGeneral((heads, head_dim))` gets one scale per `(head, dim)`, as its own initializer makes.
  Without `like`, all axes but the last are reduced (right for Dense and Conv, not for a
  multi-feature DenseGeneral: its layer then refuses the scale's shape with a ValueError).

  Args:
    variables: `{"params": ..., other collections}` or a bare params tree.
    config: a config with `weight_bits` in `STORAGE_BITS` (4, 8 or 16).
    like: the integer-storage model's variables or shapes (`{"params", "quant", ...}`).

  Returns:
    A variables dict `{"params": int kernels, "quant": scales, other collections}` that layers
    built with `dataclasses.replace(config, weight_storage="integer")` accept.

  Raises:
    ValueError: no `weight_bits`, an unsupported bit width, or `like` without a scale for a
      kernel.
  """
  if config is None or config.weight_bits is None:
    raise ValueError("quantize_params needs a QuantConfig with weight_bits.")
  integer_dtype(config.weight_bits)  # Raises for a width that integer storage cannot hold.
  if "params" in variables:
    params = variables["params"]
    others = {k: v for k, v in variables.items() if k not in ("params", QUANT_COLLECTION)}
  else:
    params, others = variables, {}
  like_scales = None if like is None else like.get(QUANT_COLLECTION, {})

  def convert(tree, like_tree, path):
    new_params, scales = {}, {}
    for key, value in tree.items():
      if isinstance(value, Mapping):
        sub_like = None if like_tree is None else like_tree.get(key, {})
        sub_params, sub_scales = convert(value, sub_like, f"{path}{key}/")
        new_params[key] = sub_params
        if sub_scales:
          scales[key] = sub_scales
      elif key == "kernel" and _is_float(value):
        if like_tree is not None:
          if KERNEL_SCALE not in like_tree:
            raise ValueError(f"quantize_params: like= has no {KERNEL_SCALE} for {path}kernel.")
          like_shape = tuple(like_tree[KERNEL_SCALE].shape)
          axes = tuple(a for a, d in enumerate(like_shape) if d == 1 and value.shape[a] != 1)
          axes = tuple(a for a, d in enumerate(like_shape) if d == 1) if not axes else axes
        else:
          axes = None
        q, scale = quantize_kernel(value, config.weight_bits, axes)
        new_params[key] = q
        scales[KERNEL_SCALE] = scale
      else:
        new_params[key] = value
    return new_params, scales

  new_params, scales = convert(params, like_scales, "")
  return {"params": new_params, QUANT_COLLECTION: scales, **others}


def dequantize_params(variables: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `quantize_params`: float kernels `q * kernel_scale`, without the `"quant"` scales.

  Args:
    variables: `{"params": ..., "quant": ...}` with integer kernels.

  Returns:
    The variables with float32 kernels and no `"quant"` collection.
  """
  scales = variables.get(QUANT_COLLECTION, {})

  def convert(tree, scale_tree):
    out = {}
    for key, value in tree.items():
      if isinstance(value, Mapping):
        out[key] = convert(value, scale_tree.get(key, {}))
      elif key == "kernel" and KERNEL_SCALE in scale_tree:
        out[key] = dequantize(value, scale_tree[KERNEL_SCALE])
      else:
        out[key] = value
    return out

  result = {k: v for k, v in variables.items() if k != QUANT_COLLECTION}
  result["params"] = convert(variables["params"], scales)
  return result
