"""fgjax.parallel on 8 forced host devices (in a subprocess: the rest of the suite keeps one)."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import fgjax
from fgjax import parallel

WORKER = pathlib.Path(__file__).with_name("_sharded_worker.py")
ROOT = WORKER.parents[2]


@pytest.fixture(scope="module")
def report():
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
  env.pop("XLA_FLAGS", None)  # the worker sets the device count
  done = subprocess.run(
    [sys.executable, str(WORKER)], capture_output=True, text=True, env=env, timeout=900
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout)


def test_sharded_estimate_equals_single_device(report):
  # Direction, data and 2-D meshes; replicated and FSDP-sharded parameters. Only the batch mean's
  # summation order differs (float32 losses, differences divided by 2ε = 0.02): relative 1e-4.
  expected = {
    "spsa directions=8",
    "spsa data=8",
    "spsa directions=4,data=2",
    "spsa_sign_one_sided directions=2,data=4",
    "jvp directions=4,data=2",
    "spsa directions=2,data=2,model=2 sharded params",
    "optax spsa directions=8",
  }
  assert set(report["equal"]) == expected
  for case, errors in report["equal"].items():
    assert errors["grads"] < 1e-4, (case, errors)
    assert errors["derivatives"] < 1e-4, (case, errors)
    assert errors["value"] < 1e-5, (case, errors)
  # Splitting directions only does not change a single operation: bit for bit.
  assert report["equal"]["spsa directions=8"]["grads"] == 0.0


def test_spsa_communicates_k_scalars_backprop_a_gradient(report):
  k = 8
  small, large = (report["bytes"][f"SPSA directions=4,data=2 width={w}"] for w in (32, 320))
  assert large["params"] >= 9 * small["params"]  # the model is ~10x larger
  for spsa in (small, large):
    assert 0 < spsa["bytes"] <= 64 * k + 4, spsa  # K scalars (+ the loss), whatever the size
  assert large["bytes"] == small["bytes"]
  backprop_small, backprop_large = (
    report["bytes"][f"Backprop data=8 width={w}"] for w in (32, 320)
  )
  for backprop in (backprop_small, backprop_large):
    assert backprop["bytes"] >= 4 * backprop["params"], backprop  # all-reduces the gradient
  assert backprop_large["bytes"] >= 9 * backprop_small["bytes"]


def test_parse_mesh():
  assert parallel.parse_mesh("directions=4, data=2") == {"directions": 4, "data": 2}
  assert parallel.parse_mesh("") == {}
  for bad in ("directions", "data=two", "data=2,data=2", "data=0"):
    with pytest.raises(ValueError, match="mesh"):
      parallel.parse_mesh(bad)
  with pytest.raises(ValueError, match="devices"):
    parallel.make_mesh(f"data={jax.device_count() + 1}")


def test_sharded_validates_arguments():
  mesh = parallel.make_mesh("data=1")
  with pytest.raises(ValueError, match="directions_axis"):
    parallel.sharded(fgjax.estimators.spsa(4), mesh)
  with pytest.raises(ValueError, match="estimator"):
    parallel.sharded(lambda *a, **k: None, mesh, directions_axis=None)


def test_one_device_mesh_under_value_and_grad():
  # On the suite's single device: the wrapper keeps the estimator interface and its result.
  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  x = jnp.ones((4, 2))

  def loss_fn(p, x):
    return jnp.mean((x @ p["w"]) ** 2)

  est = fgjax.estimators.spsa(num_directions=2, epsilon=1e-2)
  mesh = parallel.make_mesh("directions=1,data=1")
  key = jax.random.key(0)
  value, grads = jax.jit(fgjax.value_and_grad(loss_fn, parallel.sharded(est, mesh)))(
    params, x, key=key
  )
  ref_value, ref_grads = fgjax.value_and_grad(loss_fn, est)(params, x, key=key)
  assert jnp.allclose(value, ref_value, rtol=1e-6)
  assert jnp.allclose(grads["w"], ref_grads["w"], rtol=1e-5, atol=1e-6)
  text = (
    jax.jit(fgjax.value_and_grad(loss_fn, parallel.sharded(est, mesh)))
    .lower(params, x, key=key)
    .compile()
    .as_text()
  )
  assert parallel.communicated_bytes(text) <= 64 * 2 + 4


def test_make_estimator_mesh_hook():
  config = {"method": "sign_spsa", "num_directions": 2}
  est = fgjax.training.make_estimator(config, mesh="directions=1")
  assert isinstance(est, parallel.Sharded) and est.data_axis is None
  assert isinstance(fgjax.training.make_estimator(config), fgjax.estimators.SPSA)
  with pytest.raises(ValueError, match="directions"):
    fgjax.training.make_estimator(config, mesh="data=1")


def test_sharded_parameters_stay_sharded(report):
  # FSDP-style parameters over a 'model' axis of 4: the estimate keeps their sharding, each device
  # outputs a quarter of it, and the bytes communicated are K scalars whatever the model size.
  small, large = report["fsdp"]["320"], report["fsdp"]["3200"]
  for case in (small, large):
    assert case["grads_sharded"], case
    assert case["bytes"] <= 64 * 8 + 4, case
    # The rest of the output (loss, K derivatives, metrics) is a few scalars.
    assert case["output_bytes_per_device"] <= case["params_bytes"] / 4 + 256, case
  assert large["bytes"] == small["bytes"]
