"""Time and memory of one training step per estimator, as ratios to the eval forward (same run).

For each model and batch size: the eval forward, a backprop + SGD step, jvp K in {1, 4, 16}
(vmapped and chunked) and spsa K in {1, 4, 16} (vmapped and sequential), each as an
`optax.chain(fgjax.forward_gradient(est), optax.sgd)` step jitted with parameters and optimizer
state donated, plus the naive JAX versions a user would write (whole perturbation trees), as in
../shared/anchors/naive_jax_bench.py. Memory is XLA's compiled memory analysis: temp, and
total = arguments + outputs + temporaries - aliased (donated) bytes.

Usage:
  python scripts/bench_estimators.py --out results/bench_cpu.jsonl            # MLP and CNN
  python scripts/bench_estimators.py --suite anchors --anchors ../shared/anchors --batch 64
The second runs fgjax on the anchors' own ResNet-18 and ViT-tiny (imported from the anchor file).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import platform
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import fgjax

MiB = 2**20


class DeepMLP(nn.Module):
  """16 hidden layers of 512 (the issue's naive probe)."""

  depth: int = 16
  width: int = 512

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    for _ in range(self.depth):
      x = nn.relu(nn.Dense(self.width)(x))
    return nn.Dense(10)(x)


class SmallCNN(nn.Module):
  """Four 3x3 convolutions (32-32-64-64, two strided) and a dense head, on 32x32x3."""

  @nn.compact
  def __call__(self, x):
    for features, stride in ((32, 1), (32, 2), (64, 1), (64, 2)):
      x = nn.relu(nn.Conv(features, (3, 3), strides=stride)(x))
    return nn.Dense(10)(x.mean(axis=(1, 2)))


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  total = (
    m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  )
  return {
    "temp_MiB": m.temp_size_in_bytes / MiB,
    "argument_MiB": m.argument_size_in_bytes / MiB,
    "output_MiB": m.output_size_in_bytes / MiB,
    "alias_MiB": m.alias_size_in_bytes / MiB,
    "total_MiB": total / MiB,
  }


def _time(compiled, args, carry: bool, repeats: int) -> float:
  def run(args):
    out = compiled(*args)
    return (out + args[len(out) :]) if carry else args, out

  args, out = run(args)  # Warm-up.
  jax.block_until_ready(out)
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    args, out = run(args)
    jax.block_until_ready(out)
    samples.append(time.perf_counter() - start)
  return statistics.median(samples)


def _naive_noise(key, params):
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten(
    [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
  )


def _steps(loss_on, params, batch, learning_rate=1e-3):
  """name -> (function, arguments, carry) for every row of the table.

  The batch is an argument (not a constant folded into the program), never donated; carried steps
  return their first outputs as the next call's first arguments.
  """
  steps = {"forward": (jax.jit(loss_on), (params, *batch), False)}

  def optax_step(estimator):
    opt = optax.chain(fgjax.forward_gradient(estimator), optax.sgd(learning_rate))

    def step(params, state, x, y):
      updates, state = opt.update(params, state, params, value_fn=lambda p: loss_on(p, x, y))
      return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1)), (params, opt.init(params), *batch), True

  steps["backprop"] = optax_step(fgjax.estimators.backprop())
  for k in (1, 4, 16):
    steps[f"jvp_K{k}_vmap"] = optax_step(fgjax.estimators.jvp(k, chunk_size=None))
    if k > 1:
      steps[f"jvp_K{k}_chunk1"] = optax_step(fgjax.estimators.jvp(k, chunk_size=1))
  for k in (1, 4, 16):
    steps[f"spsa_K{k}_vmap"] = optax_step(fgjax.estimators.spsa(k, chunk_size=None))
    if k > 1:
      steps[f"spsa_K{k}_seq"] = optax_step(fgjax.estimators.spsa(k, chunk_size=1))

  def naive_spsa(params, key, x, y, eps=1e-3):
    loss = lambda p: loss_on(p, x, y)
    z = _naive_noise(key, params)
    plus = loss(jax.tree.map(lambda a, b: a + eps * b, params, z))
    minus = loss(jax.tree.map(lambda a, b: a - eps * b, params, z))
    d = (plus - minus) / (2 * eps)
    return jax.tree.map(lambda a, b: a - learning_rate * d * b, params, z), key

  def naive_jvp(params, key, x, y):
    loss = lambda p: loss_on(p, x, y)
    z = _naive_noise(key, params)
    _, d = jax.jvp(loss, (params,), (z,))
    return jax.tree.map(lambda a, b: a - learning_rate * d * b, params, z), key

  key = jax.random.key(0)
  steps["naive_spsa_K1"] = (jax.jit(naive_spsa, donate_argnums=(0,)), (params, key, *batch), True)
  steps["naive_jvp_K1"] = (jax.jit(naive_jvp, donate_argnums=(0,)), (params, key, *batch), True)
  return steps


def bench(name, model, x, y, repeats, only=None):
  variables = model.init(jax.random.key(1), x)
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}

  def loss_on(p, x, y):
    logits = model.apply({"params": p, **rest}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  rows, base = [], None
  for step_name, (fn, args, carry) in _steps(loss_on, params, (x, y)).items():
    if only and step_name != "forward" and not any(o in step_name for o in only):
      continue
    args = jax.tree.map(jnp.copy, args)  # Donation consumes buffers: each step gets its own.
    compiled = fn.lower(*args).compile()
    row = {"model": name, "batch": int(x.shape[0]), "step": step_name, **_memory(compiled)}
    # --repeats 0: memory only (XLA's analysis needs no run), e.g. for big models on a CPU.
    row["time_ms"] = 1e3 * _time(compiled, args, carry, repeats) if repeats else float("nan")
    if base is None:
      base = row
    row["time_x"] = row["time_ms"] / base["time_ms"]
    row["temp_x"] = row["temp_MiB"] / max(base["temp_MiB"], 1e-9)
    row["total_x"] = row["total_MiB"] / base["total_MiB"]
    row["params_M"] = sum(p.size for p in jax.tree.leaves(params)) / 1e6
    rows.append(row)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
    sys.stdout.flush()
  return rows


def _load_anchor_models(folder: str):
  path = pathlib.Path(folder) / "naive_jax_bench.py"
  if not path.exists():
    raise SystemExit(f"--anchors: {path} does not exist")
  spec = importlib.util.spec_from_file_location("naive_jax_bench", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return {"ResNet18": module.ResNet18(), "ViTTiny": module.ViTTiny()}


def markdown(rows) -> str:
  """The rows as a markdown table (the one in BENCHMARKS.md)."""
  lines = [
    "| model | batch | step | time ms | time x fwd | temp MiB | total MiB | total x fwd |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['model']} | {r['batch']} | {r['step']} | {r['time_ms']:.1f} | {r['time_x']:.2f} | "
      f"{r['temp_MiB']:.2f} | {r['total_MiB']:.2f} | {r['total_x']:.2f} |"
    )
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--suite", choices=("small", "anchors"), default="small")
  parser.add_argument("--anchors", default="../shared/anchors")
  parser.add_argument("--batch", type=int, nargs="+", default=None)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--only", nargs="*", default=None, help="substrings of step names to run")
  parser.add_argument("--out", default=None, help="append JSON lines here")
  parser.add_argument(
    "--table", default=None, help="print a markdown table of this JSON-lines file"
  )
  args = parser.parse_args()
  if args.table:
    print(markdown([json.loads(line) for line in open(args.table)]))
    return
  print(
    json.dumps(
      {
        "devices": [str(d) for d in jax.devices()],
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "machine": platform.platform(),
        "cpus": __import__("os").cpu_count(),
      }
    )
  )
  rows = []
  key = jax.random.key(0)
  if args.suite == "small":
    for batch in args.batch or (256, 1024):
      x = jax.random.normal(key, (batch, 512))
      rows += bench(
        "DeepMLP16x512", DeepMLP(), x, jnp.zeros((batch,), jnp.int32), args.repeats, args.only
      )
    for batch in args.batch or (32, 128):
      x = jax.random.normal(key, (batch, 32, 32, 3))
      rows += bench(
        "SmallCNN", SmallCNN(), x, jnp.zeros((batch,), jnp.int32), args.repeats, args.only
      )
  else:
    for name, model in _load_anchor_models(args.anchors).items():
      for batch in args.batch or (64,):
        x = jax.random.normal(key, (batch, 32, 32, 3))
        rows += bench(name, model, x, jnp.zeros((batch,), jnp.int32), args.repeats, args.only)
  print(markdown(rows))
  if args.out:
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
