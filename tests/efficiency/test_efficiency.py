"""Efficiency report: MAC counts equal hand counts; integer MACs; XLA cost; the written report."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fgjax
from fgjax import efficiency


def test_mlp_macs_equal_a_hand_count():
  model = fgjax.models.MLP(hidden_sizes=(16, 12), num_classes=4)
  x = jnp.ones((3, 8))
  variables = model.init(jax.random.key(0), x)
  counts = efficiency.count_ops(lambda v, x: model.apply(v, x), variables, x)
  assert counts.macs == 3 * (8 * 16 + 16 * 12 + 12 * 4)
  assert counts.integer_macs == 0


class _Convs(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(5, (3, 3), padding="SAME")(x)  # (2, 6, 6, 3) -> (2, 6, 6, 5)
    x = nn.Conv(5, (3, 3), strides=2, padding="VALID", feature_group_count=5)(x)  # -> (2, 2, 2, 5)
    x = nn.Conv(6, (1, 1), use_bias=False)(x)  # pointwise -> (2, 2, 2, 6)
    return nn.Dense(7)(x.reshape(2, -1))  # 24 -> 7


def test_conv_macs_equal_a_hand_count():
  x = jnp.ones((2, 6, 6, 3))
  model = _Convs()
  variables = model.init(jax.random.key(0), x)
  counts = efficiency.count_ops(lambda v, x: model.apply(v, x), variables, x)
  hand = (
    (2 * 6 * 6 * 5) * (3 * 3 * 3)  # dense 3x3
    + (2 * 2 * 2 * 5) * (3 * 3 * 1)  # depthwise: one input channel per group
    + (2 * 2 * 2 * 6) * 5  # pointwise
    + 2 * 24 * 7  # head
  )
  assert counts.macs == hand
  assert counts.by_primitive["conv_general_dilated"] == hand - 2 * 24 * 7


def test_w8a8_matmuls_are_integer_macs():
  model = fgjax.models.MLP(hidden_sizes=(16,), num_classes=4, quant=fgjax.quant.preset("w8a8"))
  x = jnp.ones((3, 8))
  variables = model.init(jax.random.key(0), x)
  counts = efficiency.count_ops(lambda v, x: model.apply(v, x), variables, x)
  # The int8 x int8 matmuls; the rest of `macs` is the per-channel rescale (an outer product).
  assert counts.integer_macs == 3 * (8 * 16 + 16 * 4)
  assert counts.integer_ops >= 2 * counts.integer_macs


def test_scan_counts_each_iteration_and_backprop_step_about_triples_the_forward():
  w = jnp.ones((8, 8))
  body = lambda c, _: (c @ w, None)
  counts = efficiency.count_ops(
    lambda c: jax.lax.scan(body, c, None, length=5)[0], jnp.ones((2, 8))
  )
  assert counts.macs == 5 * 2 * 8 * 8
  loss = lambda w, x: jnp.sum(jnp.tanh(x @ w))
  forward = efficiency.count_ops(loss, w, jnp.ones((4, 8))).macs
  step = efficiency.count_ops(jax.grad(loss), w, jnp.ones((4, 8))).macs
  assert step == 2 * forward  # forward + the weight gradient (x is not differentiated)


def test_xla_cost_and_report(tmp_path):
  f = lambda w, x: jnp.tanh(x @ w)
  args = (jnp.ones((16, 32)), jnp.ones((1, 16)))
  cost = efficiency.xla_cost(f, *args)
  assert cost["flops"] >= 2 * 16 * 32
  assert cost["peak_bytes"] >= 4 * (16 * 32 + 16 + 32)
  row = efficiency.measure(
    model="toy",
    method="backprop",
    precision="float32",
    params={"w": args[0]},
    forward=f,
    forward_args=args,
    step=jax.grad(lambda w, x: jnp.sum(f(w, x))),
    step_args=args,
    accuracy=0.5,
    repeats=3,
  )
  assert row.parameters == 512 and row.weight_bytes == 2048 and row.forward_macs == 512
  assert row.lpirc == pytest.approx(0.5 / max(30.0, row.latency_ms))
  paths = efficiency.write_report([row], tmp_path)
  assert "| toy | backprop | float32 | 512 |" in paths["md"].read_text()
  assert paths["png"].stat().st_size > 0
  assert len(paths["csv"].read_text().splitlines()) == 2


def test_lpirc_score_saturates_below_30_ms():
  assert (
    efficiency.lpirc_score(0.9, 10.0) == efficiency.lpirc_score(0.9, 30.0) == pytest.approx(0.03)
  )
  assert math.isclose(efficiency.lpirc_score(0.9, 60.0), 0.015)
  with pytest.raises(ValueError):
    efficiency.lpirc_score(0.9, 0.0)
  np.testing.assert_equal(efficiency.weight_bytes({"a": jnp.ones(3, jnp.int8)}), 3)
