"""The quantization-friendly MobileNetV2, checked by tracing only (no compilation)."""

import jax
import jax.numpy as jnp

import fgjax
from fgjax import efficiency

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
