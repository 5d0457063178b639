"""Step time and bytes communicated per step on 1, 2, 4, 8 devices: SPSA / jvp against backprop.

For each device count n, on an MLP (784-512-512-10 by default) and a batch of 64:
- SPSA (K directions) with the directions split over n devices ("directions=n"),
- SPSA with the batch split over n devices ("data=n"),
- jvp with the directions split ("directions=n"),
- data-parallel backprop ("data=n"), which all-reduces a parameter-sized gradient.
Each is `jax.jit(fgjax.value_and_grad(loss, fgjax.parallel.sharded(est, mesh)))`; bytes are the
operands of the collectives in the compiled HLO (`fgjax.parallel.communicated_bytes`), time the
median of `--repeats` steps after one warm-up call.

Without an accelerator it forces 8 host devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8), which share the machine's CPU cores:
the bytes are what a real mesh would move; the step times show the
overhead, not a speed-up. With one GPU only the one-device rows run.

Usage:
  python scripts/scaling.py --out results/scaling.jsonl            # prints a Markdown table
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import fgjax  # noqa: E402
from fgjax import parallel  # noqa: E402


def init(key, sizes):
  params = {}
  for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
    key, sub = jax.random.split(key)
    params[f"dense{i}"] = {
      "kernel": jax.random.normal(sub, (fan_in, fan_out)) / jnp.sqrt(fan_in),
      "bias": jnp.zeros((fan_out,)),
    }
  return params


def loss_fn(params, x, y):
  for i in range(len(params)):
    layer = params[f"dense{i}"]
    x = x @ layer["kernel"] + layer["bias"]
    if i < len(params) - 1:
      x = jax.nn.relu(x)
  return jnp.mean(jax.nn.logsumexp(x, -1) - jnp.take_along_axis(x, y[:, None], 1)[:, 0])


def measure(step, args, repeats):
  jax.block_until_ready(step(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=None)
  parser.add_argument("--devices", default="1,2,4,8")
  parser.add_argument("--sizes", default="784,512,512,10")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--num-directions", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=5)
  flags = parser.parse_args()

  sizes = [int(s) for s in flags.sizes.split(",")]
  params = init(jax.random.key(0), sizes)
  count = sum(v.size for v in jax.tree.leaves(params))
  x = jax.random.normal(jax.random.key(1), (flags.batch, sizes[0]))
  y = jax.random.randint(jax.random.key(2), (flags.batch,), 0, sizes[-1])
  key = jax.random.key(3)
  k = flags.num_directions
  methods = [
    ("spsa", "directions", fgjax.estimators.spsa(k, 1e-3)),
    ("spsa", "data", fgjax.estimators.spsa(k, 1e-3)),
    ("jvp", "directions", fgjax.estimators.jvp(k)),
    ("backprop", "data", fgjax.estimators.backprop()),
  ]
  rows = []
  for n in (int(d) for d in flags.devices.split(",")):
    if n > jax.device_count():
      continue
    for name, axis, est in methods:
      mesh = parallel.make_mesh({axis: n})
      sharded = parallel.sharded(
        est,
        mesh,
        directions_axis=axis if axis == "directions" else None,
        data_axis=axis if axis == "data" else None,
      )
      step = jax.jit(fgjax.value_and_grad(loss_fn, sharded))
      compiled = step.lower(params, x, y, key=key).compile()
      row = {
        "method": name,
        "K": None if name == "backprop" else k,
        "mesh": f"{axis}={n}",
        "devices": n,
        "params": int(count),
        "bytes_per_step": parallel.communicated_bytes(compiled),
        "step_ms": 1e3
        * measure(lambda p, a, b, step=step: step(p, a, b, key=key), (params, x, y), flags.repeats),
        "backend": jax.default_backend(),
      }
      rows.append(row)
      print(json.dumps(row), flush=True)
      if flags.out:
        with open(flags.out, "a") as f:
          f.write(json.dumps(row) + "\n")
  print("\n| method | K | mesh | params | bytes communicated / step | step time (ms) |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['method']} | {r['K'] or '-'} | {r['mesh']} | {r['params']:,} | "
      f"{r['bytes_per_step']:,} | {r['step_ms']:.1f} |"
    )


if __name__ == "__main__":
  main()
