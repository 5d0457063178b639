"""Time, memory and compile time of one training step per estimator, as ratios to the eval forward.

For each model and batch size, in one process: the eval forward, a backprop + SGD step, SPSA and
jvp with K directions, each as an `optax.chain(fgjax.forward_gradient(est), optax.sgd)` step jitted
with parameters and optimizer state donated, and the steps a JAX user writes without fgjax (whole
perturbation trees: `naive_spsa_K1`, `naive_jvp_K1`, as in ../shared/anchors/naive_jax_bench.py).

- time: every step is compiled first, then timed in interleaved rounds (forward, step 1, step 2,
  ..., forward, step 1, ...); `time_x` is the median over rounds of step / forward of the same
  round, so load that changes during the run hits both alike.
- memory: XLA's compiled memory analysis; temp, and total = arguments + outputs + temporaries -
  aliased (donated) bytes; `total_x` = total / the forward's total.
- compile: `lower_s` (trace + lowering to StableHLO) and `compile_s` (XLA), and `compile_x`, the
  sum as a multiple of the backprop step's.

Models: `mlp` (16 hidden layers of 512), `cnn` (four 3x3 convolutions), and the anchors' own
`resnet18` and `vit` (imported from --anchors/naive_jax_bench.py), 32x32x3 inputs.

Usage (writes bench.md, bench.csv and bench.jsonl in --output_dir):
  python scripts/bench_estimators.py --quick --output_dir /tmp/bench_quick     # minutes
  python scripts/bench_estimators.py --output_dir results/bench_cpu            # the full table
  python scripts/bench_estimators.py --models resnet18 vit --batch 64 --repeats 0 \\
    --output_dir results/bench_memory                                         # memory + compile
`--variants vmap seq` adds rows with all K directions vmapped and one at a time (`auto` is the
estimators' default, `chunk_size="auto"`).
`--torch_python PY` runs the anchors' PyTorch MeZO (mezo_torch_bench.py; PY has torch,
torchvision and timm) on the same models and batches after fgjax's rows, in the same run (time
only on CPU).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import fgjax

MiB = 2**20
COLUMNS = (
  "model",
  "batch",
  "step",
  "time_ms",
  "time_x",
  "temp_MiB",
  "total_MiB",
  "total_x",
  "lower_s",
  "compile_s",
  "compile_x",
  "params_M",
)


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


def _models(names, anchors: str):
  out = {}
  anchor_module = None
  for name in names:
    if name == "mlp":
      out["DeepMLP16x512"] = (DeepMLP(), (512,))
    elif name == "cnn":
      out["SmallCNN"] = (SmallCNN(), (32, 32, 3))
    elif name in ("resnet18", "vit"):
      if anchor_module is None:
        anchor_module = _load_anchor_module(anchors)
      if name == "resnet18":
        out["ResNet18"] = (anchor_module.ResNet18(), (32, 32, 3))
      else:
        out["ViTTiny"] = (anchor_module.ViTTiny(), (32, 32, 3))
    else:
      raise SystemExit(f"--models: unknown {name!r}")
  return out


def _load_anchor_module(folder: str):
  path = pathlib.Path(folder) / "naive_jax_bench.py"
  if not path.exists():
    raise SystemExit(f"--anchors: {path} does not exist")
  spec = importlib.util.spec_from_file_location("naive_jax_bench", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  total = (
    m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  )
  return {"temp_MiB": m.temp_size_in_bytes / MiB, "total_MiB": total / MiB}


def _naive_noise(key, params):
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten(
    [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
  )


def _chunk(variant):
  return {"auto": "auto", "vmap": None, "seq": 1}[variant]


def _steps(loss_on, params, batch, ks, variants, learning_rate=1e-3):
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
  for name, factory in (("spsa", fgjax.estimators.spsa), ("jvp", fgjax.estimators.jvp)):
    for k in ks:
      for variant in variants if k > 1 else ("auto",):
        suffix = "" if variant == "auto" else f"_{variant}"
        steps[f"{name}_K{k}{suffix}"] = optax_step(factory(k, chunk_size=_chunk(variant)))

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


class _Runner:
  """A compiled step and its (donated, carried) arguments."""

  def __init__(self, compiled, args, carry):
    self.compiled, self.args, self.carry = compiled, args, carry

  def __call__(self) -> float:
    start = time.perf_counter()
    out = self.compiled(*self.args)
    jax.block_until_ready(out)
    elapsed = time.perf_counter() - start
    if self.carry:
      self.args = tuple(out) + tuple(self.args[len(out) :])
    return elapsed


def bench(name, model, x, y, ks, variants, repeats, only=None, log=print):
  variables = model.init(jax.random.key(1), x)
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}

  def loss_on(p, x, y):
    logits = model.apply({"params": p, **rest}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  params_m = sum(p.size for p in jax.tree.leaves(params)) / 1e6
  rows, runners = {}, {}
  for step_name, (fn, args, carry) in _steps(loss_on, params, (x, y), ks, variants).items():
    if only and step_name != "forward" and not any(o in step_name for o in only):
      continue
    args = jax.tree.map(jnp.copy, args)  # Donation consumes buffers: each step gets its own.
    start = time.perf_counter()
    lowered = fn.lower(*args)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    row = {"model": name, "batch": int(x.shape[0]), "step": step_name, **_memory(compiled)}
    row.update(lower_s=lower_s, compile_s=compile_s, params_M=params_m)
    rows[step_name] = row
    runners[step_name] = _Runner(compiled, args, carry)
    log(f"compiled {name} b{x.shape[0]} {step_name}: {lower_s:.1f} s + {compile_s:.1f} s")

  # Interleaved rounds: one warm-up call each, then `repeats` rounds of every step in turn.
  samples = {step: [] for step in runners}
  for round_index in range(repeats + 1 if repeats else 0):
    for step, runner in runners.items():
      elapsed = runner()
      if round_index:
        samples[step].append(elapsed)
  for runner in runners.values():
    del runner.args
  base = rows["forward"]
  reference = rows.get("backprop", base)
  for step, row in rows.items():
    if repeats:
      row["time_ms"] = 1e3 * statistics.median(samples[step])
      row["time_x"] = statistics.median(
        s / f for s, f in zip(samples[step], samples["forward"], strict=True)
      )
    else:  # --repeats 0: memory and compile time only.
      row["time_ms"] = row["time_x"] = float("nan")
    row["total_x"] = row["total_MiB"] / base["total_MiB"]
    row["compile_x"] = (row["lower_s"] + row["compile_s"]) / (
      reference["lower_s"] + reference["compile_s"]
    )
    log(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
  return list(rows.values())


def markdown(rows) -> str:
  """The rows as a markdown table (the one in BENCHMARKS.md)."""
  lines = [
    "| model | batch | step | time ms | time x fwd | temp MiB | total MiB | total x fwd | "
    "compile s | compile x bp |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]

  def fmt(value, digits):  # nan (not measured: PyTorch's memory on CPU, its compile) as a dash
    return "-" if value != value else f"{value:.{digits}f}"

  for r in rows:
    lines.append(
      f"| {r['model']} | {r['batch']} | {r['step']} | {fmt(r['time_ms'], 1)} | "
      f"{fmt(r['time_x'], 2)} | {fmt(r['temp_MiB'], 2)} | {fmt(r['total_MiB'], 2)} | "
      f"{fmt(r['total_x'], 2)} | {fmt(r['lower_s'] + r['compile_s'], 1)} | "
      f"{fmt(r['compile_x'], 2)} |"
    )
  return "\n".join(lines)


def write_tables(rows, output_dir: pathlib.Path, header: dict) -> None:
  output_dir.mkdir(parents=True, exist_ok=True)
  with open(output_dir / "bench.jsonl", "w") as f:
    f.write(json.dumps(header) + "\n")
    for row in rows:
      f.write(json.dumps(row) + "\n")
  with open(output_dir / "bench.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  command = "python " + " ".join(sys.argv)
  (output_dir / "bench.md").write_text(
    f"Command: `{command}`\n\nMachine: {header['machine']}, {header['cpus']} CPUs, "
    f"backend {header['backend']} ({', '.join(header['devices'])}), jax {header['jax']}.\n\n"
    + markdown(rows)
    + "\n"
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="mlp and cnn, batch 64, K 1 and 4")
  parser.add_argument("--models", nargs="+", default=None, help="mlp cnn resnet18 vit")
  parser.add_argument("--batch", type=int, nargs="+", default=None)
  parser.add_argument("--ks", type=int, nargs="+", default=None, help="numbers of directions")
  parser.add_argument("--variants", nargs="+", default=["auto"], choices=("auto", "vmap", "seq"))
  parser.add_argument("--repeats", type=int, default=None, help="timed rounds; 0: no timing")
  parser.add_argument("--only", nargs="*", default=None, help="substrings of step names to run")
  parser.add_argument("--anchors", default=os.path.join("..", "shared", "anchors"))
  parser.add_argument(
    "--torch_python",
    default=None,
    help="a Python with torch, torchvision and timm: runs the anchors' PyTorch MeZO beside fgjax",
  )
  parser.add_argument("--output_dir", default="bench_estimators")
  args = parser.parse_args()
  models = args.models or (["mlp", "cnn"] if args.quick else ["mlp", "cnn", "resnet18", "vit"])
  batches = args.batch or ([64] if args.quick else [64, 256])
  ks = args.ks or ([1, 4] if args.quick else [1, 4, 16])
  repeats = args.repeats if args.repeats is not None else (3 if args.quick else 5)
  header = {
    "devices": [str(d) for d in jax.devices()],
    "backend": jax.default_backend(),
    "jax": jax.__version__,
    "machine": platform.platform(),
    "cpus": os.cpu_count(),
  }
  print(json.dumps(header), flush=True)
  output_dir = pathlib.Path(args.output_dir)

  def log(line):
    print(line, flush=True)

  rows = []
  for name, (model, shape) in _models(models, args.anchors).items():
    for batch in batches:
      x = jax.random.normal(jax.random.key(0), (batch, *shape))
      y = jnp.zeros((batch,), jnp.int32)
      rows += bench(name, model, x, y, ks, args.variants, repeats, args.only, log)
      write_tables(rows, output_dir, header)  # After each model: a timeout keeps what was done.
  if args.torch_python:
    rows += torch_mezo(args.torch_python, args.anchors, models, batches, repeats, log)
    write_tables(rows, output_dir, header)
  print(markdown(rows))


TORCH_MODELS = {"resnet18": ("resnet18", "ResNet18"), "vit": ("vit_tiny", "ViTTiny")}


def torch_mezo(python, anchors, models, batches, repeats, log) -> list[dict]:
  """The anchors' PyTorch MeZO and backprop steps, as rows (time only: no memory on CPU)."""
  names = [TORCH_MODELS[m] for m in models if m in TORCH_MODELS]
  if not names:
    return []
  script = os.path.join(anchors, "mezo_torch_bench.py")
  command = [python, script, "--device", "cpu", "--batch", *map(str, batches)]
  command += ["--models", *(n for n, _ in names), "--steps", str(max(repeats, 1))]
  log("running " + " ".join(command))
  done = subprocess.run(command, capture_output=True, text=True, check=False)
  if done.returncode:
    last = (done.stderr.strip().splitlines() or [""])[-1]
    log(f"PyTorch MeZO failed ({done.returncode}): {last}")
    return []
  label = dict(names)
  rows = []
  for line in done.stdout.splitlines():
    if not line.startswith("{"):
      continue
    r = json.loads(line)
    for step, time_x in (
      ("forward", 1.0),
      ("mezo", r["mezo_time_x"]),
      ("backprop", r["bp_time_x"]),
    ):
      # Not measured (memory on CPU, compile in eager PyTorch): nan, a dash in the table.
      rows.append(
        dict.fromkeys(COLUMNS, float("nan"))
        | {
          "model": f"{label[r['model']]} (PyTorch)",
          "batch": r["batch"],
          "step": f"torch_{step}",
          "time_ms": r["forward_ms"] * time_x,
          "time_x": time_x,
          "params_M": r["params_M"],
        }
      )
      log(json.dumps(rows[-1]))
  return rows


if __name__ == "__main__":
  main()
