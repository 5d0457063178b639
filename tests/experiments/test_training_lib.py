"""fgjax.training, the pieces the binaries build on: masks, optimizers, integer updates, batches."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fgjax
from fgjax import models, training


def _params(model, shape=(1, 8, 8, 1), *, shapes_only=False):
  init = jax.jit(lambda key: model.init(key, jnp.zeros(shape))["params"])
  return jax.eval_shape(init, jax.random.key(0)) if shapes_only else init(jax.random.key(0))


def test_trainable_subsets_select_the_named_layers():
  params = _params(models.MLP(hidden_sizes=(8, 8), num_classes=3), shapes_only=True)
  paths = lambda mask: [
    p for p, on in zip(training.fgjax.leaf_paths(params), jax.tree.leaves(mask), strict=True) if on
  ]
  assert len(paths(training.trainable_mask(params, "full"))) == 6
  assert paths(training.trainable_mask(params, "linear_probe")) == ["head/bias", "head/kernel"]
  last_two = paths(training.trainable_mask(params, "last_k", last_k=2))
  assert last_two == ["dense_1/bias", "dense_1/kernel", "head/bias", "head/kernel"]
  with pytest.raises(ValueError, match="selects no parameter"):
    training.trainable_mask(params, "prompts")
  with pytest.raises(ValueError, match="unknown subset"):
    training.trainable_mask(params, "everything")


def test_prompts_subset_on_vit():
  vit = models.ViTTiny(
    patch_size=4, dim=8, depth=1, num_heads=2, mlp_dim=8, num_prompts=2, num_classes=3
  )
  params = _params(vit, shapes_only=True)
  mask = training.trainable_mask(params, "prompts")
  on = [
    p for p, m in zip(training.fgjax.leaf_paths(params), jax.tree.leaves(mask), strict=True) if m
  ]
  assert on and all("prompt" in p for p in on)


def test_make_optimizer_by_name_and_errors():
  config = {
    "method": "spsa",
    "num_directions": 2,
    "optimizer": "sgd",
    "optimizer_kwargs": {"learning_rate": 0.1},
  }
  params = {"w": jnp.ones(3), "head": {"kernel": jnp.ones(2)}}
  mask = {"w": False, "head": {"kernel": True}}
  opt = training.make_optimizer(config, mask=mask, seed=1)
  state = opt.init(params)
  updates, _ = opt.update(
    params, state, params, value_fn=lambda p: jnp.sum(p["head"]["kernel"] ** 2)
  )
  assert np.all(np.asarray(updates["w"]) == 0) and np.any(
    np.asarray(updates["head"]["kernel"]) != 0
  )
  with pytest.raises(ValueError, match="not an optax optimizer"):
    training.make_optimizer({**config, "optimizer": "no_such"})
  with pytest.raises(ValueError, match="failed"):
    training.make_optimizer({**config, "optimizer_kwargs": {"lr": 1}})
  with pytest.raises(ValueError, match="unknown"):
    training.make_optimizer({**config, "method": "adjoint"})


def test_passes_per_step():
  assert training.forward_passes_per_step({"method": "backprop"}) == {
    "forward": 1,
    "backward": 1,
    "jvp": 0,
  }
  assert training.forward_passes_per_step({"method": "jvp", "num_directions": 3})["jvp"] == 3
  spsa = {"method": "spsa", "num_directions": 3}
  assert training.forward_passes_per_step(spsa)["forward"] == 6
  assert training.forward_passes_per_step({**spsa, "central": False})["forward"] == 4


def _integer_step(params, updates, rounding="nearest", *, state=None, step=1.0):
  """One update of `params` by the float `updates` (weight units) through
  `make_optimizer(integer_weights=True)` (sgd with learning rate -1 passes them on) and
  `fgjax.apply_integer_updates`; every integer leaf has grid step `step`."""
  config = {"optimizer": "sgd", "optimizer_kwargs": {"learning_rate": -1.0}, "rounding": rounding}
  scales = {
    path: jnp.float32(step)
    for path, leaf in zip(fgjax.leaf_paths(params), jax.tree.leaves(params), strict=True)
    if training.is_integer(leaf)
  }
  opt = training.make_optimizer(config, forward=False, integer_weights=True, scales=scales)
  if state is None:
    state = training.TrainState.create(params, {}, opt, jax.random.key(0)).opt_state
  out, state = opt.update(updates, state, params)
  return fgjax.apply_integer_updates(params, out), state


def test_integer_updates_round_and_saturate():
  params = {"q": jnp.array([100, -100, 5, 0], jnp.int8), "b": jnp.zeros(4)}
  updates = {"q": jnp.array([50.0, -50.0, 0.4, 0.6]), "b": jnp.full(4, 0.5)}
  out, _ = _integer_step(params, updates)
  np.testing.assert_array_equal(out["q"], np.array([127, -127, 5, 1], np.int8))
  assert out["q"].dtype == jnp.int8 and np.allclose(out["b"], 0.5)
  # Stochastic rounding is unbiased: 0.25 steps on average over many draws.
  many = {"q": jnp.zeros(20000, jnp.int16)}
  moved, _ = _integer_step(many, {"q": jnp.full(20000, 0.25)}, "stochastic")
  assert abs(float(moved["q"].mean()) - 0.25) < 4 * np.sqrt(0.25 * 0.75 / 20000)
  four_bits, _ = _integer_step({"q": jnp.array([3], jnp.int4)}, {"q": jnp.array([9.0])})
  assert int(four_bits["q"][0]) == 7  # the int4 dtype saturates at +-7
  # Learning rates are in weight units: with a grid step of 0.5, an update of 1.0 is 2 steps.
  halves, _ = _integer_step({"q": jnp.zeros(2, jnp.int8)}, {"q": jnp.ones(2)}, step=0.5)
  np.testing.assert_array_equal(halves["q"], [2, 2])


def test_error_feedback_accumulates_sub_step_updates():
  # Quarter steps: nearest rounding never moves the weight, error feedback moves it every 4th step
  # (the residual is initialized on the integer leaves, the optimizer state on the float view).
  params = {"q": jnp.zeros(3, jnp.int8)}
  updates = {"q": jnp.full(3, 0.25)}
  for rounding, expected in (("nearest", 0), ("error_feedback", 1)):
    q, state = params, None
    for _ in range(4):
      q, state = _integer_step(q, updates, rounding, state=state)
    np.testing.assert_array_equal(q["q"], np.full(3, expected, np.int8))
  assert isinstance(state.integer.residual["q"], jax.Array)


def test_batches_depend_only_on_seed_and_step():
  a = [training.batch_indices(50, 8, seed=3, step=s) for s in range(20)]
  b = [training.batch_indices(50, 8, seed=3, step=s) for s in range(20)]
  assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
  epoch = np.concatenate(a[:6])
  assert len(set(epoch.tolist())) == 48  # One epoch: distinct examples, remainder dropped.
  assert not np.array_equal(training.batch_indices(50, 8, seed=4, step=0), a[0])


def test_train_step_adapts_with_spsa_and_keeps_the_rest():
  model = models.MLP(hidden_sizes=(8,), num_classes=3)
  params = _params(model, (1, 4))
  config = {
    "method": "sign_spsa",
    "num_directions": 2,
    "epsilon": 1e-3,
    "optimizer": "sgd",
    "optimizer_kwargs": {"learning_rate": 0.01},
  }
  mask = training.trainable_mask(params, "linear_probe")
  opt = training.make_optimizer(config, mask=mask)
  state = training.TrainState.create(params, {}, opt, jax.random.key(0))
  before = jax.tree.map(np.asarray, state.params)
  step = training.make_train_step(model, opt)
  from fgjax.data._dataset import Batch

  state, metrics = step(state, Batch(x=np.ones((4, 4), np.float32), y=np.array([0, 1, 2, 0])))
  assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))
  np.testing.assert_array_equal(state.params["dense_0"]["kernel"], before["dense_0"]["kernel"])
  assert not np.array_equal(state.params["head"]["kernel"], before["head"]["kernel"])
  assert isinstance(opt, optax.GradientTransformationExtraArgs)


def test_train_step_runs_an_m_schedule_from_the_config():
  """Issue 9: the step used to look only for ForwardGradientState, so an m schedule in the chain
  (`config.m_schedule`) failed; now it runs and reports the m each step used."""
  model = models.MLP(hidden_sizes=(8,), num_classes=3)
  params = _params(model, (1, 4))
  config = {
    "method": "sign_spsa",
    "epsilon": 1e-3,
    "optimizer": "sgd",
    "optimizer_kwargs": {"learning_rate": 0.01},
    "m_schedule": "0:1,1:3",
  }
  opt = training.make_optimizer(config, seed=2)
  state = training.TrainState.create(params, {}, opt, jax.random.key(0))
  step = training.make_train_step(model, opt)
  from fgjax.data._dataset import Batch

  batch = Batch(x=np.ones((4, 4), np.float32), y=np.array([0, 1, 2, 0]))
  used = []
  for _ in range(2):
    before = jax.tree.map(np.asarray, state.params)
    state, metrics = step(state, batch)
    used.append(int(metrics["num_directions"]))
    assert np.isfinite(float(metrics["loss"]))
    assert not np.array_equal(state.params["head"]["kernel"], before["head"]["kernel"])
  assert used == [1, 3]
  plateau = training.make_optimizer({**config, "m_schedule": "plateau:1,2", "m_patience": 1})
  assert plateau.init(params)[0].level.dtype == jnp.int32
  assert training.parse_m_schedule("") is None
  assert training.parse_m_schedule("plateau:1,3") == ("plateau", (1, 3))
  with pytest.raises(ValueError, match="m_schedule"):
    training.parse_m_schedule("1-3")
  with pytest.raises(ValueError, match="backprop"):
    training.make_optimizer({**config, "method": "backprop"})
