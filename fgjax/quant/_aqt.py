"""AQT inside: forward mode (jvp) and fixed point for Flax models written with `aqt_flax`.

Why: a model quantized with AQT (`aqt.jax.v2`) has `aqt_flax.AqtDotGeneral`,
`AqtConvGeneralDilated` (and `AqtEinsum`) layers whose core is a Flax-lifted `custom_vjp`, so
`jax.jvp` refuses it, and without that wrapper the tangent goes through `round` (zero
derivative). fgjax keeps AQT's forward (its config, quantizers, calibration, numerics, `QTensor`)
and adds a `jax.custom_jvp` whose tangent is AQT's own straight-through gradient, transposed:

- dot_general: the tangent is `jax.linear_transpose` of AQT's backward (`dg_core_vjp_bwd`,
  linear in the cotangent), so `jvp(f, x, t) = <grad_AQT f, t>` exactly;
- conv: AQT (aqtp 0.9.0) differentiates its convolution through `round`, so its kernel and input
  gradients are zero. The rule here is fgjax's own straight-through one, on AQT's quantized
  operands: `dy = conv(dx, ŵ) + conv(x̂, dw)` with `x̂, ŵ` the dequantized `QTensor`s of the
  forward (tested against the float fake-quant STE reference).

Swapping one class (`aqt_flax.AqtDotGeneral` -> `fgjax.quant.AqtDotGeneral`, same for the conv
and the einsum) keeps every field, the config and the variable collections. In AQT's `TRAIN` mode
the swapped layers differentiate in forward mode; the other modes (`CONVERT`, `SERVE`) run AQT's
own code unchanged. Fixed point is AQT's `SERVE` mode: the weight is a `QTensor` (integer `value`
plus `scale` in the `"aqt"` collection) that `aqt_fixed_point` exposes as trainable integer
leaves with their grid steps, for `fgjax.estimators.spsa(..., scales=)` and
`fgjax.integer_optimizer`.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from aqt.jax.v2 import aqt_conv_general, aqt_dot_general
from aqt.jax.v2 import config as aqt_config
from aqt.jax.v2.flax import aqt_flax
from aqt.jax.v2.numerics import utils as aqt_numerics_utils

from fgjax import _masks
from fgjax.quant._config import QuantConfig
from fgjax.quant._fixed_point import FixedPointVariables

PyTree = Any
_TRAIN = aqt_flax.QuantMode.TRAIN


def straight_through_dot_general(cfg: aqt_dot_general.DotGeneral):
  """AQT's quantized `dot_general` with a `custom_jvp` that is AQT's straight-through gradient.

  .. math:: y = \\operatorname{AQT}(x, w), \\qquad
     \\dot y = (\\partial_x^{\\mathrm{STE}})\\,\\dot x + (\\partial_w^{\\mathrm{STE}})\\,\\dot w,

  where the straight-through Jacobians are those of AQT's own backward pass (`dg_core_vjp_bwd`),
  applied through `jax.linear_transpose`: `jax.jvp` then equals the inner product of AQT's
  `jax.grad` with the tangent, and `jax.grad` of this op equals AQT's.

  Args:
    cfg: an AQT `DotGeneral` config (e.g. `aqt.jax.v2.config.fully_quantized(8, 8)`), with its
      context (`config.set_context`) already set if it uses stochastic rounding.

  Returns:
    `fn(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None)`.

  Example:
    >>> dg = straight_through_dot_general(aqt.jax.v2.config.fully_quantized(8, 8))
    >>> jax.jvp(lambda w: dg(x, w, (((1,), (0,)), ((), ()))), (w,), (dw,))
  """
  cfg = copy.deepcopy(cfg)
  cfg.apply_custom_vjp_on_jax = False

  def fn(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    del preferred_element_type
    if precision is not None:
      raise ValueError(f"precision={precision} together with AQT quantization.")

    def forward(lhs, rhs):
      (out, _), res = aqt_dot_general.dg_core_vjp_fwd(
        lhs, rhs, None, None, dimension_numbers, _fresh(cfg)
      )
      return out, res

    @jax.custom_jvp
    def op(lhs, rhs):
      return forward(lhs, rhs)[0]

    @op.defjvp
    def op_jvp(primals, tangents):
      out, res = forward(*primals)

      def backward(g):
        dlhs, drhs = aqt_dot_general.dg_core_vjp_bwd(dimension_numbers, res, (g, None))[:2]
        return dlhs, drhs

      (tangent,) = jax.linear_transpose(backward, jax.ShapeDtypeStruct(out.shape, out.dtype))(
        tuple(t.astype(p.dtype) for t, p in zip(tangents, primals, strict=True))
      )
      return out, tangent

    return op(lhs, rhs)

  return fn


def _fresh(cfg):
  """A copy of an AQT config whose calibrators are not initialised yet (AQT's forward initialises
  them, once per copy); arrays in it (e.g. the stochastic-rounding key) are shared, not copied."""
  return copy.deepcopy(cfg, {id(leaf): leaf for leaf in jax.tree.leaves(cfg)})


def straight_through_conv_general_dilated(cfg: aqt_dot_general.DotGeneralRaw):
  """AQT's quantized convolution with fgjax's straight-through `custom_jvp`.

  The forward is AQT's (`aqt_conv_general.make_conv_general_dilated_with_qt(cfg)`); the tangent
  is `conv(ẋ ⊙ m_x, ŵ) + conv(x̂, ẇ ⊙ m_w)` with `x̂ = s_x q_x`, `ŵ = s_w q_w` the dequantized
  `QTensor`s of that forward and `m` the straight-through masks, all ones for AQT's abs-max
  calibration (nothing is clipped). AQT's own conv gradient is zero (aqtp 0.9.0), so this rule is
  fgjax's, tested against the float fake-quant STE reference.

  Args:
    cfg: AQT's conv config, a `DotGeneralRaw` (`aqt_conv_general.conv_general_dilated_make`).

  Returns:
    A drop-in for `lax.conv_general_dilated` with Flax's layouts.
  """

  def fn(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
  ):
    kwargs = dict(
      window_strides=window_strides,
      padding=padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count,
    )

    def forward(lhs, rhs):
      aqt_conv = aqt_conv_general.make_conv_general_dilated_with_qt(_fresh(cfg))
      out, (lhs_qt, rhs_qt) = aqt_conv(
        lhs, rhs, lhs_qt=None, rhs_qt=None, precision=precision, **kwargs
      )
      return out, lhs_qt, rhs_qt

    def dequantized(qt, like):
      return like if qt is None else qt.dequant().astype(like.dtype)

    @jax.custom_jvp
    def op(lhs, rhs):
      return forward(lhs, rhs)[0]

    @op.defjvp
    def op_jvp(primals, tangents):
      lhs, rhs = primals
      dlhs, drhs = tangents
      out, lhs_qt, rhs_qt = forward(lhs, rhs)
      x_hat = jax.lax.stop_gradient(dequantized(lhs_qt, lhs))
      w_hat = jax.lax.stop_gradient(dequantized(rhs_qt, rhs))
      tangent = jax.lax.conv_general_dilated(dlhs, w_hat, **kwargs)
      tangent = tangent + jax.lax.conv_general_dilated(x_hat, drhs, **kwargs)
      return out, tangent.astype(out.dtype)

    out = op(lhs, rhs)
    return out if preferred_element_type is None else out.astype(preferred_element_type)

  return fn


def aqt_dot_general_config(config: QuantConfig) -> aqt_dot_general.DotGeneral:
  """The AQT `DotGeneral` config with `config`'s numerics: how `preset` maps onto AQT.

  Symmetric integer numerics with `preserve_max_val=True` (scale `max|x| / (2^(b-1) - 1)`, the
  grid of `fgjax.quant`), weights per output channel, activations per tensor or per token, a
  quantized forward and a float backward (`bwd_bits=None`: AQT's straight-through gradient).
  `fgjax.quant.Dense(..., quant=config)` and `nn.Dense(..., dot_general_cls=partial(
  fgjax.quant.AqtDotGeneral, aqt_dot_general_config(config)))` compute the same forward (tested).

  Args:
    config: a `QuantConfig` with integer bits on either side (e.g. `preset("w8a8")`).

  Returns:
    An `aqt.jax.v2` `DotGeneral` config.

  Example:
    >>> cfg = aqt_dot_general_config(preset("w8a8"))
  """
  if config is None or config.is_float:
    raise ValueError("aqt_dot_general_config needs integer bits, e.g. preset('w8a8').")
  cfg = aqt_config.dot_general_make(
    lhs_bits=config.act_bits, rhs_bits=config.weight_bits, bwd_bits=None, use_fwd_quant=True
  )
  quantizer = cfg.fwd.dg_quantizer
  lhs = quantizer.lhs.numerics if config.act_bits is None else _numerics(config.act_bits)
  rhs = quantizer.rhs.numerics if config.weight_bits is None else _numerics(config.weight_bits)
  aqt_config.set_numerics(cfg.fwd, lhs, rhs)
  if config.act_bits is not None and config.act_granularity == "per_tensor":
    cfg.fwd.dg_quantizer.lhs.calib_shared_axes = "per_tensor"
  return cfg


def _numerics(bits):
  return aqt_numerics_utils.get_numerics(bits, preserve_max_val=True)


def _train_mode(module) -> bool:
  return module.lhs_quant_mode == _TRAIN and module.rhs_quant_mode == _TRAIN


def _context(module, cfg):
  key = module.make_rng(module.prng_name) if module.prng_name is not None else None
  return aqt_config.set_context(
    copy.deepcopy(cfg),
    key,
    train_step=None,
    lhs_quant_mode=module.lhs_quant_mode,
    rhs_quant_mode=module.rhs_quant_mode,
  )


class AqtDotGeneral(aqt_flax.AqtDotGeneral):
  """`aqt_flax.AqtDotGeneral` that `jax.jvp` can differentiate (one-class swap).

  Same fields, config and variable collections as AQT's class. In `TRAIN` mode (the default) the
  product is `straight_through_dot_general(cfg)`: AQT's forward, AQT's straight-through
  derivative in forward and reverse mode. Other modes (`CONVERT`, `SERVE`: the frozen `QTensor`
  weights of fixed point) and tiling run AQT's own code.

  Example:
    >>> dense = nn.Dense(10, dot_general_cls=functools.partial(
    ...   fgjax.quant.AqtDotGeneral, aqt.jax.v2.config.fully_quantized(8, 8)))
  """

  @nn.compact
  def __call__(self, lhs, rhs, dimension_numbers, precision, preferred_element_type=None):
    if self.cfg is None or not _train_mode(self) or self.tiling_cfg or self.tiling_fn:
      return super().__call__(lhs, rhs, dimension_numbers, precision, preferred_element_type)
    cfg = _context(self, self.cfg)
    return straight_through_dot_general(cfg)(lhs, rhs, dimension_numbers, precision)


class AqtEinsum(aqt_flax.AqtEinsum):
  """`aqt_flax.AqtEinsum` that `jax.jvp` can differentiate (one-class swap).

  The einsum is lowered by `jnp.einsum` onto the layer's `dot_general`; in `TRAIN` mode that is
  `straight_through_dot_general` of the layer's config (AQT's forward and straight-through
  derivative), otherwise AQT's own code.
  """

  @nn.compact
  def __call__(self, eqn, lhs_g, rhs_g):
    qtensor_input = not (isinstance(lhs_g, jax.Array) and isinstance(rhs_g, jax.Array))
    tiled = self.tile_sizes is not None or self.tiling_fn is not None
    if self.cfg is None or not _train_mode(self) or tiled or qtensor_input:
      return super().__call__(eqn, lhs_g, rhs_g)
    if self.assert_eqn is not None and eqn != self.assert_eqn:
      raise ValueError(f"einsum equation {eqn!r} is not the expected {self.assert_eqn!r}.")
    lhs, rhs = aqt_flax.aqt_promote_dtype(lhs_g, rhs_g)
    einsum = functools.partial(aqt_dot_general.einsum, eqn=eqn)
    # As AQT does: when the einsum hands (rhs, lhs) to dot_general, swap the config's sides so
    # that the activation and weight quantizers stay on their operands.
    jaxpr = jax.make_jaxpr(einsum)(lhs=lhs, rhs=rhs)
    swapped = list(jaxpr.eqns[0].invars) == list(jaxpr.jaxpr.invars)[::-1]
    cfg = copy.deepcopy(self.cfg)
    if swapped:
      cfg.fwd.lhs, cfg.fwd.rhs = cfg.fwd.rhs, cfg.fwd.lhs
      cfg.fwd.dg_quantizer.swap_lhs_and_rhs()
      cfg.dlhs, cfg.drhs = cfg.drhs, cfg.dlhs
    cfg = _context(self, cfg)
    return einsum(lhs=lhs, rhs=rhs, dg=straight_through_dot_general(cfg))


class AqtConvGeneralDilated(aqt_flax.AqtConvGeneralDilated):
  """`aqt_flax.AqtConvGeneralDilated` with a straight-through forward mode (one-class swap).

  In `TRAIN` mode the convolution is `straight_through_conv_general_dilated(cfg.fwd)`: AQT's
  forward, fgjax's straight-through derivative (AQT's own conv gradient is zero in aqtp 0.9.0).
  Other modes run AQT's own code.
  """

  @nn.compact
  def __call__(
    self,
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
  ):
    args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type)  # fmt: skip
    if self.cfg is None or not _train_mode(self):
      return super().__call__(*args)
    cfg = _context(self, self.cfg)
    return straight_through_conv_general_dilated(cfg.fwd)(*args)


def _is_qvalue(path, leaf) -> bool:
  names = _masks.path_to_str(path).split("/")
  return len(names) >= 2 and names[-1] == "value" and jnp.issubdtype(leaf.dtype, jnp.integer)


def aqt_fixed_point(variables: Mapping[str, Any], collection: str = "aqt") -> FixedPointVariables:
  """AQT's frozen weights (`SERVE` mode) as trainable integer leaves plus everything else.

  AQT's `CONVERT` mode stores each quantized weight as a `QTensor` in the `collection`
  (`.../qrhs/value`: the integers, in the dtype of its numerics, e.g. int8; `.../qrhs/scale`:
  its per-channel scale), and `SERVE` mode computes with them. Here those integer values are the
  parameters of fixed-point training (`w = s q`), the rest (float params, scales, statistics) is
  frozen; the grid steps are `FixedPointVariables.scales`.

  Args:
    variables: a model's variables after AQT's `CONVERT` pass (holding `collection`).
    collection: AQT's quant collection (`quant_collection`, default `"aqt"`).

  Returns:
    `FixedPointVariables(params, frozen)`: `params` the tree of the integer `value` leaves (paths
    as in `collection`), `frozen` the other variables, with `frozen["quant"]` holding a
    `value_scale` beside each of them so that `fgjax.quant.leaf_scales(params, frozen)` finds
    the grid steps. Rebuild the model's variables with `aqt_merge(params, frozen)`.

  Raises:
    ValueError: no integer `value` in `collection` (run AQT's `CONVERT` mode first).
  """
  tree = variables.get(collection)
  if not tree:
    raise ValueError(f"aqt_fixed_point: no {collection!r} collection; run AQT's CONVERT first.")
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  params, scales = {}, {}
  for path, leaf in flat:
    if not _is_qvalue(path, leaf):
      continue
    names = _masks.path_to_str(path).split("/")
    node, scale_node = params, scales
    for name in names[:-1]:
      node = node.setdefault(name, {})
      scale_node = scale_node.setdefault(name, {})
    node[names[-1]] = leaf
    scale = _lookup(tree, names[:-1])["scale"]
    scale_node["value_scale"] = jnp.asarray(scale, jnp.float32)
  if not params:
    raise ValueError(f"aqt_fixed_point: no integer 'value' leaves in {collection!r}.")
  frozen = {k: v for k, v in variables.items()}
  frozen["quant"] = scales
  return FixedPointVariables(params, frozen)


def _lookup(tree, names):
  for name in names:
    tree = tree[name]
  return tree


def _replace(tree, values):
  """`tree` with the leaves of the (sub-)tree `values` put in place."""
  out = dict(tree)
  for key, value in values.items():
    out[key] = _replace(tree[key], value) if isinstance(value, Mapping) else value
  return out


def aqt_merge(params: PyTree, frozen: Mapping[str, Any], collection: str = "aqt") -> dict[str, Any]:
  """The model's variables with the integer values `params` put back into AQT's collection.

  Args:
    params: the integer values (`aqt_fixed_point(...).params`, perturbed or trained).
    frozen: `aqt_fixed_point(...).frozen`.
    collection: AQT's quant collection.

  Returns:
    The variables dict for the model's `apply` in AQT's `SERVE` mode.
  """
  variables = {k: v for k, v in frozen.items() if k != "quant"}
  variables[collection] = _replace(frozen[collection], params)
  return variables
