"""Run in a subprocess with 8 forced host devices by test_parallel.py; prints a JSON report.

Kept out of the pytest process so that the rest of the suite keeps one device.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import fgjax  # noqa: E402
from fgjax import parallel  # noqa: E402


def init(key, width, inputs=12, classes=4):
  k1, k2 = jax.random.split(key)
  return {
    "w1": jax.random.normal(k1, (inputs, width)) / np.sqrt(inputs),
    "b1": jnp.zeros((width,)),
    "w2": jax.random.normal(k2, (width, classes)) / np.sqrt(width),
    "b2": jnp.zeros((classes,)),
  }


def loss_fn(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  logits = h @ params["w2"] + params["b2"]
  return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], 1)[:, 0])


def elementwise_loss(params):
  return sum(jnp.mean((w - 1.0) ** 2) for w in jax.tree.leaves(params))


def relative_error(a, b):
  a, b = jax.tree.leaves(a), jax.tree.leaves(b)
  num = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(a, b, strict=True))
  den = sum(float(jnp.sum(y**2)) for y in b)
  return float(np.sqrt(num / den))


def build(est, spec):
  axes = parallel.parse_mesh(spec)
  return parallel.sharded(
    est,
    parallel.make_mesh(spec),
    directions_axis="directions" if "directions" in axes else None,
    data_axis="data" if "data" in axes else None,
  )


def main():
  assert jax.device_count() == 8, jax.device_count()
  key = jax.random.key(0)
  params = init(jax.random.key(1), 32)
  x = jax.random.normal(jax.random.key(2), (16, 12))
  y = jax.random.randint(jax.random.key(3), (16,), 0, 4)
  report = {"equal": {}, "bytes": {}}
  estimators = {
    "spsa": fgjax.estimators.spsa(num_directions=8, epsilon=1e-2),
    "spsa_sign_one_sided": fgjax.estimators.spsa(8, 1e-2, central=False, sign=True),
    "jvp": fgjax.estimators.jvp(num_directions=8),
  }
  meshes = {
    "spsa": ("directions=8", "data=8", "directions=4,data=2"),
    "spsa_sign_one_sided": ("directions=2,data=4",),
    "jvp": ("directions=4,data=2",),
  }
  for name, est in estimators.items():
    reference = jax.jit(lambda p, a, b, k, e=est: e(loss_fn, p, a, b, key=k))(params, x, y, key)
    for spec in meshes[name]:
      sharded = build(est, spec)
      out = jax.jit(lambda p, a, b, k, e=sharded: e(loss_fn, p, a, b, key=k))(params, x, y, key)
      report["equal"][f"{name} {spec}"] = {
        "grads": relative_error(out.grads, reference.grads),
        "value": abs(float(out.value - reference.value)),
        "derivatives": relative_error(
          out.metrics["directional_derivatives"], reference.metrics["directional_derivatives"]
        ),
      }
  # FSDP-style sharded parameters on a third, automatic axis.
  mesh = parallel.make_mesh("directions=2,data=2,model=2")
  specs = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()}
  placed = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
  for name in ("spsa",):
    est = estimators[name]
    reference = jax.jit(lambda p, a, b, k, e=est: e(loss_fn, p, a, b, key=k))(params, x, y, key)
    sharded = parallel.sharded(est, mesh, param_specs=specs)
    out = jax.jit(lambda p, a, b, k, e=sharded: e(loss_fn, p, a, b, key=k))(placed, x, y, key)
    report["equal"][f"{name} directions=2,data=2,model=2 sharded params"] = {
      "grads": relative_error(out.grads, reference.grads),
      "value": abs(float(out.value - reference.value)),
      "derivatives": 0.0,
    }
  # FSDP: perturbation and estimate shard-local. An elementwise loss, so that the model itself
  # needs no communication; directions vmapped, so that no collective sits inside a loop. Leaves
  # above _perturbation.SMALL_LEAF elements: smaller ones are drawn as one concatenated group
  # (issue 15), which XLA reshuffles across devices when they are sharded (docs/distributed.md).
  mesh = parallel.make_mesh("directions=2,model=4")
  specs = {"w": P("model", None), "v": P(None, "model")}
  report["fsdp"] = {}
  for width in (320, 3200):
    p = {"w": jnp.zeros((width, 64)), "v": jnp.zeros((64, width))}
    placed = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in p.items()}
    est = parallel.sharded(
      fgjax.estimators.spsa(8, 1e-2, chunk_size=None), mesh, data_axis=None, param_specs=specs
    )
    step = jax.jit(lambda q, k, e=est: e(elementwise_loss, q, key=k))
    compiled = step.lower(placed, key).compile()
    out = step(placed, key)
    report["fsdp"][width] = {
      "bytes": parallel.communicated_bytes(compiled),
      "params_bytes": 4 * sum(v.size for v in p.values()),
      "output_bytes_per_device": compiled.memory_analysis().output_size_in_bytes,
      "grads_sharded": all(
        out.grads[k].sharding.is_equivalent_to(NamedSharding(mesh, specs[k]), 2) for k in specs
      ),
    }
  # Through optax as the binaries build it (`--config.mesh=directions=8`): the same update.
  config = {"method": "spsa", "num_directions": 8, "epsilon": 1e-2, "optimizer": "sgd"}
  config["optimizer_kwargs"] = {"learning_rate": 0.1}
  updates = {}
  for mesh in ("", "directions=8"):
    optimizer = fgjax.training.make_optimizer(config, seed=0, mesh=mesh)

    @jax.jit
    def update(p, optimizer=optimizer):
      return optimizer.update(p, optimizer.init(p), p, value_fn=lambda q: loss_fn(q, x, y))[0]

    updates[mesh] = update(params)
  report["equal"]["optax spsa directions=8"] = {
    "grads": relative_error(updates["directions=8"], updates[""]),
    "value": 0.0,
    "derivatives": 0.0,
  }
  # Bytes communicated per step, from the compiled HLO: SPSA against data-parallel backprop.
  for width in (32, 320):
    p = init(jax.random.key(1), width)
    count = sum(v.size for v in jax.tree.leaves(p))
    for spec, est in (
      ("directions=4,data=2", estimators["spsa"]),
      ("data=8", fgjax.estimators.backprop()),
    ):
      sharded = build(est, spec)
      step = jax.jit(lambda p, a, b, k, e=sharded: e(loss_fn, p, a, b, key=k))
      compiled = step.lower(p, x, y, key).compile()
      label = f"{type(est).__name__} {spec} width={width}"
      report["bytes"][label] = {"bytes": parallel.communicated_bytes(compiled), "params": count}
  json.dump(report, sys.stdout)


if __name__ == "__main__":
  main()
