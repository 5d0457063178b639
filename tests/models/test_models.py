"""Tests for fgjax.models: shapes, parameter counts, naming, batch statistics, jvp/grad, quant."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgjax import models
from fgjax import quant as fq
from fgjax.models._vit import _SelfAttention

NUM_CLASSES = 3

# One row per model: a tiny configuration and input so that every test stays fast on CPU.
TINY = {
  "mlp": (models.MLP(hidden_sizes=(16, 8), num_classes=NUM_CLASSES), (2, 8, 8, 1)),
  "small_cnn": (models.SmallCNN(features=(4, 8), hidden=16, num_classes=NUM_CLASSES), (2, 8, 8, 1)),
  "resnet12": (models.ResNet12(widths=(4, 8, 8, 8), num_classes=NUM_CLASSES), (2, 8, 8, 3)),
  "resnet18": (models.ResNet18(widths=(4, 8, 8, 8), num_classes=NUM_CLASSES), (2, 8, 8, 3)),
  "mobilenet_v2": (
    models.MobileNetV2(width_multiplier=0.25, num_classes=NUM_CLASSES),
    (2, 8, 8, 3),
  ),
  "vit_tiny": (
    models.ViTTiny(
      patch_size=4, dim=16, depth=2, num_heads=2, mlp_dim=32, num_prompts=2, num_classes=NUM_CLASSES
    ),
    (2, 8, 8, 3),
  ),
  "crnn": (models.CRNN(features=(4, 8), hidden=8, num_classes=NUM_CLASSES), (2, 16, 10, 1)),
}
BATCH_NORM_MODELS = ("resnet12", "resnet18", "mobilenet_v2", "crnn")
# All BatchNorm models share one helper (fgjax/models/_common.py); checking its behaviour on two of
# them keeps the suite fast (MobileNetV2 op-by-op is slow to compile on a 2-core CPU).
BATCH_NORM_CHECKED = ("resnet18", "crnn")
# Quantized numerics are fgjax.quant's to test; here: one model per layer type (Dense, Conv,
# DenseGeneral attention, the GRU cell). The wiring test below covers every model.
QUANT_CHECKED = ("mlp", "small_cnn", "vit_tiny", "crnn")


def _key(seed):
  # The "rbg" PRNG compiles an order of magnitude faster than the default threefry inside a jitted
  # init with dozens of initializers (seconds instead of tens of seconds on a 2-core CPU); the
  # models are indifferent to the key's implementation.
  return jax.random.key(seed, impl="rbg")


def _input(shape, seed=1):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@functools.cache
def _jit_init_and_apply(name):
  """Each tiny model's variables and logits, from one jitted init + apply, once per session."""
  model, shape = TINY[name]

  @jax.jit
  def init_and_apply(key, x):
    variables = model.init(key, x)
    return variables, model.apply(variables, x)

  return init_and_apply(_key(0), _input(shape))


def _init(model, shape):
  variables, _ = _jit_init_and_apply(next(n for n, (m, _) in TINY.items() if m is model))
  return variables, _input(shape)


def _num_params(params):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


def _abstract_params(model, shape):
  """Parameter shapes without computing anything (the big models are only traced)."""
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))
  return variables["params"]


@pytest.mark.parametrize("name", list(TINY))
def test_init_and_apply_under_jit(name):
  model, shape = TINY[name]
  variables, logits = _jit_init_and_apply(name)
  assert "params" in variables
  assert logits.shape == (shape[0], NUM_CLASSES)
  assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("name", list(TINY))
def test_jvp_equals_grad_dot_tangent(name):
  """Forward and reverse mode agree: jvp(loss)(v) == <grad(loss), v> (BN frozen: train=False)."""
  model, shape = TINY[name]
  variables, x = _init(model, shape)
  labels = jnp.arange(shape[0]) % NUM_CLASSES
  others = {k: v for k, v in variables.items() if k != "params"}

  def loss(params):
    logits = model.apply({"params": params, **others}, x, train=False)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))

  params = variables["params"]
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(7)
  tangent = treedef.unflatten([rng.standard_normal(p.shape).astype(np.float32) for p in leaves])

  @jax.jit
  def forward_and_reverse(params, tangent):
    return jax.jvp(loss, (params,), (tangent,)), jax.grad(loss)(params)

  (value, directional), grads = forward_and_reverse(params, tangent)
  expected = sum(
    jnp.vdot(g, t) for g, t in zip(jax.tree.leaves(grads), jax.tree.leaves(tangent), strict=False)
  )
  assert bool(jnp.isfinite(value))
  np.testing.assert_allclose(directional, expected, rtol=1e-4, atol=1e-6)
  assert float(jnp.abs(expected)) > 0


@pytest.mark.parametrize("name", list(TINY))
def test_layer_names_give_forward_order_and_head_last(name):
  model, shape = TINY[name]
  # The order in which the top-level modules are called in a traced init is the forward order.
  creation_order = []

  def record(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and len(module.path) == 1:
      if module.path[0] not in creation_order:
        creation_order.append(module.path[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    params = jax.eval_shape(model.init, _key(0), jnp.ones(shape))["params"]
  names = models.layer_names(params)
  # Parameter-free wrappers (e.g. CRNN's nn.RNN around its named cell) hold no params: drop them.
  assert names == [name for name in creation_order if name in params]
  # jax.tree.map sorts dict keys ("block_10" < "block_2"); the order must not depend on that.
  assert models.layer_names(jax.tree.map(lambda p: p, params)) == names
  assert names[-1] == "head"
  assert params["head"]["kernel"].shape[-1] == NUM_CLASSES


def test_layer_names_sorts_by_index_not_alphabet():
  params = {name: {} for name in ("head", "block_10", "stem", "block_2", "norm", "block_1")}
  assert models.layer_names(params) == ["stem", "block_1", "block_2", "block_10", "norm", "head"]
  assert models.layer_names({"params": params})[-1] == "head"
  with pytest.raises(ValueError, match="naming rule"):
    models.layer_names({"Dense_0": {}, "head": {}})
  with pytest.raises(ValueError, match="share a position"):
    models.layer_names({"conv_1": {}, "dense_1": {}})


def test_mlp_parameter_count_formula():
  sizes = [8 * 8 * 1, 16, 8, NUM_CLASSES]
  expected = sum(
    (fan_in + 1) * fan_out for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=False)
  )
  model, shape = TINY["mlp"]
  assert _num_params(_abstract_params(model, shape)) == expected


def test_small_cnn_parameter_count_formula():
  # conv 3x3 1->4, conv 3x3 4->8, two SAME 2x2 poolings take 8x8 to 2x2, dense 2*2*8 -> 16, head.
  expected = (9 * 1 + 1) * 4 + (9 * 4 + 1) * 8 + (2 * 2 * 8 + 1) * 16 + (16 + 1) * NUM_CLASSES
  model, shape = TINY["small_cnn"]
  assert _num_params(_abstract_params(model, shape)) == expected


def test_crnn_parameter_count_formula():
  # Default CRNN on 97 frames x 40 mels: convs (no bias) + BN scale/bias, two poolings take 40 mels
  # to 10, so the GRU sees 10 * 32 = 320 features; flax GRU: 3 input kernels + biases, 3 recurrent
  # kernels, one recurrent bias (hn).
  convs = 9 * 1 * 16 + 2 * 16 + 9 * 16 * 32 + 2 * 32
  gru = 3 * (320 * 64 + 64) + 3 * 64 * 64 + 64
  head = (64 + 1) * 10
  assert _num_params(_abstract_params(models.CRNN(), (1, 97, 40, 1))) == convs + gru + head


@pytest.mark.parametrize(
  "model, shape, expected",
  [
    # 11,173,962: ResNet-18 for CIFAR-10 as usually quoted (kuangliu/pytorch-cifar; torchvision's
    # resnet18 with a 3x3 stem and a 10-way fc).
    (models.ResNet18(num_classes=10), (1, 32, 32, 3), 11_173_962),
    # 12,424,320 in the body (the usual "12.4M" of few-shot ResNet-12, widths 64-160-320-640;
    # computed by hand in the class docstring's terms) plus a 5-way head: 641 * 5.
    (models.ResNet12(num_classes=5), (1, 84, 84, 3), 12_424_320 + 641 * 5),
    # 3,504,872: torchvision mobilenet_v2(width_mult=1.0) with 1000 classes.
    (models.MobileNetV2(num_classes=1000, small_images=False), (1, 224, 224, 3), 3_504_872),
    # 5,717,416: timm vit_tiny_patch16_224 with 1000 classes.
    (models.ViTTiny(num_classes=1000), (1, 224, 224, 3), 5_717_416),
  ],
  ids=["resnet18", "resnet12", "mobilenet_v2", "vit_tiny"],
)
def test_parameter_count_matches_reference(model, shape, expected):
  assert _num_params(_abstract_params(model, shape)) == expected


def test_resnet12_body_count_by_hand():
  def block(c_in, c_out):  # three 3x3 convs, 1x1 shortcut, four BN (scale + bias).
    return 9 * c_in * c_out + 2 * 9 * c_out * c_out + c_in * c_out + 4 * 2 * c_out

  widths = [3, 64, 160, 320, 640]
  body = sum(block(a, b) for a, b in zip(widths[:-1], widths[1:], strict=False))
  assert body == 12_424_320


def test_mobilenet_width_multiplier_shrinks_model():
  counts = [
    _num_params(_abstract_params(models.MobileNetV2(width_multiplier=w), (1, 32, 32, 3)))
    for w in (0.5, 1.0)
  ]
  assert counts[0] < counts[1]


@pytest.mark.parametrize("name", BATCH_NORM_CHECKED)
def test_frozen_batch_statistics(name):
  """train=False needs no mutable collection and treats every example independently of its batch."""
  model, shape = TINY[name]
  variables, x = _init(model, shape)
  assert "batch_stats" in variables
  batched = model.apply(variables, x, train=False)
  alone = model.apply(variables, x[:1], train=False)
  np.testing.assert_allclose(alone, batched[:1], rtol=1e-5, atol=1e-5)
  # train=True writes running statistics, so it needs the collection to be mutable ...
  with pytest.raises(Exception, match="batch_stats"):
    model.apply(variables, x, train=True)
  # ... and then it does move them (and the output depends on the batch).
  _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  moved = jax.tree.map(
    lambda a, b: bool(jnp.any(a != b)), updates["batch_stats"], variables["batch_stats"]
  )
  assert any(jax.tree.leaves(moved))


def test_vit_prompts_are_per_block_and_maskable():
  model, shape = TINY["vit_tiny"]
  params = _init(model, shape)[0]["params"]
  prompt_paths = [
    "/".join(str(k.key) for k in path)
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
    if any(getattr(k, "key", None) == "prompts" for k in path)
  ]
  assert prompt_paths == [f"block_{i}/prompts" for i in range(model.depth)]
  assert params["block_0"]["prompts"].shape == (model.num_prompts, model.dim)
  # Prompts add exactly depth * num_prompts * dim parameters; the rest is the plain ViT.
  plain = model.clone(num_prompts=0)
  plain_params = _abstract_params(plain, shape)
  assert _num_params(params) - _num_params(plain_params) == model.depth * model.num_prompts * 16


def test_vit_deep_prompts_of_each_block_change_the_output():
  model, shape = TINY["vit_tiny"]
  variables, x = _init(model, shape)
  base = model.apply(variables, x)
  for block in range(model.depth):
    # A random change: a constant shift of a token would be removed by the block's LayerNorm.
    noise = np.random.default_rng(block).standard_normal(
      variables["params"]["block_0"]["prompts"].shape
    )
    changed = jax.tree.map(lambda p: p, variables)  # A copy of the dicts.
    changed["params"][f"block_{block}"]["prompts"] = (
      variables["params"][f"block_{block}"]["prompts"] + noise
    )
    assert float(jnp.max(jnp.abs(model.apply(changed, x) - base))) > 1e-4


def test_vit_zero_prompts_match_a_model_without_prompts_only_through_attention():
  """The same weights with num_prompts=0 give the plain ViT; prompts change nothing else."""
  model, shape = TINY["vit_tiny"]
  variables, x = _init(model, shape)
  plain = model.clone(num_prompts=0)
  stripped = jax.tree_util.tree_map_with_path(lambda path, p: p, variables)
  for block in range(model.depth):
    del stripped["params"][f"block_{block}"]["prompts"]
  logits = plain.apply(stripped, x)
  assert logits.shape == (shape[0], NUM_CLASSES)
  assert float(jnp.max(jnp.abs(logits - model.apply(variables, x)))) > 0


def test_self_attention_equals_flax_multi_head_attention():
  """Same parameter tree and same outputs as nn.MultiHeadDotProductAttention (q, k, v, out)."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  ours = _SelfAttention(num_heads=2)
  variables = ours.init(jax.random.key(1), x)
  reference = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
  assert jax.tree.structure(variables) == jax.tree.structure(
    reference.init(jax.random.key(1), x, x)
  )
  np.testing.assert_allclose(
    ours.apply(variables, x), reference.apply(variables, x, x), rtol=1e-5, atol=1e-5
  )


def test_quant_gru_cell_equals_flax_gru_cell():
  hidden = jax.random.normal(jax.random.key(0), (2, 6))
  inputs = jax.random.normal(jax.random.key(1), (2, 5))
  variables = nn.GRUCell(6).init(jax.random.key(2), hidden, inputs)
  ours = models.QuantGRUCell(6)
  assert jax.tree.structure(ours.init(jax.random.key(2), hidden, inputs)) == jax.tree.structure(
    variables
  )
  np.testing.assert_allclose(
    ours.apply(variables, hidden, inputs)[0],
    nn.GRUCell(6).apply(variables, hidden, inputs)[0],
    rtol=1e-6,
  )


_WEIGHT_LAYERS = (nn.Dense, nn.DenseGeneral, nn.Conv)


def _flax_base(module):
  return next(c for c in type(module).__mro__ if c in _WEIGHT_LAYERS)


@pytest.mark.parametrize("name", list(TINY))
def test_every_weight_layer_is_a_quant_layer_carrying_the_config(name):
  """No matmul or conv escapes quantization: each is an fgjax.quant layer with the model's config.

  The layers are intercepted and run as their Flax base class, so this checks the wiring whatever
  the state of the quantized numerics.
  """
  config = fq.QuantConfig(weight_bits=8, act_bits=8)
  model, shape = TINY[name]
  model = model.clone(quant=config)
  seen, escaped, bypassing = [], [], [False]

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, _WEIGHT_LAYERS) or bypassing[0]:
      return next_fun(*args, **kwargs)
    if not isinstance(module, fq.Dense | fq.DenseGeneral | fq.Conv) or module.quant != config:
      escaped.append(module.path)
      return next_fun(*args, **kwargs)
    seen.append(tuple(module.path))
    bypassing[0] = True
    try:
      return _flax_base(module).__call__(module, *args, **kwargs)
    finally:
      bypassing[0] = False

  with nn.intercept_methods(interceptor):
    params = jax.eval_shape(model.init, _key(0), jnp.ones(shape))["params"]
  assert not escaped
  kernels = {
    tuple(k.key for k in path[:-1])
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
    if path[-1].key == "kernel"
  }
  assert kernels and kernels <= set(seen)


def test_get_model_by_name():
  assert isinstance(models.get_model("resnet18", num_classes=4), models.ResNet18)
  assert isinstance(models.get_model("ResNet18"), models.ResNet18)
  assert isinstance(models.get_model("vit-tiny", depth=1), models.ViTTiny)
  assert models.get_model("mlp", hidden_sizes=(4,)).hidden_sizes == (4,)
  classes = {models.get_model(name).__class__ for name in models.model_names()}
  assert len(classes) == len(models.model_names()) == len(TINY)
  with pytest.raises(ValueError, match="resnet18.*vit_tiny"):
    models.get_model("resnet50")


def _quant_layers_work():
  try:
    fq.Dense(2, quant=fq.QuantConfig(weight_bits=8, act_bits=8)).init(
      jax.random.key(0), jnp.ones((1, 2))
    )
  except NotImplementedError:
    return False
  return True


def _w8a8():
  try:
    return fq.preset("w8a8")
  except NotImplementedError:
    return fq.QuantConfig(weight_bits=8, act_bits=8)


requires_quant = pytest.mark.skipif(
  not _quant_layers_work(), reason="fgjax.quant layers raise NotImplementedError (not landed yet)"
)


@requires_quant
@pytest.mark.parametrize("name", QUANT_CHECKED)
def test_w8a8_model_is_close_to_float_and_differentiable_forward(name):
  model, shape = TINY[name]
  variables, x = _init(model, shape)
  quantized = model.clone(quant=_w8a8())
  q_variables = jax.eval_shape(quantized.init, _key(0), x)
  # With float weight storage the parameter tree is the float model's, so the same weights load.
  assert jax.tree.structure(q_variables["params"]) == jax.tree.structure(variables["params"])
  float_logits = model.apply(variables, x)

  def loss(params):
    return jnp.sum(quantized.apply({**variables, "params": params}, x) ** 2)

  @jax.jit
  def logits_and_jvp(params, tangent):
    return quantized.apply({**variables, "params": params}, x), jax.jvp(loss, (params,), (tangent,))

  tangent = jax.tree.map(jnp.ones_like, variables["params"])
  logits, (value, directional) = logits_and_jvp(variables["params"], tangent)
  assert logits.shape == float_logits.shape
  error = float(jnp.linalg.norm(logits - float_logits) / jnp.linalg.norm(float_logits))
  assert error < 0.2, error
  assert bool(jnp.isfinite(value)) and bool(jnp.isfinite(directional))


# Every model in float; in w8a8 the Dense, Conv and GRU models (compiling three estimators for every
# quantized model would cost minutes of CI on 2 cores; the others' quantized layers are the same
# types, checked by the wiring and w8a8 jvp tests above and in tests/quant).
ESTIMATOR_CASES = [(name, "float32") for name in TINY] + [
  (name, "w8a8") for name in ("mlp", "small_cnn", "crnn")
]


@requires_quant
@pytest.mark.parametrize(("name", "precision"), ESTIMATOR_CASES)
def test_one_step_of_every_estimator(name, precision):
  """Each model, float and w8a8, takes one step of jvp, spsa and backprop (frozen BN statistics)."""
  import optax

  import fgjax

  model, shape = TINY[name]
  model = model.clone(quant=fq.preset(precision))
  variables, x = _init(TINY[name][0], shape)
  labels = jnp.arange(shape[0]) % NUM_CLASSES
  frozen = {k: v for k, v in variables.items() if k != "params"}

  def loss(params):
    logits = model.apply({**frozen, "params": params}, x, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  estimators = {
    "jvp": fgjax.estimators.jvp(1),
    "spsa": fgjax.estimators.spsa(1, epsilon=1e-2),
    "backprop": fgjax.estimators.backprop(),
  }
  opt = {k: optax.chain(fgjax.forward_gradient(e), optax.sgd(1e-2)) for k, e in estimators.items()}

  @jax.jit
  def steps(params):
    out = {}
    for k, o in opt.items():
      updates, _ = o.update(params, o.init(params), params, value_fn=loss)
      out[k] = (loss(params), optax.apply_updates(params, updates))
    return out

  for method, (value, new_params) in steps(variables["params"]).items():
    assert bool(jnp.isfinite(value)), method
    assert jax.tree.structure(new_params) == jax.tree.structure(variables["params"])
    moved = sum(
      float(jnp.sum(jnp.abs(a - b)))
      for a, b in zip(
        jax.tree.leaves(new_params), jax.tree.leaves(variables["params"]), strict=True
      )
    )
    assert np.isfinite(moved) and moved > 0, (method, moved)


def test_crnn_with_integer_weights_takes_an_spsa_step():
  """Integer storage inside the GRU's scan: the scales are broadcast over time like params."""
  import fgjax

  model, shape = TINY["crnn"]
  config = fq.preset("w16a8", weight_storage="integer")
  variables, x = _init(model, shape)
  fixed = fq.to_fixed_point(variables, config)
  quantized = model.clone(quant=config)

  def loss(params):
    logits = quantized.apply({**fixed.frozen, "params": params}, x, train=False)
    return jnp.mean(logits**2)

  epsilon = 4.0 * max(float(jnp.max(s)) for s in fixed.scales.values())  # 4 grid steps
  est = fgjax.estimators.spsa(
    2,
    epsilon=epsilon,
    distribution="rademacher",
    mask=fq.integer_mask(fixed.params),
    scales=fixed.scales,
  )
  estimate = jax.jit(lambda p: est(loss, p, key=jax.random.key(0)))(fixed.params)
  kernel = fixed.params["gru_2"]["ir"]["kernel"]
  assert kernel.dtype == jnp.int16
  assert bool(jnp.isfinite(estimate.value))
  assert float(jnp.max(jnp.abs(estimate.metrics["directional_derivatives"]))) > 0
