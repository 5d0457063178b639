"""Fixed-point last-mile adaptation study: w16a8 vs w8a8, three rounding modes (QZO-FF).

Reproduces the mechanism behind Chen et al., "Stepping Forward on the Last Mile" (NeurIPS 2024):
with integer weights updated by sign-m-SPSA, 16-bit weights (w16a8) converge while 8-bit weights
(w8a8) stall because the update is below half a quantization step and rounds to zero; and tests
two remedies beyond the paper: stochastic rounding and error feedback.

Setup: an MLP (fgjax.models.MLP, fgjax.quant layers) pretrained in float with backprop on upright
scikit-learn digits, quantized (`fgjax.quant.to_fixed_point`), then adapted on digits rotated by
`--rotation` degrees (a disjoint split), training only the kernels of the last layers. Learning rate
and epsilon are relative to each output channel's max|w|, so that every precision takes the same
step in weight space: `lr_steps = lr_rel * (2^{b-1} - 1)` quantization steps (w16: ~115 steps, w8:
~0.45 step at the default), `epsilon_steps = max(1, round(eps_rel * (2^{b-1} - 1)))`.

Command (about 4 minutes on 2 shared CPU cores):
  python scripts/fixed_point_study.py --output_dir /tmp/fixed_point_study

Writes `results.json`, `results.csv` and `table.md` to `--output_dir` and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fgjax
from fgjax import data as fdata
from fgjax import quant
from fgjax.models import MLP


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--output_dir", default="/tmp/fixed_point_study")
  parser.add_argument("--hidden", default="128,64", help="hidden sizes, comma separated")
  parser.add_argument("--trainable", default="dense_1,head", help="layers whose kernels adapt")
  parser.add_argument("--rotation", type=float, default=30.0, help="domain shift, degrees")
  parser.add_argument("--pretrain_steps", type=int, default=800)
  parser.add_argument("--steps", type=int, default=800, help="adaptation steps")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--num_directions", type=int, default=8)
  parser.add_argument("--lr_rel", type=float, default=3.5e-3, help="lr / max|w| of the channel")
  parser.add_argument("--eps_rel", type=float, default=1e-3, help="epsilon / max|w|")
  parser.add_argument("--backprop_lr", type=float, default=0.1)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument(
    "--rows", default="all", help="comma-separated row names (see ROWS), or 'all'"
  )
  return parser.parse_args(argv)


# (name, kind, precision preset, rounding)
ROWS = [
  ("backprop float32", "backprop", "float32", None),
  ("SPSA float32", "float_spsa", "float32", None),
  ("SPSA w16a8 master", "master", "w16a8", None),
  ("SPSA w8a8 master", "master", "w8a8", None),
  ("QZO-FF w16a8 nearest", "fixed", "w16a8", "nearest"),
  ("QZO-FF w16a8 stochastic", "fixed", "w16a8", "stochastic"),
  ("QZO-FF w16a8 error_feedback", "fixed", "w16a8", "error_feedback"),
  ("QZO-FF w8a8 nearest", "fixed", "w8a8", "nearest"),
  ("QZO-FF w8a8 stochastic", "fixed", "w8a8", "stochastic"),
  ("QZO-FF w8a8 error_feedback", "fixed", "w8a8", "error_feedback"),
]


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def load_data(rotation: float):
  """Upright digits for pretraining; a disjoint part rotated by `rotation` degrees to adapt."""
  dataset = fdata.digits()
  pretrain, adapt_train, adapt_test = fdata.split(dataset, (1000, 400, 397), seed=0)
  shift = lambda d: fdata.rotate(d.x, rotation)  # noqa: E731
  return (
    (jnp.asarray(pretrain.x), jnp.asarray(pretrain.y)),
    (jnp.asarray(shift(adapt_train)), jnp.asarray(adapt_train.y)),
    (jnp.asarray(shift(adapt_test)), jnp.asarray(adapt_test.y)),
  )


def pretrain(model, x, y, steps: int, batch_size: int):
  variables = model.init(jax.random.key(0), x[:1])
  opt = optax.adam(3e-3)

  @jax.jit
  def step(params, state, index):
    batch = jax.random.randint(
      jax.random.fold_in(jax.random.key(1), index), (batch_size,), 0, len(y)
    )
    grads = jax.grad(lambda p: cross_entropy(model.apply({"params": p}, x[batch]), y[batch]))(
      params
    )
    updates, state = opt.update(grads, state)
    return optax.apply_updates(params, updates), state

  params, state = variables["params"], opt.init(variables["params"])
  for index in range(steps):
    params, state = step(params, state, index)
  return {"params": params}


def accuracy(apply_fn, params, x, y) -> float:
  return float(jnp.mean(jnp.argmax(apply_fn(params, x), -1) == y))


def trainable_mask(params, layers):
  """True at the kernels of `layers` (the float biases and the other layers stay frozen)."""
  return {
    name: {leaf: name in layers and leaf == "kernel" for leaf in sub}
    for name, sub in params.items()
  }


def mean_channel_absmax(variables, layers) -> float:
  kernels = [variables["params"][name]["kernel"] for name in layers]
  return float(np.mean(np.concatenate([np.max(np.abs(k), axis=0) for k in kernels])))


def build_row(kind, precision, rounding, args, float_variables, hidden, layers):
  """Returns (apply_fn(params, x), params0, optimizer, mask, settings dict)."""
  config = quant.preset(precision)
  settings = {}
  if kind == "fixed":
    fixed = quant.to_fixed_point(float_variables, config)
    model = MLP(hidden_sizes=hidden, num_classes=10, quant=quant.integer_storage(config))
    apply_fn = quant.bind_frozen(model.apply, fixed.frozen)
    params = fixed.params
    top = quant.max_int(config.weight_bits)
    lr = args.lr_rel * top
    epsilon = float(max(1, round(args.eps_rel * top)))
    settings = {"lr_steps": lr, "epsilon_steps": epsilon}
  else:
    model_quant = None if config is None else quant.master_weight_storage(config)
    model = MLP(hidden_sizes=hidden, num_classes=10, quant=model_quant)
    apply_fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    params = float_variables["params"]
    scale = mean_channel_absmax(float_variables, layers)
    lr = args.lr_rel * scale
    epsilon = args.eps_rel * scale
    settings = {"lr": lr, "epsilon": epsilon}
  mask = trainable_mask(params, layers)
  if kind == "backprop":
    estimator = fgjax.estimators.backprop(mask=mask)
    links = [optax.sgd(args.backprop_lr)]
    settings = {"lr": args.backprop_lr}
  else:
    estimator = fgjax.estimators.spsa(
      args.num_directions, epsilon, sign=True, distribution="rademacher", mask=mask
    )
    links = [optax.sgd(lr)]
  if kind == "fixed":
    links.append(fgjax.integer_updates(rounding, mask=mask, bits=config.weight_bits))
  optimizer = optax.chain(fgjax.forward_gradient(estimator), *links)
  return apply_fn, params, optimizer, mask, settings


def make_adapt(apply_fn, optimizer, mask, x, y, bits):
  def step(carry, batch):
    params, state = carry
    updates, state = optimizer.update(
      params, state, params, value_fn=lambda p: cross_entropy(apply_fn(p, x[batch]), y[batch])
    )
    new = fgjax.apply_integer_updates(params, updates, bits)
    metrics = {
      "changed_fraction": fgjax.changed_fraction(params, new, mask),
      "zero_difference_fraction": state[0].metrics["zero_difference_fraction"],
      "loss": state[0].value,
    }
    return (new, state), metrics

  @jax.jit
  def adapt(params, state, batches):
    return jax.lax.scan(step, (params, state), batches)

  return adapt


def reseed(state, seed: int):
  """The optimizer state with the estimator's (and the rounding's) key drawn from `seed`."""
  out = []
  for index, link in enumerate(state):
    if hasattr(link, "key"):
      link = link._replace(key=jax.random.fold_in(jax.random.key(seed), index))
    out.append(link)
  return tuple(out)


def run(args) -> list[dict]:
  hidden = tuple(int(h) for h in args.hidden.split(","))
  layers = tuple(args.trainable.split(","))
  (px, py), (ax, ay), (tx, ty) = load_data(args.rotation)
  float_model = MLP(hidden_sizes=hidden, num_classes=10)
  start = time.time()
  float_variables = pretrain(float_model, px, py, args.pretrain_steps, args.batch_size)
  print(f"pretrained in {time.time() - start:.1f}s", file=sys.stderr)
  rows = ROWS if args.rows == "all" else [r for r in ROWS if r[0] in args.rows.split(",")]
  results = []
  for name, kind, precision, rounding in rows:
    start = time.time()
    apply_fn, params0, optimizer, mask, settings = build_row(
      kind, precision, rounding, args, float_variables, hidden, layers
    )
    bits = quant.preset(precision).weight_bits if kind == "fixed" else None
    adapt = make_adapt(apply_fn, optimizer, mask, ax, ay, bits)
    evaluate = jax.jit(apply_fn)
    zero_shot = accuracy(evaluate, params0, tx, ty)
    runs = []
    for seed in range(args.seeds):
      batches = np.random.default_rng(seed).integers(0, len(ay), (args.steps, args.batch_size))
      state = reseed(optimizer.init(params0), seed)
      (params, _), metrics = adapt(params0, state, jnp.asarray(batches))
      changed = np.asarray(metrics["changed_fraction"])
      runs.append(
        {
          "accuracy": accuracy(evaluate, params, tx, ty),
          "zero_update_rate": float(1.0 - changed.mean()),
          "steps_without_change": float(np.mean(changed == 0.0)),
          "zero_difference_fraction": float(np.mean(metrics["zero_difference_fraction"])),
          "final_train_loss": float(np.mean(np.asarray(metrics["loss"])[-50:])),
        }
      )
    summary = {
      "row": name,
      "method": kind,
      "precision": precision,
      "rounding": rounding or "-",
      "zero_shot_accuracy": zero_shot,
      **settings,
    }
    for key in runs[0]:
      values = np.array([r[key] for r in runs])
      summary[key] = float(values.mean())
      summary[key + "_std"] = float(values.std())
    summary["seconds"] = time.time() - start
    results.append(summary)
    print(
      f"{name:30s} zero-shot {zero_shot:.3f} adapted {summary['accuracy']:.3f}"
      f" +- {summary['accuracy_std']:.3f} zero-update {summary['zero_update_rate']:.3f}"
      f" ({summary['seconds']:.0f}s)",
      file=sys.stderr,
    )
  return results


def markdown_table(results: list[dict], command: str) -> str:
  lines = [
    "| row | zero-shot acc | adapted acc (mean ± std) | zero-update rate | steps w/o change "
    "| zero-diff fraction | step size |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in results:
    if "lr_steps" in r:
      step = f"lr {r['lr_steps']:.3g} steps, ε {r['epsilon_steps']:.0f} steps"
    elif r["method"] == "backprop":
      step = f"lr {r['lr']:.3g}"
    else:
      step = f"lr {r['lr']:.3g}, ε {r['epsilon']:.3g}"
    lines.append(
      f"| {r['row']} | {r['zero_shot_accuracy']:.3f}"
      f" | {r['accuracy']:.3f} ± {r['accuracy_std']:.3f}"
      f" | {r['zero_update_rate']:.3f} | {r['steps_without_change']:.3f}"
      f" | {r['zero_difference_fraction']:.3f} | {step} |"
    )
  lines.append("")
  lines.append(f"Command: `{command}`")
  lines.append(f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__}.")
  return "\n".join(lines) + "\n"


def main(argv=None):
  args = parse_args(argv)
  start = time.time()
  results = run(args)
  os.makedirs(args.output_dir, exist_ok=True)
  command = "python scripts/fixed_point_study.py " + " ".join(
    sys.argv[1:] if argv is None else argv
  )
  with open(os.path.join(args.output_dir, "results.json"), "w") as f:
    json.dump({"args": vars(args), "command": command, "results": results}, f, indent=2)
  with open(os.path.join(args.output_dir, "results.csv"), "w", newline="") as f:
    keys = sorted({k for r in results for k in r})
    writer = csv.DictWriter(f, fieldnames=keys)
    writer.writeheader()
    writer.writerows(results)
  table = markdown_table(results, command.strip())
  table += f"Total time: {math.ceil(time.time() - start)} s.\n"
  with open(os.path.join(args.output_dir, "table.md"), "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  main()
