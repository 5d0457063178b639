"""LPIRC-style efficiency report: accuracy against operations, bytes, memory and batch-1 latency.

Rows (digits, 8x8 images, 10 classes; accuracy = mean over `--seeds`, on 360 held-out digits):
- MLP 64-128-128-10 trained by backprop (SGD, 600 steps) and by sign-free SPSA (K=8 central,
  Adam, 1500 steps), evaluated in float32 and in w8a8 (AQT fake-quant of the float weights: int8
  per-channel weights, int8 per-tensor activations, int32 accumulation);
- MobileNetV2 (width 0.35, CIFAR strides) plain and quantization-friendly (ReLU, no BN/activation
  after the depthwise convs), trained by backprop (600 steps; depthwise convs computed by shifts,
  `depthwise_shifts=True`, ~10x faster on CPU), evaluated in float32, w8a8, and w8a8 with the
  depthwise convs at w16a16 (the grouped convs of the plain model).
Each example is evaluated alone (batch 1), so per-tensor activation scales are per image, as on a
device. Step columns: one training step (batch 64) of the row's method at the row's precision:
MACs and integer ops from the jaxpr, bytes moved (XLA cost analysis) and peak memory (XLA memory
analysis); latency: median of 50 batch-1 forwards on this machine (jit, CPU).

  PYTHONPATH=. python scripts/efficiency_report.py --seeds 0 1 2 --out /tmp/efficiency
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fgjax
from fgjax import data as fdata
from fgjax import efficiency

BATCH = 64


def digits():
  train, test = fdata.split(fdata.digits(), (1437, 360), seed=0)
  return (jnp.asarray(train.x), jnp.asarray(train.y)), (jnp.asarray(test.x), jnp.asarray(test.y))


def mlp(quant=None):
  return fgjax.models.MLP(hidden_sizes=(128, 128), num_classes=10, quant=quant)


def mobilenet(quant=None, quant_friendly=False, depthwise_quant="same"):
  return fgjax.models.MobileNetV2(
    width_multiplier=0.35,
    num_classes=10,
    quant=quant,
    quant_friendly=quant_friendly,
    depthwise_quant=depthwise_quant,
  )


def _xent(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_trainer(model, method, train_data, steps):
  """`trainer(seed) -> variables`: one compiled training run, reused for every seed."""
  num_train = len(train_data[1])
  has_bn = "batch_stats" in jax.eval_shape(lambda: model.init(jax.random.key(0), train_data[0][:1]))
  if method == "backprop":
    opt = optax.sgd(0.05, momentum=0.9)
  else:
    estimator = fgjax.estimators.spsa(8, 1e-3)
    opt = optax.chain(fgjax.forward_gradient(estimator), optax.adam(2e-3))

  def loss_fn(params, stats, batch):
    x, y = batch
    if has_bn:
      logits, new = model.apply(
        {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
      )
      return _xent(logits, y), new["batch_stats"]
    return _xent(model.apply({"params": params}, x), y), stats

  def step(carry, batch):
    params, stats, state = carry
    if method == "backprop":
      (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, batch)
      updates, state = opt.update(grads, state, params)
    else:
      updates, state = opt.update(
        params, state, params, value_fn=lambda p: loss_fn(p, stats, batch)[0]
      )
    return (optax.apply_updates(params, updates), stats, state), None

  @jax.jit
  def run(key, x, y, batches):
    variables = model.init(key, x[:1])
    params, stats = variables["params"], variables.get("batch_stats", {})
    state = opt.init(params)
    if method != "backprop":  # the perturbations' key, per seed
      state = (state[0]._replace(key=jax.random.fold_in(key, 1)), *state[1:])
    (params, stats, _), _ = jax.lax.scan(step, (params, stats, state), (x[batches], y[batches]))
    return {"params": params, **({"batch_stats": stats} if has_bn else {})}

  def trainer(seed):
    batches = np.stack(
      [fgjax.training.batch_indices(num_train, BATCH, seed, t) for t in range(steps)]
    )
    return run(jax.random.key(seed), *train_data, jnp.asarray(batches))

  return trainer


def make_accuracy(model, test_data):
  """`accuracy(variables) -> float`, each test image alone (batch 1: per-image act. scales)."""
  x, y = test_data

  @jax.jit
  def correct(variables, x, y):  # data as arguments: XLA would constant-fold a closed-over copy
    logits = jax.vmap(lambda xi: model.apply(variables, xi[None])[0])(x)
    return jnp.mean(jnp.argmax(logits, -1) == y)

  return lambda variables: float(correct(variables, x, y))


def step_fn(model, method, variables, batch):
  """A training step of `method` on one batch, for counting and XLA analysis."""
  x, y = batch
  rest = {k: v for k, v in variables.items() if k != "params"}
  loss = lambda p: _xent(model.apply({"params": p, **rest}, x), y)
  if method == "backprop":
    return lambda p: jax.tree.map(lambda w, g: w - 0.05 * g, p, jax.grad(loss)(p))
  estimator = fgjax.estimators.spsa(8, 1e-3)
  return lambda p: jax.tree.map(
    lambda w, g: w - 1e-3 * g, p, estimator(loss, p, key=jax.random.key(0)).grads
  )


def read_rows(path) -> list:
  """The rows of a report's CSV, for `--merge`."""
  rows = []
  with open(path, newline="") as f:
    for record in csv.DictReader(f):
      values = {}
      for field in dataclasses.fields(efficiency.EfficiencyRow):
        convert = {"str": str, "int": int, "float": float}[field.type]
        values[field.name] = convert(record.get(field.name, -1))  # the CSV has no XLA flops
      rows.append(efficiency.EfficiencyRow(**values))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  parser.add_argument("--mlp-steps", type=int, default=600)
  parser.add_argument("--spsa-steps", type=int, default=1500)
  parser.add_argument("--mobilenet-steps", type=int, default=600)
  parser.add_argument("--out", default="/tmp/efficiency")
  parser.add_argument(
    "--models", nargs="+", default=None, help="only these model names (e.g. 'MLP'), to split a run"
  )
  parser.add_argument(
    "--merge", nargs="+", default=None, help="combine the reports of these --out folders"
  )
  args = parser.parse_args()
  train_data, test_data = digits()
  w8a8, w16a16 = fgjax.quant.preset("w8a8"), fgjax.quant.preset("w16a16")
  # (model name, builder(quant, depthwise quant) -> module, method, steps, precisions)
  configs = [
    ("MLP", lambda q, d: mlp(q), "backprop", args.mlp_steps, ("float32", "w8a8")),
    ("MLP", lambda q, d: mlp(q), "spsa", args.spsa_steps, ("float32", "w8a8")),
    (
      "MobileNetV2-0.35",
      lambda q, d: mobilenet(q, False, d),
      "backprop",
      args.mobilenet_steps,
      ("float32", "w8a8"),
    ),
    (
      "MobileNetV2-0.35 QF",
      lambda q, d: mobilenet(q, True, d),
      "backprop",
      args.mobilenet_steps,
      ("float32", "w8a8", "w8a8, dw w16a16"),
    ),
  ]
  quants = {"float32": (None, "same"), "w8a8": (w8a8, "same"), "w8a8, dw w16a16": (w8a8, w16a16)}
  rows, raw = [], []
  if args.merge:
    configs = []
    for folder in args.merge:
      rows += read_rows(pathlib.Path(folder) / "efficiency.csv")
      raw += json.loads((pathlib.Path(folder) / "accuracies.json").read_text())
  configs = [c for c in configs if args.models is None or c[0] in args.models]
  for name, build, method, steps, precisions in configs:
    accuracies = {p: [] for p in precisions}
    trained = []
    if steps == 0:  # costs only: untrained weights, no accuracy
      model = build(None, "same")
      trained.append(jax.jit(model.init)(jax.random.key(0), train_data[0][:1]))
    train_model = build(None, "same")
    if isinstance(train_model, fgjax.models.MobileNetV2):  # XLA:CPU's grouped convs are slow
      train_model = train_model.clone(depthwise_shifts=True)
    trainer = make_trainer(train_model, method, train_data, steps)
    evaluators = {p: make_accuracy(build(*quants[p]), test_data) for p in precisions}
    for seed in args.seeds if steps else ():
      variables = trainer(seed)
      trained.append(variables)
      for precision in precisions:
        acc = evaluators[precision](variables)
        accuracies[precision].append(acc)
        raw.append(
          {"model": name, "method": method, "precision": precision, "seed": seed, "accuracy": acc}
        )
        print(json.dumps(raw[-1]), flush=True)
    for precision in precisions:
      model = build(*quants[precision])
      variables = trained[0]
      batch = (train_data[0][:BATCH], train_data[1][:BATCH])
      rest = {k: v for k, v in variables.items() if k != "params"}
      row = efficiency.measure(
        model=name,
        method=method,
        precision=precision,
        params=variables["params"],
        forward=lambda p, x, m=model, r=rest: m.apply({"params": p, **r}, x),
        forward_args=(variables["params"], test_data[0][:1]),
        step=step_fn(model, method, variables, batch),
        step_args=(variables["params"],),
        accuracy=float(np.mean(accuracies[precision])) if accuracies[precision] else float("nan"),
      )
      rows.append(row)
      print(efficiency.to_markdown([row]).splitlines()[-1], flush=True)
  out = pathlib.Path(args.out)
  paths = efficiency.write_report(rows, out)
  (out / "accuracies.json").write_text(json.dumps(raw, indent=1))
  std = {}
  for r in raw:
    std.setdefault((r["model"], r["method"], r["precision"]), []).append(r["accuracy"])
  lines = ["| model | method | precision | accuracy (%), mean ± std |", "|---|---|---|---|"]
  for (m, meth, p), accs in std.items():
    lines.append(f"| {m} | {meth} | {p} | {100 * np.mean(accs):.1f} ± {100 * np.std(accs):.1f} |")
  (out / "accuracy_std.md").write_text("\n".join(lines) + "\n")
  print(paths["md"].read_text())
  print("\n".join(lines))


if __name__ == "__main__":
  main()
