"""AQT inside: a Flax model written with aqt_flax classes gets jvp and fixed point by one swap."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from aqt.jax.v2 import aqt_conv_general
from aqt.jax.v2 import config as aqt_config
from aqt.jax.v2.flax import aqt_flax
from aqt.jax.v2.numerics import utils as aqt_numerics_utils

import fgjax
from fgjax import quant


def _normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _tree_vdot(a, b):
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _max_abs_diff(a, b):
  pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in pairs)


def _dot_config(bits=8):
  """An AQT config with a quantized forward and float backward: AQT's straight-through rule."""
  cfg = aqt_config.dot_general_make(lhs_bits=bits, rhs_bits=bits, bwd_bits=None)
  numerics = aqt_numerics_utils.get_numerics(bits, preserve_max_val=True)
  aqt_config.set_numerics(cfg.fwd, numerics, numerics)
  return cfg


def _conv_config(bits=8):
  fwd = aqt_conv_general.conv_general_dilated_make(2, lhs_bits=bits, rhs_bits=bits)
  numerics = aqt_numerics_utils.get_numerics(bits, preserve_max_val=True)
  aqt_config.set_numerics(fwd, numerics, numerics)
  return dataclasses.replace(aqt_config.dot_general_make(lhs_bits=bits, rhs_bits=bits), fwd=fwd)


class UserModel(nn.Module):
  """A model as an AQT user writes it: its quantized layers take an AQT class and config."""

  dot_general_cls: type = aqt_flax.AqtDotGeneral
  conv_cls: type = aqt_flax.AqtConvGeneralDilated
  rhs_quant_mode: aqt_flax.QuantMode = aqt_flax.QuantMode.TRAIN
  with_conv: bool = True

  @nn.compact
  def __call__(self, x):
    dot = functools.partial(
      self.dot_general_cls, _dot_config(), prng_name=None, rhs_quant_mode=self.rhs_quant_mode
    )
    if self.rhs_quant_mode != aqt_flax.QuantMode.TRAIN:
      dot = functools.partial(dot, rhs_freeze_mode=aqt_flax.FreezerMode.CALIBRATION_AND_VALUE)
    if self.with_conv:
      conv = functools.partial(self.conv_cls, _conv_config(), prng_name=None)
      x = nn.relu(nn.Conv(4, (3, 3), conv_general_dilated_cls=conv)(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(16, dot_general_cls=dot)(x))
    return nn.Dense(10, dot_general_cls=dot)(x)


SWAPPED = dict(dot_general_cls=quant.AqtDotGeneral, conv_cls=quant.AqtConvGeneralDilated)


def test_jax_jvp_refuses_aqt_flax_and_works_after_the_swap():
  x = _normal(0, (2, 5, 5, 1))
  original, swapped = UserModel(with_conv=False), UserModel(with_conv=False, **SWAPPED)
  variables = original.init(jax.random.key(1), x)
  # Same variables, same forward: the swap changes no field, config or collection.
  assert jax.tree.structure(swapped.init(jax.random.key(1), x)) == jax.tree.structure(variables)
  np.testing.assert_array_equal(original.apply(variables, x), swapped.apply(variables, x))
  tangent = jax.tree.map(jnp.ones_like, variables)
  try:
    jax.jvp(lambda v: original.apply(v, x), (variables,), (tangent,))
    refused = False
  except TypeError:
    refused = True
  assert refused, "aqt_flax's lifted custom_vjp now supports jvp: the swap may be unnecessary"
  jax.jvp(lambda v: swapped.apply(v, x), (variables,), (tangent,))


def test_dense_jvp_is_the_straight_through_gradient_of_aqt():
  x, dx = _normal(0, (3, 12)), _normal(1, (3, 12))
  cotangent = _normal(2, (3, 7))
  layer = lambda cls: nn.Dense(
    7, dot_general_cls=functools.partial(cls, _dot_config(), prng_name=None)
  )  # noqa: E731,E501
  aqt_layer, swapped = layer(aqt_flax.AqtDotGeneral), layer(quant.AqtDotGeneral)
  params = aqt_layer.init(jax.random.key(3), x)["params"]
  direction = jax.tree.map(lambda p: _normal(4, p.shape), params)

  def loss(module):
    return lambda p, x: jnp.sum(module.apply({"params": p}, x) * cotangent)

  aqt_grad = jax.jit(jax.grad(loss(aqt_layer), argnums=(0, 1)))(params, x)
  my_grad = jax.jit(jax.grad(loss(swapped), argnums=(0, 1)))(params, x)
  assert _max_abs_diff(my_grad, aqt_grad) < 1e-5
  my_jvp = jax.jit(lambda p, x, t: jax.jvp(loss(swapped), (p, x), t)[1])(params, x, (direction, dx))
  np.testing.assert_allclose(my_jvp, _tree_vdot(aqt_grad, (direction, dx)), rtol=1e-5, atol=1e-5)


def _fake_quant_ste(x, bits, reduce_axes):
  qmax = 2 ** (bits - 1) - 1
  scale = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=reduce_axes, keepdims=True) / qmax)
  return x + jax.lax.stop_gradient(jnp.clip(jnp.round(x / scale), -qmax, qmax) * scale - x)


def test_conv_straight_through_rule_matches_the_float_ste_reference():
  # AQT's own conv gradient is zero (aqtp 0.9.0): the rule is fgjax's, checked against float STE.
  x, dx = _normal(0, (2, 5, 5, 3)), _normal(1, (2, 5, 5, 3))
  cotangent = _normal(2, (2, 5, 5, 4))

  def ste_conv(lhs, rhs, *args, **kwargs):
    lhs = _fake_quant_ste(lhs, 8, (1, 2, 3))  # AQT's conv calibrates per example
    rhs = _fake_quant_ste(rhs, 8, (0, 1, 2))
    return jax.lax.conv_general_dilated(lhs, rhs, *args, **kwargs)

  def conv(cls):
    return nn.Conv(
      4, (3, 3), conv_general_dilated_cls=functools.partial(cls, _conv_config(), prng_name=None)
    )  # noqa: E501

  reference, swapped, aqt_conv = (
    nn.Conv(4, (3, 3), conv_general_dilated=ste_conv),
    conv(quant.AqtConvGeneralDilated),
    conv(aqt_flax.AqtConvGeneralDilated),
  )
  params = reference.init(jax.random.key(3), x)["params"]
  direction = jax.tree.map(lambda p: _normal(4, p.shape), params)

  def loss(module):
    return lambda p, x: jnp.sum(module.apply({"params": p}, x) * cotangent)

  assert (
    _max_abs_diff(swapped.apply({"params": params}, x), reference.apply({"params": params}, x))
    < 2e-5
  )  # noqa: E501
  ref_grad = jax.jit(jax.grad(loss(reference), argnums=(0, 1)))(params, x)
  my_grad = jax.jit(jax.grad(loss(swapped), argnums=(0, 1)))(params, x)
  aqt_grad = jax.jit(jax.grad(loss(aqt_conv), argnums=(0, 1)))(params, x)
  assert float(jnp.max(jnp.abs(aqt_grad[0]["kernel"]))) == 0.0  # why the rule is fgjax's
  assert _max_abs_diff(my_grad, ref_grad) < 1e-4
  my_jvp = jax.jit(lambda p, x, t: jax.jvp(loss(swapped), (p, x), t)[1])(params, x, (direction, dx))
  np.testing.assert_allclose(my_jvp, _tree_vdot(ref_grad, (direction, dx)), rtol=1e-5, atol=1e-4)


def _digits(n=256):
  x = jax.random.normal(jax.random.key(10), (n, 6, 6, 1))
  w = jax.random.normal(jax.random.key(11), (36, 10))
  y = jnp.argmax(x.reshape(n, -1) @ w, -1)
  return x, y


def _ce(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def test_swapped_aqt_model_trains_with_jvp_forward_gradients():
  x, y = _digits()
  model = UserModel(**SWAPPED)
  params = model.init(jax.random.key(0), x[:1])["params"]
  loss = lambda p, x, y: _ce(model.apply({"params": p}, x), y)  # noqa: E731
  opt = optax.chain(fgjax.forward_gradient(fgjax.estimators.jvp(8), seed=1), optax.adam(3e-2))

  def step(carry, _):
    p, state = carry
    updates, state = opt.update(p, state, p, value_fn=lambda q: loss(q, x, y))
    return (optax.apply_updates(p, updates), state), None

  (trained, _), _ = jax.jit(lambda p, s: jax.lax.scan(step, (p, s), None, 40))(
    params, opt.init(params)
  )
  assert float(loss(trained, x, y)) < 0.9 * float(loss(params, x, y))


def test_aqt_serve_weights_train_in_fixed_point_with_sign_spsa():
  # AQT's own fixed point: CONVERT stores each weight as a QTensor (int8 value + scale) in the
  # "aqt" collection, SERVE computes with it. fgjax perturbs and updates those integers.
  x, y = _digits()
  convert = UserModel(with_conv=False, rhs_quant_mode=aqt_flax.QuantMode.CONVERT, **SWAPPED)
  serve = UserModel(with_conv=False, rhs_quant_mode=aqt_flax.QuantMode.SERVE, **SWAPPED)
  params = UserModel(with_conv=False, **SWAPPED).init(jax.random.key(0), x[:1])["params"]
  _, converted = convert.apply({"params": params}, x[:1], mutable=["aqt"])
  fixed = quant.aqt_fixed_point({"params": params, **converted})
  assert all(leaf.dtype == jnp.int8 for leaf in jax.tree.leaves(fixed.params))
  scales = fixed.scales

  def loss(q, x, y):
    return _ce(serve.apply(quant.aqt_merge(q, fixed.frozen), x), y)

  epsilon = 3.0 * max(float(jnp.max(s)) for s in scales.values())
  estimator = fgjax.estimators.spsa(4, epsilon, sign=True, distribution="rademacher", scales=scales)
  opt = fgjax.integer_optimizer(
    optax.chain(fgjax.forward_gradient(estimator, seed=1), optax.sgd(epsilon)),
    scales=scales,
    rounding="stochastic",
  )

  def step(carry, _):
    q, state = carry
    updates, state = opt.update(q, state, q, value_fn=lambda p: loss(p, x, y))
    return (fgjax.apply_integer_updates(q, updates), state), state.integer.changed_fraction

  (trained, _), moved = jax.jit(lambda q, s: jax.lax.scan(step, (q, s), None, 60))(
    fixed.params, opt.init(fixed.params)
  )
  assert all(leaf.dtype == jnp.int8 for leaf in jax.tree.leaves(trained))
  assert float(jnp.mean(moved)) > 0.0
  assert float(loss(trained, x, y)) < 0.9 * float(loss(fixed.params, x, y))


def test_preset_maps_onto_an_aqt_config_with_the_same_forward():
  x = _normal(0, (4, 40))
  for name in ("w8a8", "w4a8"):
    config = quant.preset(name)
    mine = quant.Dense(6, quant=config)
    swapped = nn.Dense(
      6,
      dot_general_cls=functools.partial(
        quant.AqtDotGeneral, quant.aqt_dot_general_config(config), prng_name=None
      ),
    )
    params = mine.init(jax.random.key(1), x)
    assert _max_abs_diff(mine.apply(params, x), swapped.apply(params, x)) < 2e-5
