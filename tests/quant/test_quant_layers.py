"""fgjax.quant: forward mode through quantized layers against AQT, integer lowering, fixed point."""

import dataclasses
import functools

import flax.linen as nn
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from aqt.jax.v2 import aqt_conv_general
from aqt.jax.v2 import config as aqt_config
from aqt.jax.v2.flax import aqt_flax
from aqt.jax.v2.numerics import utils as aqt_numerics_utils

from fgjax import quant

CONFIGS = [
  pytest.param(8, 8, "per_tensor", id="w8a8-tensor"),
  pytest.param(4, 8, "per_tensor", id="w4a8-tensor"),
  pytest.param(8, 8, "per_token", id="w8a8-token"),
  pytest.param(4, 8, "per_token", id="w4a8-token"),
]
TOL = 2e-5


def _normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _max_abs_diff(a, b):
  pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in pairs)


def _tree_vdot(a, b):
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _jit_jvp(fn, primals, tangents):
  return jax.jit(lambda p, t: jax.jvp(fn, p, t)[1])(primals, tangents)


def _init(module, x):
  return jax.jit(module.init)(jax.random.key(0), x)


def _apply(module, variables, x):
  return jax.jit(module.apply)(variables, x)


def _aqt_numerics(bits):
  # preserve_max_val=True: scale = max|x| / (2^(b-1) - 1), fgjax's grid.
  return aqt_numerics_utils.get_numerics(bits, preserve_max_val=True)


def _aqt_dot_config(weight_bits, act_bits, granularity):
  """AQT with quantized forward and float backward dots: the pure straight-through reference."""
  cfg = aqt_config.dot_general_make(
    lhs_bits=act_bits, rhs_bits=weight_bits, bwd_bits=None, use_fwd_quant=True
  )
  aqt_config.set_numerics(cfg.fwd, _aqt_numerics(act_bits), _aqt_numerics(weight_bits))
  if granularity == "per_tensor":
    cfg.fwd.dg_quantizer.lhs.calib_shared_axes = "per_tensor"
  return cfg


def _fake_quant_ste(x, bits, reduce_axes):
  """Float fake-quant reference with the straight-through estimator via stop_gradient."""
  qmax = 2 ** (bits - 1) - 1
  scale = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=reduce_axes, keepdims=True) / qmax)
  x_hat = jnp.clip(jnp.round(x / scale), -qmax, qmax) * scale
  return x + jax.lax.stop_gradient(x_hat - x)


def _loss_fn(module, cotangent):
  def loss(params, x):
    return jnp.sum(module.apply({"params": params}, x) * cotangent)

  return loss


# --- Dense against AQT's AqtDotGeneral


@pytest.mark.parametrize("weight_bits,act_bits,granularity", CONFIGS)
def test_dense_forward_grad_and_jvp_match_aqt(weight_bits, act_bits, granularity):
  x, dx = _normal(1, (4, 6)), _normal(2, (4, 6))
  cotangent = _normal(3, (4, 5))
  config = quant.QuantConfig(weight_bits, act_bits, act_granularity=granularity)
  mine = quant.Dense(5, quant=config)
  reference = nn.Dense(
    5,
    dot_general_cls=functools.partial(
      aqt_flax.AqtDotGeneral, _aqt_dot_config(weight_bits, act_bits, granularity), prng_name=None
    ),
  )
  params = _init(mine, x)["params"]
  direction = jax.tree.map(lambda p: _normal(4, p.shape), params)

  my_out = _apply(mine, {"params": params}, x)
  assert _max_abs_diff(my_out, _apply(reference, {"params": params}, x)) < TOL

  aqt_grad = jax.jit(jax.grad(_loss_fn(reference, cotangent), argnums=(0, 1)))(params, x)
  my_grad = jax.jit(jax.grad(_loss_fn(mine, cotangent), argnums=(0, 1)))(params, x)
  assert _max_abs_diff(my_grad, aqt_grad) < TOL

  my_jvp = _jit_jvp(_loss_fn(mine, cotangent), (params, x), (direction, dx))
  np.testing.assert_allclose(my_jvp, _tree_vdot(aqt_grad, (direction, dx)), rtol=1e-5, atol=1e-5)


def test_quantized_jvp_differs_from_float_jvp():
  # Guards against a vacuous comparison: the quantized tangent uses dequantized operands.
  x, dx = _normal(1, (4, 6)), _normal(2, (4, 6))
  params = _init(quant.Dense(5), x)["params"]
  float_t = _jit_jvp(lambda x: quant.Dense(5).apply({"params": params}, x), (x,), (dx,))
  q_layer = quant.Dense(5, quant=quant.preset("w4a8"))
  q_t = _jit_jvp(lambda x: q_layer.apply({"params": params}, x), (x,), (dx,))
  assert 1e-4 < float(jnp.max(jnp.abs(float_t - q_t)))


# --- Conv: forward against AQT's conv, gradients against a stop_gradient STE reference


def _aqt_conv_config(weight_bits, act_bits):
  fwd = aqt_conv_general.conv_general_dilated_make(2, lhs_bits=act_bits, rhs_bits=weight_bits)
  aqt_config.set_numerics(fwd, _aqt_numerics(act_bits), _aqt_numerics(weight_bits))
  cfg = aqt_config.dot_general_make(lhs_bits=act_bits, rhs_bits=weight_bits)
  return dataclasses.replace(cfg, fwd=fwd)


@pytest.mark.parametrize("weight_bits,act_bits,granularity", [CONFIGS[0], CONFIGS[3]])
def test_conv_forward_grad_and_jvp_match_straight_through_reference(
  weight_bits, act_bits, granularity
):
  x, dx = _normal(1, (2, 5, 5, 3)), _normal(2, (2, 5, 5, 3))
  cotangent = _normal(3, (2, 5, 5, 4))
  config = quant.QuantConfig(weight_bits, act_bits, act_granularity=granularity)
  mine = quant.Conv(4, (3, 3), quant=config)
  act_axes = (0, 1, 2, 3) if granularity == "per_tensor" else (1, 2, 3)

  def ste_conv(lhs, rhs, *args, **kwargs):
    lhs = _fake_quant_ste(lhs, act_bits, act_axes)
    rhs = _fake_quant_ste(rhs, weight_bits, (0, 1, 2))
    return jax.lax.conv_general_dilated(lhs, rhs, *args, **kwargs)

  reference = nn.Conv(4, (3, 3), conv_general_dilated=ste_conv)
  params = _init(mine, x)["params"]
  direction = jax.tree.map(lambda p: _normal(4, p.shape), params)

  my_out = _apply(mine, {"params": params}, x)
  assert _max_abs_diff(my_out, _apply(reference, {"params": params}, x)) < TOL
  if granularity == "per_token":  # AQT's conv calibrates per example only.
    aqt_conv = nn.Conv(
      4,
      (3, 3),
      conv_general_dilated_cls=functools.partial(
        aqt_flax.AqtConvGeneralDilated, _aqt_conv_config(weight_bits, act_bits), prng_name=None
      ),
    )
    assert _max_abs_diff(my_out, _apply(aqt_conv, {"params": params}, x)) < TOL

  ref_grad = jax.jit(jax.grad(_loss_fn(reference, cotangent), argnums=(0, 1)))(params, x)
  my_grad = jax.jit(jax.grad(_loss_fn(mine, cotangent), argnums=(0, 1)))(params, x)
  assert _max_abs_diff(my_grad, ref_grad) < 1e-4

  my_jvp = _jit_jvp(_loss_fn(mine, cotangent), (params, x), (direction, dx))
  np.testing.assert_allclose(my_jvp, _tree_vdot(ref_grad, (direction, dx)), rtol=1e-5, atol=1e-4)


# --- Integer lowering


def _dot_general_eqns(fn, *args):
  jaxpr = jax.make_jaxpr(fn)(*args)
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
        found.append(eqn)
      for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else ():
        walk(sub)
      for param in eqn.params.values():
        inner = getattr(param, "jaxpr", None)
        if inner is not None:
          walk(getattr(inner, "jaxpr", inner))

  walk(jaxpr.jaxpr)
  return found


@pytest.mark.parametrize("name,num_products", [("w8a8", 1), ("w4a8", 1), ("w16a8", 3)])
def test_dense_forward_runs_in_integers(name, num_products):
  x = _normal(1, (4, 6))
  layer = quant.Dense(5, quant=quant.preset(name))
  variables = _init(layer, x)
  eqns = _dot_general_eqns(lambda v, x: _apply(layer, v, x), variables, x)
  # The other dot_general is the (float) outer product of the activation and weight scales.
  # A 16-bit weight is two int8 planes plus a plane of ones (fgjax.quant._accumulate).
  products = [e for e in eqns if e.invars[0].aval.shape == x.shape]
  assert len(products) == num_products
  for eqn in products:
    assert [v.aval.dtype for v in eqn.invars] == [jnp.int8, jnp.int8]
    assert eqn.outvars[0].aval.dtype == jnp.int32
  hlo = jax.jit(layer.apply).lower(variables, x).as_text()
  assert "dot_general" in hlo and "tensor<4x6xi8>" in hlo

  # Output equals the float fake-quant reference within one output quantization step.
  bits = quant.preset(name).weight_bits
  kernel = variables["params"]["kernel"]
  x_hat = _fake_quant_ste(x, 8, (0, 1))
  w_hat = _fake_quant_ste(kernel, bits, (0,))
  expected = x_hat @ w_hat + variables["params"]["bias"]
  step = jnp.max(jnp.abs(x)) / 127 * jnp.max(jnp.abs(kernel)) / (2 ** (bits - 1) - 1)
  assert float(jnp.max(jnp.abs(_apply(layer, variables, x) - expected))) <= float(step)


def test_conv_forward_runs_in_int8():
  x = _normal(1, (2, 5, 5, 3))
  layer = quant.Conv(4, (3, 3), quant=quant.preset("w8a8"))
  variables = _init(layer, x)
  eqns = _dot_general_eqns(lambda v, x: _apply(layer, v, x), variables, x)
  assert [e.primitive.name for e in eqns] == ["conv_general_dilated"]
  assert [v.aval.dtype for v in eqns[0].invars] == [jnp.int8, jnp.int8]
  assert eqns[0].outvars[0].aval.dtype == jnp.int32


def test_jvp_of_quantized_layer_has_float_tangent_dots_only():
  # The tangent is float (straight-through), the primal integer: both appear in the jvp jaxpr.
  x = _normal(1, (4, 6))
  layer = quant.Dense(5, quant=quant.preset("w8a8"))
  variables = _init(layer, x)
  eqns = _dot_general_eqns(
    lambda x, t: jax.jvp(lambda x: _apply(layer, variables, x), (x,), (t,)), x, x
  )
  dtypes = sorted(str(e.invars[0].aval.dtype) for e in eqns)
  assert "int8" in dtypes and "float32" in dtypes


# --- Integer weight storage


@pytest.mark.parametrize("bits,dtype", [(8, jnp.int8), (4, jnp.int4), (16, jnp.int16)])
def test_quantize_dequantize_round_trip_within_half_step(bits, dtype):
  kernel = _normal(1, (7, 5)) * jnp.arange(1, 6)
  q, scale = quant.quantize_kernel(kernel, bits)
  assert q.dtype == dtype and scale.shape == (1, 5)
  assert int(jnp.max(jnp.abs(q.astype(jnp.int32)))) == 2 ** (bits - 1) - 1
  err = jnp.abs(quant.dequantize(q, scale) - kernel)
  assert bool(jnp.all(err <= scale / 2 * (1 + 1e-6)))


def test_integer_storage_layer_equals_float_storage_layer_on_grid_weights():
  x = _normal(1, (4, 6))
  float_config = quant.preset("w8a8")
  float_layer = quant.Dense(5, quant=float_config)
  int_layer = quant.Dense(5, quant=dataclasses.replace(float_config, weight_storage="integer"))
  float_variables = _init(quant.Dense(5), x)
  int_variables = quant.quantize_params(float_variables, float_config)
  assert int_variables["params"]["kernel"].dtype == jnp.int8
  on_grid = quant.dequantize_params(int_variables)
  np.testing.assert_allclose(
    _apply(int_layer, int_variables, x), _apply(float_layer, on_grid, x), rtol=1e-6, atol=1e-6
  )


@pytest.mark.parametrize(
  "layer_fn,shape",
  [
    (lambda q: quant.Dense(5, quant=q), (4, 6)),
    (lambda q: quant.Conv(4, (3, 3), quant=q), (2, 5, 5, 3)),
    (lambda q: quant.DenseGeneral((2, 3), axis=(-2, -1), quant=q), (2, 4, 5)),
  ],
)
def test_integer_storage_init_and_jvp_in_integer_units(layer_fn, shape):
  x = _normal(1, shape)
  config = quant.preset("w8a8", weight_storage="integer")
  layer = layer_fn(config)
  variables = _init(layer, x)
  kernel = variables["params"]["kernel"]
  scale = variables[quant.QUANT_COLLECTION][quant.KERNEL_SCALE]
  assert kernel.dtype == jnp.int8 and scale.dtype == jnp.float32
  # Forward gradients w.r.t. the integers: jvp over a float32 copy, tangent in integer units.
  direction = _normal(2, kernel.shape)

  def f(kernel_float):
    params = dict(variables["params"], kernel=kernel_float)
    return jnp.sum(layer.apply(dict(variables, params=params), x))

  kernel_float = kernel.astype(jnp.float32)
  tangent = _jit_jvp(f, (kernel_float,), (direction,))
  float_layer = layer_fn(dataclasses.replace(config, weight_storage="float"))
  w = quant.dequantize(kernel, scale)

  def g(w):
    params = dict(variables["params"], kernel=w)
    return jnp.sum(float_layer.apply({"params": params}, x))

  # Float storage requantizes the on-grid weights to the same grid only if each channel attains
  # its max; the tangent identity holds regardless: d/dq = scale * d/dw (straight-through).
  expected = _jit_jvp(g, (w,), (direction * scale,))
  np.testing.assert_allclose(tangent, expected, rtol=1e-4, atol=1e-4)


def test_quant_none_is_exactly_flax():
  x = _normal(1, (2, 5, 5, 3))
  for mine, theirs in [
    (quant.Dense(4), nn.Dense(4)),
    (quant.Conv(4, (3, 3)), nn.Conv(4, (3, 3))),
    (quant.DenseGeneral((2, 2), axis=-1), nn.DenseGeneral((2, 2), axis=-1)),
  ]:
    key = jax.random.key(0)
    v_mine, v_theirs = mine.init(key, x), theirs.init(key, x)
    assert jax.tree.structure(v_mine) == jax.tree.structure(v_theirs)
    assert _max_abs_diff(v_mine, v_theirs) == 0.0
    assert _max_abs_diff(mine.apply(v_mine, x), theirs.apply(v_theirs, x)) == 0.0


def test_bf16_preset_casts_operands():
  x = _normal(1, (4, 6))
  layer = quant.Dense(5, quant=quant.preset("bf16"))
  variables = _init(layer, x)
  eqns = _dot_general_eqns(lambda v, x: _apply(layer, v, x), variables, x)
  assert [v.aval.dtype for v in eqns[0].invars] == [jnp.bfloat16, jnp.bfloat16]
  assert _apply(layer, variables, x).dtype == jnp.float32


# --- Integer helpers


_saturating_add = jax.jit(quant.saturating_add, static_argnums=2)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
  dtype_bits=st.sampled_from([(jnp.int8, 8), (jnp.int16, 16), (jnp.int16, 12), (jnp.int32, 32)]),
  values=st.lists(st.integers(-(2**31) + 1, 2**31 - 1), min_size=16, max_size=16),
)
def test_saturating_add_never_wraps(dtype_bits, values):
  dtype, bits = dtype_bits
  info = jnp.iinfo(dtype)
  x = np.clip(np.array(values[:8], np.int64), info.min, info.max)
  delta = np.array(values[8:], np.int64)
  out = _saturating_add(jnp.asarray(x, dtype), jnp.asarray(delta, jnp.int32), bits)
  bound = 2 ** (bits - 1) - 1
  expected = np.clip(np.clip(x, -bound, bound) + delta, -bound, bound)
  assert out.dtype == dtype
  np.testing.assert_array_equal(np.asarray(out, np.int64), expected)


@pytest.mark.parametrize("seed", [0, 1])
def test_round_stochastic_is_unbiased(seed):
  num_samples = 20_000
  x = jnp.array([-2.75, -0.5, 0.1, 0.3, 1.9, 7.5])
  keys = jax.random.split(jax.random.key(seed), num_samples)
  rounded = jax.jit(jax.vmap(lambda k: quant.round_stochastic(k, x)))(keys)
  assert bool(jnp.all(rounded == jnp.round(rounded)))
  frac = x - jnp.floor(x)
  sigma = jnp.sqrt(frac * (1 - frac))  # Bernoulli standard deviation
  err = jnp.abs(jnp.mean(rounded, axis=0) - x)
  assert bool(jnp.all(err <= 4 * sigma / np.sqrt(num_samples) + 1e-6))


def test_round_nearest_ties_to_even():
  np.testing.assert_array_equal(
    quant.round_nearest(jnp.array([0.5, 1.5, -2.5, 2.4]), jnp.int8), [0, 2, -2, 2]
  )


# --- Configs


@pytest.mark.parametrize("field", ["weight_bits", "act_bits"])
@pytest.mark.parametrize("bits", [0, 1, 17, 33, -8, 8.0, True])
def test_bad_bits_rejected(field, bits):
  with pytest.raises(ValueError, match=field):
    quant.QuantConfig(**{field: bits})


@pytest.mark.parametrize(
  "kwargs,field",
  [
    ({"weight_bits": 8, "weight_storage": "int"}, "weight_storage"),
    ({"weight_storage": "integer"}, "weight_storage"),
    ({"act_granularity": "per_channel"}, "act_granularity"),
    ({"symmetric": False}, "symmetric"),
    ({"compute_dtype": "float16"}, "compute_dtype"),
    ({"compute_dtype": "bfloat16", "weight_bits": 8}, "compute_dtype"),
  ],
)
def test_bad_fields_rejected(kwargs, field):
  with pytest.raises(ValueError, match=field):
    quant.QuantConfig(**kwargs)


def test_presets():
  assert quant.preset("float32") is None
  assert quant.preset("w4a8") == quant.QuantConfig(weight_bits=4, act_bits=8)
  assert quant.preset("w16a8").weight_bits == 16
  assert quant.preset("bf16").is_float
  assert quant.preset("w8a8", weight_storage="integer").weight_storage == "integer"
  with pytest.raises(ValueError, match="w8a8"):  # lists the valid names
    quant.preset("int8")
  with pytest.raises(ValueError, match="weight_storage"):
    quant.preset("w8a8", weight_storage="fixed")
  with pytest.raises(ValueError, match="float32"):
    quant.preset("float32", weight_storage="integer")
