"""Memory of one training step against the eval forward: fixed point (w16a8, w8a8) and float32.

Issue 8.4: the fixed-point sign-m-SPSA + integer update step should hold no more than ~1.1x the
memory of the fixed-point eval forward of the same model (the method's promise: training at the
memory of inference), and less than the float32 backprop step.

For each model (MLP, SmallCNN, ResNet-18, ViT-tiny from `fgjax.models`, all kernels and biases
trained) it compiles, with the parameters and optimizer state donated:

- `forward float32`: the eval forward `apply(params, x)`;
- `backprop float32`: backprop + SGD;
- `SPSA float32`: sign-m-SPSA (K directions, Rademacher) + SGD;
- `forward <p>`: the fixed-point eval forward (integer kernels, scales bound as constants);
- `QZO-FF <p>`: sign-m-SPSA on the integer kernels and float biases + SGD inside
  `fgjax.integer_optimizer` (stochastic rounding) + `fgjax.apply_integer_updates`.

Memory is XLA's own estimate for the compiled step (`jit(f).lower(...).compile()
.memory_analysis()`), deterministic for a given jax version and backend:
`total = argument + output + temp - alias` (donated buffers counted once). Nothing is run, so the
figures do not depend on the load of the machine.

XLA:CPU's YNN fusions are switched off (`--xla_cpu_experimental_ynn_fusion_type=`, set before jax
is imported; `--ynn_fusions` keeps them): XLA's memory analysis does not count the buffers inside
a YNN fusion, and it folds most of an eval forward into one (SmallCNN's forward then reports only
its first convolution's output, 3.06 MiB, as temporaries), so the forward's figure would be an
undercount that the training step, split into several fusions by its perturbations, is compared
against. Accelerators have no YNN fusions.

Command (about 10 CPU-minutes on 2 shared cores, mostly ResNet-18's compilations):
  python scripts/bench_memory_fixed_point.py --output_dir /tmp/bench_memory_fixed_point
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="
if "--ynn_fusions" not in sys.argv:  # Before jax reads XLA_FLAGS.
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {YNN_OFF}".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import fgjax  # noqa: E402
from fgjax import models, quant  # noqa: E402

MODELS = {
  # name: (constructor kwargs, input shape without batch)
  "mlp": ({"hidden_sizes": (512, 512), "num_classes": 10}, (512,)),
  "small_cnn": ({"num_classes": 10}, (28, 28, 1)),
  "resnet18": ({"num_classes": 10}, (32, 32, 3)),
  "vit_tiny": ({"num_classes": 10}, (32, 32, 3)),
}
PRECISIONS = ("w16a8", "w8a8")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--output_dir", default="/tmp/bench_memory_fixed_point")
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--num_directions", type=int, default=4)
  parser.add_argument(
    "--ynn_fusions",
    action="store_true",
    help="keep XLA:CPU's YNN fusions (their inner buffers are not in XLA's memory analysis)",
  )
  return parser.parse_args(argv)


def memory(compiled) -> dict[str, int]:
  analysis = compiled.memory_analysis()
  arg = int(analysis.argument_size_in_bytes)
  out = int(analysis.output_size_in_bytes)
  temp = int(analysis.temp_size_in_bytes)
  alias = int(analysis.alias_size_in_bytes)
  return {"argument": arg, "output": out, "temp": temp, "alias": alias,
          "total": arg + out + temp - alias}  # fmt: skip


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def _shapes(tree):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), tree)


def _compile(fn, *args, donate=()):
  return jax.jit(fn, donate_argnums=donate).lower(*args).compile()


def float_steps(model, variables, x, y, num_directions):
  """Memory of the float32 forward, backprop + SGD and sign-m-SPSA + SGD steps."""
  params = variables["params"]
  frozen = {k: v for k, v in variables.items() if k != "params"}
  apply = quant.bind_frozen(model.apply, frozen)

  def loss(p, x, y):
    return cross_entropy(apply(p, x), y)

  out = {"forward float32": memory(_compile(apply, params, x))}
  estimators = {
    "backprop float32": fgjax.estimators.backprop(),
    "SPSA float32": fgjax.estimators.spsa(
      num_directions, 1e-3, sign=True, distribution="rademacher"
    ),
  }
  for name, estimator in estimators.items():
    opt = optax.chain(fgjax.forward_gradient(estimator), optax.sgd(1e-3))

    def step(p, state, x, y, opt=opt):
      updates, state = opt.update(p, state, p, value_fn=lambda q: loss(q, x, y))
      return optax.apply_updates(p, updates), state

    state = jax.eval_shape(opt.init, params)
    out[name] = memory(_compile(step, params, state, x, y, donate=(0, 1)))
  return out


def fixed_point_steps(model_cls, kwargs, float_variables, x, y, precision, num_directions):
  """Memory of the fixed-point eval forward and the QZO-FF step at `precision`."""
  config = quant.preset(precision)
  model = model_cls(**kwargs, quant=quant.integer_storage(config))
  like = jax.eval_shape(model.init, jax.random.key(0), x)
  fixed = quant.to_fixed_point(float_variables, config, like=like)
  apply = quant.bind_frozen(model.apply, fixed.frozen)
  scales = fixed.scales
  epsilon = 3.0 * max(float(jnp.max(s)) for s in scales.values())

  def loss(p, x, y):
    return cross_entropy(apply(p, x), y)

  out = {f"forward {precision}": memory(_compile(apply, fixed.params, x))}
  estimator = fgjax.estimators.spsa(
    num_directions, epsilon, sign=True, distribution="rademacher", scales=scales
  )
  opt = fgjax.integer_optimizer(
    optax.chain(fgjax.forward_gradient(estimator), optax.sgd(epsilon)),
    scales=scales,
    rounding="stochastic",
  )

  def step(p, state, x, y):
    updates, state = opt.update(p, state, p, value_fn=lambda q: loss(q, x, y))
    return fgjax.apply_integer_updates(p, updates), state

  state = jax.eval_shape(opt.init, fixed.params)
  out[f"QZO-FF {precision}"] = memory(_compile(step, fixed.params, state, x, y, donate=(0, 1)))
  return out


def bench_model(name, args):
  kwargs, shape = MODELS[name]
  model_cls = type(models.get_model(name, **kwargs))
  x = jnp.zeros((args.batch_size, *shape), jnp.float32)
  y = jnp.zeros((args.batch_size,), jnp.int32)
  model = model_cls(**kwargs)
  float_variables = jax.jit(model.init)(jax.random.key(0), x)
  rows = float_steps(model, float_variables, x, y, args.num_directions)
  for precision in PRECISIONS:
    rows.update(
      fixed_point_steps(model_cls, kwargs, float_variables, x, y, precision, args.num_directions)
    )
  for row, stats in rows.items():
    print(f"{name:10s} {row:18s} {stats}", file=sys.stderr, flush=True)
  return rows


def table(results, args, command) -> str:
  mib = lambda b: f"{b / 2**20:,.2f}"  # noqa: E731
  lines = [
    f"Batch {args.batch_size}, K = {args.num_directions} Rademacher directions (sign-m-SPSA), "
    "all kernels and biases trained, SGD; XLA compiled memory, MiB.",
    "",
    "| model | step | temp | total | total x its forward | vs float32 backprop |",
    "|---|---|---|---|---|---|",
  ]
  for name, rows in results.items():
    backprop = rows["backprop float32"]["total"]
    for row, stats in rows.items():
      if row.startswith("QZO-FF"):
        forward = rows["forward " + row.split()[1]]["total"]
      elif row.startswith(("SPSA", "backprop")):
        forward = rows["forward float32"]["total"]
      else:
        forward = stats["total"]
      lines.append(
        f"| {name} | {row} | {mib(stats['temp'])} | {mib(stats['total'])} | "
        f"{stats['total'] / forward:.2f} | {stats['total'] / backprop:.2f} |"
      )
  lines += [
    "",
    f"Command: `{command}`",
    f"jax {jax.__version__}, backend {jax.default_backend()}, {platform.machine()}, "
    f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}.",
  ]
  return "\n".join(lines) + "\n"


def main(argv=None):
  args = parse_args(argv)
  results = {name: bench_model(name, args) for name in args.models.split(",")}
  command = "python scripts/bench_memory_fixed_point.py " + " ".join(
    sys.argv[1:] if argv is None else argv
  )
  text = table(results, args, command.strip())
  os.makedirs(args.output_dir, exist_ok=True)
  with open(os.path.join(args.output_dir, "memory.json"), "w") as f:
    json.dump({"args": vars(args), "command": command, "results": results}, f, indent=2)
  with open(os.path.join(args.output_dir, "memory.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
