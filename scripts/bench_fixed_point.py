"""Memory and time per step: fixed-point SPSA (int16 / int8 weights) vs float SPSA and backprop.

One training step of an MLP (fgjax.models.MLP, all kernels trainable), jitted with the parameters
and optimizer state donated. Memory is XLA's own estimate for the compiled step
(`jax.jit(step).lower(...).compile().memory_analysis()`): `temp`, and
`total = argument + output + temp - alias` (donated buffers counted once). Time is the median of
`--repeats` calls after one warm-up.

Rows: backprop (float32, SGD), SPSA float32, SPSA w8a8 with float master weights (fake quant), and
QZO-FF (sign-m-SPSA on integer weights + `fgjax.integer_updates`) with w16a8 (int16 kernels) and
w8a8 (int8 kernels). Integer products run as exact int8 x int8 -> int32 contractions at every
fan-in (a 16-bit side as int8 planes, `fgjax.quant.integer_dot_general`). For the memory of
larger models against their eval forward see `scripts/bench_memory_fixed_point.py`.

Command (about 1 minute on 2 CPU cores):
  python scripts/bench_fixed_point.py --output_dir /tmp/bench_fixed_point
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fgjax
from fgjax import quant
from fgjax.models import MLP


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--output_dir", default="/tmp/bench_fixed_point")
  parser.add_argument("--input_dim", type=int, default=512)
  parser.add_argument("--hidden", default="512,512")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--num_directions", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=20)
  return parser.parse_args(argv)


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_case(name, args, float_variables, hidden):
  """Returns (params, optimizer, apply_fn, bits) for a row."""
  kind, _, precision = name.partition(" ")
  config = quant.preset(precision)
  if kind == "QZO-FF":
    fixed = quant.to_fixed_point(float_variables, config)
    model = MLP(hidden_sizes=hidden, num_classes=10, quant=quant.integer_storage(config))
    apply_fn = quant.bind_frozen(model.apply, fixed.frozen)
    params, scales = fixed.params, fixed.scales
    # Weight units: epsilon 3 of the coarsest grid steps (valid at every precision), lr the same.
    epsilon = 3.0 * max(float(jnp.max(s)) for s in scales.values())
    estimator = fgjax.estimators.spsa(
      args.num_directions, epsilon, sign=True, distribution="rademacher", scales=scales
    )
    chain = optax.chain(fgjax.forward_gradient(estimator), optax.sgd(epsilon))
    return params, fgjax.integer_optimizer(chain, scales=scales, rounding="nearest"), apply_fn
  model_quant = None if config is None else quant.master_weight_storage(config)
  model = MLP(hidden_sizes=hidden, num_classes=10, quant=model_quant)
  apply_fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
  params = float_variables["params"]
  mask = jax.tree.map(lambda leaf: leaf.ndim == 2, params)  # kernels, as for fixed point
  if kind == "backprop":
    estimator = fgjax.estimators.backprop(mask=mask)
  else:
    estimator = fgjax.estimators.spsa(
      args.num_directions, 1e-3, sign=True, distribution="rademacher", mask=mask
    )
  return params, optax.chain(fgjax.forward_gradient(estimator), optax.sgd(1e-3)), apply_fn


def memory(compiled) -> dict[str, int]:
  analysis = compiled.memory_analysis()
  arg = int(analysis.argument_size_in_bytes)
  out = int(analysis.output_size_in_bytes)
  temp = int(analysis.temp_size_in_bytes)
  alias = int(analysis.alias_size_in_bytes)
  return {"temp": temp, "total": arg + out + temp - alias, "argument": arg, "alias": alias}


def bench(name, args, float_variables, hidden, x, y):
  params, optimizer, apply_fn = make_case(name, args, float_variables, hidden)

  def step(params, state, x, y):
    updates, state = optimizer.update(
      params, state, params, value_fn=lambda p: cross_entropy(apply_fn(p, x), y)
    )
    value = state.inner[0].value if hasattr(state, "inner") else state[0].value
    return fgjax.apply_integer_updates(params, updates), state, value

  jitted = jax.jit(step, donate_argnums=(0, 1))
  state = optimizer.init(params)
  start = time.time()
  compiled = jitted.lower(params, state, x, y).compile()
  compile_s = time.time() - start
  stats = memory(compiled)
  copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731
  params, state = copy(params), copy(state)
  params, state, loss = compiled(params, state, x, y)
  jax.block_until_ready(loss)
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    params, state, loss = compiled(params, state, x, y)
    jax.block_until_ready((params, loss))
    times.append(time.perf_counter() - start)
  weight_bytes = sum(
    leaf.nbytes for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0] if leaf.ndim == 2
  )
  return {
    "row": name,
    "kernel_bytes": int(weight_bytes),
    **stats,
    "ms_per_step": 1e3 * float(np.median(times)),
    "compile_s": compile_s,
  }


def main(argv=None):
  args = parse_args(argv)
  hidden = tuple(int(h) for h in args.hidden.split(","))
  x = jax.random.uniform(jax.random.key(0), (args.batch_size, args.input_dim))
  y = jax.random.randint(jax.random.key(1), (args.batch_size,), 0, 10)
  float_variables = MLP(hidden_sizes=hidden, num_classes=10).init(jax.random.key(2), x[:1])
  rows = ["backprop float32", "SPSA float32", "SPSA w8a8", "QZO-FF w16a8", "QZO-FF w8a8"]
  results = []
  for name in rows:
    result = bench(name, args, float_variables, hidden, x, y)
    results.append(result)
    print(result, file=sys.stderr)
  command = "python scripts/bench_fixed_point.py " + " ".join(
    sys.argv[1:] if argv is None else argv
  )
  kib = lambda b: f"{b / 1024:,.0f}"  # noqa: E731
  lines = [
    f"MLP {args.input_dim}-{'-'.join(map(str, hidden))}-10, batch {args.batch_size}, "
    f"K = {args.num_directions} directions (SPSA rows), all kernels trained; KiB.",
    "",
    "| step | kernel storage | temp | total (arg + out + temp − alias) | ms / step |",
    "|---|---|---|---|---|",
  ]
  for r in results:
    lines.append(
      f"| {r['row']} | {kib(r['kernel_bytes'])} | {kib(r['temp'])} | {kib(r['total'])}"
      f" | {r['ms_per_step']:.2f} |"
    )
  lines += [
    "",
    f"Command: `{command.strip()}`",
    f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared), jax {jax.__version__}, "
    f"backend {jax.default_backend()}.",
  ]
  table = "\n".join(lines) + "\n"
  os.makedirs(args.output_dir, exist_ok=True)
  with open(os.path.join(args.output_dir, "bench.json"), "w") as f:
    json.dump({"args": vars(args), "command": command, "results": results}, f, indent=2)
  with open(os.path.join(args.output_dir, "bench.md"), "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  main()
