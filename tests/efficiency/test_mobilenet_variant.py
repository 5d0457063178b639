"""The quantization-friendly MobileNetV2, checked by tracing only (no compilation)."""

import jax
import jax.numpy as jnp
import pytest

import fgjax
from fgjax import efficiency
from fgjax.models._mobilenet import _depthwise_by_shifts

X = jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32)


def _variables(model):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(X.shape)))


def _counts(**kwargs):
  model = fgjax.models.MobileNetV2(width_multiplier=0.25, **kwargs)
  return efficiency.count_ops(lambda v, x: model.apply(v, x), _variables(model), X)


def test_quant_friendly_drops_only_the_depthwise_batch_norms():
  plain = set(fgjax.leaf_paths(_variables(fgjax.models.MobileNetV2(width_multiplier=0.25))))
  friendly = set(
    fgjax.leaf_paths(
      _variables(fgjax.models.MobileNetV2(width_multiplier=0.25, quant_friendly=True))
    )
  )
  assert friendly < plain
  assert all("/depthwise/bn/" in p for p in plain - friendly)
  assert len(plain - friendly) == 17 * 4  # scale, bias, mean, var in each block


def test_quant_friendly_uses_relu_not_relu6():
  assert _counts().by_primitive["min"] > 0  # relu6 = min(max(x, 0), 6)
  assert _counts(quant_friendly=True).by_primitive["min"] == 0


def test_depthwise_convs_can_keep_a_higher_precision():
  w8a8 = fgjax.quant.preset("w8a8")
  same = _counts(quant=w8a8, quant_friendly=True)
  float_depthwise = _counts(quant=w8a8, quant_friendly=True, depthwise_quant=None)
  assert 0 < float_depthwise.integer_macs < same.integer_macs


@pytest.mark.parametrize("strides", [1, 2])
def test_depthwise_by_shifts_matches_the_grouped_conv(strides):
  # One depthwise layer, outputs and both gradients, in float64 (exact up to summation order).
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(1), (2, 7, 8, 6), jnp.float64)
    layers = [
      fgjax.quant.Conv(
        6,
        (3, 3),
        strides=strides,
        padding=((1, 1), (1, 1)),
        feature_group_count=6,
        use_bias=False,
        param_dtype=jnp.float64,
        conv_general_dilated=fn,
      )
      for fn in (None, _depthwise_by_shifts)
    ]
    params = layers[0].init(jax.random.key(0), x)
    loss = lambda p, x, layer: jnp.sum(jnp.sin(layer.apply(p, x)))
    want = layers[0].apply(params, x)
    got = layers[1].apply(params, x)
    assert got.shape == want.shape
    assert jnp.allclose(got, want, rtol=1e-12, atol=1e-12)
    want_grads = jax.grad(loss, (0, 1))(params, x, layers[0])
    got_grads = jax.grad(loss, (0, 1))(params, x, layers[1])
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
      assert jnp.allclose(g, w, rtol=1e-12, atol=1e-12)


def test_depthwise_shifts_keeps_the_parameters_and_drops_only_the_depthwise_convs():
  for quant_friendly in (False, True):
    conv = fgjax.models.MobileNetV2(width_multiplier=0.25, quant_friendly=quant_friendly)
    shifts = conv.clone(depthwise_shifts=True)
    assert jax.tree.structure(_variables(conv)) == jax.tree.structure(_variables(shifts))
    convs = [
      str(jax.make_jaxpr(lambda v, x, m=m: m.apply(v, x))(_variables(m), X)).count(
        "conv_general_dilated["
      )
      for m in (conv, shifts)
    ]
    assert convs[1] == convs[0] - 17  # the 17 depthwise convs, nothing else
