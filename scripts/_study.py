"""What the study scripts share: in-process pretraining and adaptation that compile once.

`shift_study.py` and `ablations.py` run hundreds of short adaptations (methods x shifts x seeds).
The experiment binaries compile every run afresh; here one jitted `lax.scan` per method serves
every seed and every shifted data set of the same shape: the seed enters through the data, the
initial weights and the optimizer state's PRNG keys (folded with the seed after `init`).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fgjax
from fgjax import training


@dataclasses.dataclass(frozen=True)
class Method:
  """One way to adapt; `name` labels it in tables."""

  name: str
  method: str = "sign_spsa"  # backprop | spsa | sign_spsa | jvp
  num_directions: int = 3
  epsilon: float = 1e-3  # weight units
  learning_rate: float = 1e-2
  steps: int = 400
  batch_size: int = 32
  trainable: str = "full"  # full | linear_probe | last_k
  last_k: int = 1
  rho: float = 0.0  # sharpness-aware radius (0: off)
  schedule: tuple | str | None = None  # None, "plateau", or ((step, m), ...)
  precision: str = "float32"  # float32 or a preset with integer weights (w16a8, w8a8)
  rounding: str = "stochastic"
  eval_every: int = 0  # > 0: also record the test accuracy every this many steps

  @property
  def integer(self) -> bool:
    return self.precision != "float32"

  def forward_passes(self, steps: int | None = None) -> int:
    """Forward passes over `steps` (default: all): sign/SPSA 2m, jvp m, backprop 1 (+1 bwd);
    SAM doubles forward methods' passes; schedules count each level's steps."""
    steps = self.steps if steps is None else steps
    if self.method == "backprop":
      return steps
    per = 2 if self.method in ("spsa", "sign_spsa") else 1
    sam = 2 if self.rho else 1
    if isinstance(self.schedule, tuple):
      bounds = [*self.schedule, (steps, 0)]
      total = 0
      for (start, m), (end, _) in zip(bounds, bounds[1:], strict=False):
        total += max(0, min(end, steps) - start) * m
      return per * sam * total
    return per * sam * self.num_directions * steps


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def pretrain(model, x, y, *, steps: int, seed: int, batch_size: int = 64, lr: float = 1e-3):
  """Backprop + Adam in float from a seeded init; returns the variables (BatchNorm state too)."""
  variables = dict(model.init(jax.random.key(seed), jnp.asarray(x[:1]), train=False))
  params = variables.pop("params")
  opt = optax.adam(lr)
  state = training.TrainState.create(params, variables, opt, jax.random.key(seed))
  step = training.make_train_step(model, opt, update_batch_stats=True)
  for t in range(steps):
    index = training.batch_indices(len(y), batch_size, seed, t)
    state, _ = step(state, fgjax.data.Batch(x=x[index], y=y[index]))
  return {"params": state.params, **state.model_state}


def accuracy(model, variables, x, y) -> float:
  variables = dict(variables)
  params = variables.pop("params")
  return training.evaluate(training.make_eval_step(model), params, variables, x, y)["accuracy"]


class Adapter:
  """Adapts pretrained float variables with one `Method`; compiled once, reused across calls."""

  def __init__(self, model_fn, method: Method):
    self.method = method
    quant = (
      fgjax.quant.preset(method.precision, weight_storage="integer") if method.integer else None
    )
    self.model = model_fn(quant)
    self.float_model = model_fn(None)
    self._run = None

  def _variables(self, float_variables, x):
    if not self.method.integer:
      return dict(float_variables)
    like = jax.eval_shape(
      lambda: self.model.init(jax.random.key(0), jnp.asarray(x[:1]), train=False)
    )
    return dict(fgjax.quant.quantize_params(float_variables, self.model.quant, like=like))

  def _optimizer(self, params, frozen):
    m = self.method
    mask = training.trainable_mask(params, m.trainable, last_k=m.last_k)
    scales = fgjax.quant.leaf_scales(params, frozen) if m.integer else None
    config = {
      "method": m.method,
      "num_directions": m.num_directions,
      "epsilon": m.epsilon,
      "distribution": "rademacher",
    }
    estimator = training.make_estimator(config, mask, scales)
    if m.rho:
      estimator = fgjax.sharpness_aware(estimator, m.rho)
    if m.schedule == "plateau":
      levels = tuple(sorted({1, m.num_directions, 2 * m.num_directions, 4 * m.num_directions}))
      link = fgjax.num_directions_on_plateau(estimator, levels, patience=max(10, m.steps // 10))
    elif m.schedule:
      link = fgjax.num_directions_schedule(estimator, m.schedule)
    else:
      link = fgjax.forward_gradient(estimator)
    labels = jax.tree.map(lambda on: "train" if on else "freeze", mask)
    sgd = optax.sgd(optax.cosine_decay_schedule(m.learning_rate, m.steps))
    opt = optax.chain(link, optax.partition({"train": sgd, "freeze": optax.set_to_zero()}, labels))
    if m.integer:
      opt = fgjax.integer_optimizer(opt, scales=scales, rounding=m.rounding, mask=mask)
    return opt

  def __call__(self, float_variables, x, y, x_test, y_test, seed: int) -> dict:
    """Adapts on (x, y) with the seed's batches and perturbations; returns accuracies."""
    m = self.method
    variables = self._variables(float_variables, x)
    params = variables.pop("params")
    if self._run is None:
      opt = self._optimizer(params, variables)
      model = self.model

      def step(carry, index, xs, ys, frozen):
        params, opt_state = carry

        def value_fn(p):
          return cross_entropy(
            model.apply({"params": p, **frozen}, xs[index], train=False), ys[index]
          )

        updates, opt_state = opt.update(params, opt_state, params, value_fn=value_fn)
        return (fgjax.apply_integer_updates(params, updates), opt_state), None

      def run(params, opt_state, xs, ys, frozen, indices):
        return jax.lax.scan(lambda c, i: step(c, i, xs, ys, frozen), (params, opt_state), indices)[
          0
        ]

      self._opt = opt
      self._run = jax.jit(run)
    opt_state = self._opt.init(params)
    # The seed enters every PRNG key of the optimizer state (perturbations, rounding).
    opt_state = jax.tree.map(
      lambda leaf: (
        jax.random.fold_in(leaf, seed)
        if jnp.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key)
        else leaf
      ),
      opt_state,
    )
    x, y = jnp.asarray(x), jnp.asarray(y)
    curve = []
    chunk = m.eval_every or m.steps  # eval_every should divide steps (one scan length)
    done = 0
    while done < m.steps:
      count = min(chunk, m.steps - done)
      indices = np.stack(
        [training.batch_indices(len(y), m.batch_size, seed, t) for t in range(done, done + count)]
      )
      params, opt_state = self._run(params, opt_state, x, y, variables, jnp.asarray(indices))
      done += count
      if m.eval_every:
        curve.append((done, accuracy(self.model, {"params": params, **variables}, x_test, y_test)))
    adapted = (
      curve[-1][1]
      if curve
      else accuracy(self.model, {"params": params, **variables}, x_test, y_test)
    )
    return {"adapted": adapted, "curve": curve}


def mean_std(values, scale: float = 100.0, digits: int = 1) -> str:
  values = [scale * v for v in values if v is not None and math.isfinite(v)]
  if not values:
    return "-"
  if len(values) == 1:
    return f"{values[0]:.{digits}f}"
  return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def progress_log(workdir: pathlib.Path):
  """Creates `workdir` and returns `log(message)`: printed and appended to `workdir/log.txt`."""
  workdir.mkdir(parents=True, exist_ok=True)
  log_file = (workdir / "log.txt").open("a")

  def log(message):
    print(message, flush=True)
    log_file.write(message + "\n")
    log_file.flush()

  return log


def summaries_table(root: pathlib.Path) -> str:
  """Mean ± std over seeds of the binaries' runs under `root`: one row per run name, the runs of
  seed N being the folders named like `<prefix>seed<N>_<run>` (each with its summary.json).

    python scripts/_study.py /tmp/w8a8   # folders seed0_nearest, seed1_nearest, ...
  """
  import json
  import re

  rows: dict[str, list[dict]] = {}
  for path in sorted(root.glob("*seed*/summary.json")):
    name = re.sub(r"seed\d+_?", "", path.parent.name).strip("_") or "run"
    rows.setdefault(name, []).append(json.loads(path.read_text()))
  lines = [
    "| run | seeds | zero-shot % | adapted % | per seed | zero updates % | forward passes |",
    "|---|---|---|---|---|---|---|",
  ]
  for name, runs in rows.items():
    adapted = [r["adapted_accuracy"] for r in runs]
    zero_updates = [r.get("zero_update_rate") for r in runs]
    passes = sorted({r["total_passes"]["forward"] for r in runs})
    lines.append(
      f"| {name} | {len(runs)} | {mean_std([r['zero_shot_accuracy'] for r in runs])} | "
      f"{mean_std(adapted)} | {', '.join(f'{100 * a:.1f}' for a in adapted)} | "
      f"{mean_std(zero_updates) if None not in zero_updates else '-'} | "
      f"{', '.join(map(str, passes))} |"
    )
  return "\n".join(lines)


if __name__ == "__main__":
  import sys

  print(summaries_table(pathlib.Path(sys.argv[1])))
