"""Fixed-point training: from float-pretrained variables to integer weights plus frozen scales.

QZO-FF (Chen et al., "Stepping Forward on the Last Mile", NeurIPS 2024) adapts a quantized model
on device with integer weights `q` (`w = s q`, `s` per output channel, fixed after quantization):
the forward-gradient estimator perturbs `q` on its grid, both forward calls run integer matmuls,
and the update is rounded onto the grid (`fgjax.integer_updates`). Here:

- `to_fixed_point`: float variables -> `(params, frozen)`, `params` holding int8/int16 kernels
  (trainable candidates, with the float biases) and `frozen` the `"quant"` scales (and any other
  collection), which the loss closes over (`bind_frozen`) so that no estimator ever perturbs them;
- `integer_storage` / `master_weight_storage`: the two layer configs to compare, integer weights
  versus float master weights quantized on the fly in every forward (AQT-style fake quant);
- `integer_mask`: the integer leaves, the natural SPSA mask in integer steps (ε in steps);
- `contraction_operand_dtypes`: the dtypes the dots and convolutions of a function really use, to
  check that a step runs in integers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fgjax import _masks
from fgjax.quant._config import QuantConfig
from fgjax.quant._layers import QUANT_COLLECTION, dequantize_params, quantize_params

PyTree = Any


def integer_storage(config: QuantConfig) -> QuantConfig:
  """`config` with `weight_storage="integer"`: kernels are int8/int16 params, scales in "quant".

  Args:
    config: a config with `weight_bits` (e.g. `preset("w16a8")`).

  Returns:
    The config for layers whose variables come from `to_fixed_point`.
  """
  if config is None or config.weight_bits is None:
    raise ValueError("integer_storage needs a QuantConfig with weight_bits, e.g. preset('w8a8').")
  return dataclasses.replace(config, weight_storage="integer")


def master_weight_storage(config: QuantConfig) -> QuantConfig:
  """`config` with `weight_storage="float"`: float master weights, quantized in every forward.

  The baseline to compare fixed-point training with: the estimator perturbs and updates float
  weights (ε and the learning rate in weight units), and each forward re-quantizes them with an
  abs-max scale, so an update smaller than one step still accumulates in the master copy.
  """
  if config is None:
    raise ValueError("master_weight_storage needs a QuantConfig.")
  return dataclasses.replace(config, weight_storage="float")


class FixedPointVariables(NamedTuple):
  """Integer-storage variables split into what training may change and what it must not.

  Attributes:
    params: the `"params"` collection: int4 / int8 / int16 kernels (the dtype is the bit width)
      and float biases.
    frozen: every other collection: `"quant"` (per-output-channel `kernel_scale`, float32) and
      e.g. `"batch_stats"`; closed over by the loss (`bind_frozen`).
  """

  params: PyTree
  frozen: PyTree

  @property
  def scales(self) -> dict[str, jax.Array]:
    """`leaf_scales(params, frozen)`: the scale of every integer leaf, by path."""
    return leaf_scales(self.params, self.frozen)


def leaf_scales(params: PyTree, frozen: Mapping[str, Any]) -> dict[str, jax.Array]:
  """The grid step of every integer leaf, keyed by its path ("Dense_0/kernel").

  An integer kernel `q` stands for the weights `w = s q`; `s` (per output channel) is the
  `kernel_scale` that the layer keeps in the `"quant"` collection. Estimators and optimizers take
  this dict (`spsa(..., scales=)`, `fgjax.integer_optimizer(..., scales=)`) to work in weight
  units: ε and the learning rate mean the same step in weight space whatever the precision.

  Args:
    params: the `"params"` collection (integer kernels, float biases).
    frozen: the other collections, holding `"quant"` (or the full variables dict).

  Returns:
    `{path: float32 scale broadcastable to the leaf}` for every integer leaf.

  Raises:
    ValueError: an integer leaf has no `kernel_scale` beside it.
  """
  quant = frozen.get(QUANT_COLLECTION, {})
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.integer):
      continue
    names = _masks.path_to_str(path).split("/")
    node = quant
    for name in names[:-1]:
      node = node.get(name, {}) if isinstance(node, Mapping) else {}
    scale_name = f"{names[-1]}_scale"
    if not isinstance(node, Mapping) or scale_name not in node:
      raise ValueError(f"leaf_scales: integer leaf {'/'.join(names)!r} has no {scale_name}.")
    out["/".join(names)] = jnp.asarray(node[scale_name], jnp.float32)
  return out


def to_fixed_point(
  variables: Mapping[str, Any], config: QuantConfig, *, like: Mapping[str, Any] | None = None
) -> FixedPointVariables:
  """Quantizes float (pretrained) variables to integer weight storage and splits them.

  .. math::
    s_c = \\max_i |w_{i,c}| / (2^{b-1}-1), \\qquad q_{i,c} = \\operatorname{round}(w_{i,c}/s_c)

  (`fgjax.quant.quantize_params`). Use the result with a model built with
  `quant=integer_storage(config)`.

  Args:
    variables: float variables `{"params": ..., other collections}` (or a bare params tree).
    config: the precision, e.g. `preset("w16a8")`; its `weight_bits` sets the grid (4, 8, 16).
    like: the integer-storage model's variables or shapes, for the calibration axes (see
      `quantize_params`; needed for multi-feature `DenseGeneral`, e.g. attention).

  Returns:
    `FixedPointVariables(params, frozen)`.

  Example:
    >>> fixed = to_fixed_point(float_variables, preset("w8a8"))
    >>> model = MLP(quant=integer_storage(preset("w8a8")))
    >>> logits = model.apply({"params": fixed.params, **fixed.frozen}, x)
  """
  quantized = quantize_params(variables, config, like=like)
  frozen = {k: v for k, v in quantized.items() if k != "params"}
  return FixedPointVariables(quantized["params"], frozen)


def merge(params: PyTree, frozen: PyTree) -> dict[str, Any]:
  """`{"params": params, **frozen}`, the variables dict a Flax `apply` takes."""
  return {"params": params, **frozen}


def from_fixed_point(params: PyTree, frozen: PyTree) -> dict[str, Any]:
  """Float variables `w = s q` (`dequantize_params`), without the `"quant"` collection."""
  return dequantize_params(merge(params, frozen))


def bind_frozen(apply_fn: Callable, frozen: PyTree) -> Callable:
  """`fn(params, *args, **kwargs) = apply_fn({"params": params, **frozen}, *args, **kwargs)`.

  The loss an estimator sees then depends on `params` only: scales and statistics are constants,
  never perturbed, never updated.

  Args:
    apply_fn: e.g. `model.apply`.
    frozen: `FixedPointVariables.frozen`.

  Returns:
    The bound apply function.
  """

  def apply(params, *args, **kwargs):
    return apply_fn(merge(params, frozen), *args, **kwargs)

  return apply


def integer_mask(params: PyTree) -> PyTree:
  """A pytree of bools with the structure of `params`: True at the integer leaves (kernels).

  For training the kernels only. Float leaves (biases) can train beside them: ε and the learning
  rate are in weight units for both (integer leaves through their `leaf_scales`).
  """
  return jax.tree.map(lambda leaf: bool(jnp.issubdtype(jnp.result_type(leaf), jnp.integer)), params)


_CONTRACTIONS = ("dot_general", "conv_general_dilated")


def contraction_operand_dtypes(fn: Callable, *args, **kwargs) -> list[tuple[str, tuple, tuple]]:
  """The dots and convolutions `fn(*args)` runs, as `(primitive, operand dtypes, lhs shape)`.

  Walks the jaxpr of `fn`, including every sub-jaxpr (`jit`, `scan`/`lax.map`, `custom_jvp`), so
  a caller can check that the forward calls of a fixed-point step really multiply int8/int16
  operands (with int32 accumulation), e.g. two per layer and direction for central SPSA.

  Args:
    fn: a JAX-traceable function.
    *args: its arguments.
    **kwargs: its keyword arguments.

  Returns:
    One entry per `dot_general` / `conv_general_dilated` equation in trace order:
    `(name, (lhs dtype, rhs dtype, out dtype), lhs shape)`, dtypes as strings.
  """
  closed = jax.make_jaxpr(lambda *a: fn(*a, **kwargs))(*args)
  found = []

  def subjaxprs(eqn):
    for param in eqn.params.values():
      values = param if isinstance(param, tuple | list) else (param,)
      for value in values:
        inner = getattr(value, "jaxpr", value)
        if hasattr(inner, "eqns"):
          yield inner

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in _CONTRACTIONS:
        dtypes = tuple(str(v.aval.dtype) for v in (*eqn.invars[:2], eqn.outvars[0]))
        found.append((eqn.primitive.name, dtypes, tuple(eqn.invars[0].aval.shape)))
      for sub in subjaxprs(eqn):
        walk(sub)

  walk(closed.jaxpr)
  return found
