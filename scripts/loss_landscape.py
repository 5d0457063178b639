"""Loss landscape of last-mile adaptation: backprop against forward-gradient trajectories.

Chen et al. ("Stepping Forward on the Last Mile", NeurIPS 2024) picture how forward gradients move
through the loss landscape: smaller, more cautious steps than backprop, and 8-bit weights that fail
to converge. This script draws that picture on this setup (an MLP
64-128-64-10 pretrained on 1,000 upright scikit-learn digits, the kernels of `dense_1` and `head`
adapted on 400 digits rotated by 30°, tested on 397 others) for four runs, each through
`fgjax.training.make_optimizer` (the binaries' path):

- backprop, float32 (SGD);
- FF float32: sign-m-SPSA (K = 8 Rademacher directions) on float weights;
- QZO-FF w16a8 and QZO-FF w8a8: sign-m-SPSA on integer weights (int16 / int8 kernels perturbed and
  updated on their grid, nearest rounding), 8-bit activations.

The FF runs share ε and the learning rate in weight units (`--lr_rel` times the mean channel
max|w|; ε just above half the coarsest int8 grid step), so they differ only in precision.

Every `--record_every` steps the adapted weights (dequantized for integer runs) are recorded. The
loss (float32 model, the adaptation training set) is then drawn on two planes centred on the
backprop end point ("the adapted solution"): one spanned by two filter-normalised random
directions, one by the two principal directions of all trajectories' offsets (Li et al. 2018). The
trajectories are projected onto each plane (least squares). At each end point: the largest
Hessian eigenvalue (power iteration, `jax.jvp` of `jax.grad`), the loss rise under random
filter-normalised perturbations of relative radius `--radius`, the distance from the start and the
path length. Accuracy and sharpness are mean ± std over `--seeds` adaptation seeds; the planes use
seed 0's trajectories.

Command (about 3 minutes on 2 shared CPU cores):
  python scripts/loss_landscape.py --output_dir /tmp/loss_landscape
Small (the notebook's switch, seconds): add `--small`.

Writes `landscape.png` (two contour panels with trajectories), `results.json` and `table.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fgjax
from fgjax import data as fdata
from fgjax import landscape, quant, training
from fgjax.models import MLP

# (label, method, precision): fixed-point precisions store integer kernels (QZO-FF).
RUNS = [
  ("backprop float32", "backprop", "float32"),
  ("FF float32 (sign-m-SPSA)", "sign_spsa", "float32"),
  ("QZO-FF w16a8", "sign_spsa", "w16a8"),
  ("QZO-FF w8a8", "sign_spsa", "w8a8"),
]
COLORS = {"backprop": "tab:red", "float32": "tab:blue", "w16a8": "tab:green", "w8a8": "tab:gray"}
SMALL = {
  "pretrain_steps": 100,
  "steps": 40,
  "record_every": 10,
  "seeds": 1,
  "grid": 9,
  "hessian_iterations": 5,
  "rise_samples": 2,
}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--output_dir", default="/tmp/loss_landscape")
  parser.add_argument("--pretrain_steps", type=int, default=800)
  parser.add_argument("--steps", type=int, default=800, help="adaptation steps")
  parser.add_argument("--record_every", type=int, default=40)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--grid", type=int, default=31, help="grid points per plane axis")
  parser.add_argument("--margin", type=float, default=0.3, help="plane margin beyond the paths")
  parser.add_argument("--radius", type=float, default=0.1, help="loss rise: relative radius")
  parser.add_argument("--rise_samples", type=int, default=16)
  parser.add_argument("--hessian_iterations", type=int, default=30)
  parser.add_argument("--small", action="store_true", help="tiny sizes for notebooks and tests")
  parser.add_argument("--hidden", default="128,64")
  parser.add_argument("--trainable", default="dense_1,head", help="layers whose kernels adapt")
  parser.add_argument("--rotation", type=float, default=30.0, help="domain shift, degrees")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--num_directions", type=int, default=8)
  parser.add_argument(
    "--lr_rel", type=float, default=3.5e-3, help="FF lr / mean channel max|w| (weight units)"
  )
  parser.add_argument("--backprop_lr", type=float, default=0.1)
  args = parser.parse_args(argv)
  if args.small:
    for key, value in SMALL.items():
      setattr(args, key, value)
  return args


def load_data(rotation: float):
  """Upright digits to pretrain on; a disjoint part rotated by `rotation` degrees to adapt."""
  dataset = fdata.digits()
  pretrain, adapt_train, adapt_test = fdata.split(dataset, (1000, 400, 397), seed=0)
  shift = lambda d: jnp.asarray(fdata.rotate(d.x, rotation))  # noqa: E731
  return (
    (jnp.asarray(pretrain.x), jnp.asarray(pretrain.y)),
    (shift(adapt_train), jnp.asarray(adapt_train.y)),
    (shift(adapt_test), jnp.asarray(adapt_test.y)),
  )


def pretrain(model, x, y, steps: int, batch_size: int) -> dict:
  """Float backprop (Adam) on the source domain; returns the float variables."""
  params = model.init(jax.random.key(0), x[:1])["params"]
  opt = optax.adam(3e-3)

  @jax.jit
  def step(params, state, index):
    batch = jax.random.randint(
      jax.random.fold_in(jax.random.key(1), index), (batch_size,), 0, len(y)
    )
    loss = lambda p: training.cross_entropy(model.apply({"params": p}, x[batch]), y[batch])  # noqa: E731
    updates, state = opt.update(jax.grad(loss)(params), state)
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  for index in range(steps):
    params, state = step(params, state, index)
  return {"params": params}


def kernel_mask(params, layers):
  """True at the kernels of `layers` (biases and the other layers stay frozen)."""
  return {
    name: {leaf: name in layers and leaf == "kernel" for leaf in sub}
    for name, sub in params.items()
  }


def _color(method: str, precision: str) -> str:
  return COLORS["backprop"] if method == "backprop" else COLORS[precision]


def adapt_with_trajectory(args, method, precision, float_variables, data, seed: int):
  """One adaptation run through `fgjax.training.make_optimizer` (integer kernels for w16a8 / w8a8);
  returns the float weights at steps 0, record_every, ..., steps, and the run's metrics."""
  hidden = tuple(int(h) for h in args.hidden.split(","))
  layers = tuple(args.trainable.split(","))
  (ax, ay), (tx, ty) = data
  kernels = [float_variables["params"][name]["kernel"] for name in layers]
  mean_absmax = float(np.mean(np.concatenate([np.max(np.abs(k), axis=0) for k in kernels])))
  # One ε for every FF run (weight units): just above half the coarsest int8 grid step, the least
  # the w8a8 run accepts (fgjax.estimators.spsa refuses perturbations that round to zero).
  w8 = quant.to_fixed_point(float_variables, quant.preset("w8a8")).scales
  epsilon = 0.6 * max(float(np.max(w8[f"{name}/kernel"])) for name in layers)
  config = {
    "method": method,
    "num_directions": args.num_directions,
    "epsilon": epsilon,
    "distribution": "rademacher",
    "optimizer": "sgd",
    "optimizer_kwargs": {
      "learning_rate": args.backprop_lr if method == "backprop" else args.lr_rel * mean_absmax
    },
    "rounding": "nearest",
  }
  integer = precision != "float32"
  if integer:
    fixed = quant.to_fixed_point(float_variables, quant.preset(precision))
    model = MLP(hidden, 10, quant=quant.integer_storage(quant.preset(precision)))
    apply_fn = quant.bind_frozen(model.apply, fixed.frozen)
    params, scales = fixed.params, fixed.scales
    to_float = lambda p: quant.from_fixed_point(p, fixed.frozen)["params"]  # noqa: E731
  else:
    model = MLP(hidden, 10)
    apply_fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    params, scales = float_variables["params"], None
    to_float = lambda p: p  # noqa: E731
  mask = kernel_mask(params, layers)
  optimizer = training.make_optimizer(
    config, mask=mask, seed=seed, integer_weights=integer, scales=scales
  )

  def step(carry, batch):
    params, state = carry
    loss = lambda p: training.cross_entropy(apply_fn(p, ax[batch]), ay[batch])  # noqa: E731
    updates, state = optimizer.update(params, state, params, value_fn=loss)
    new = fgjax.apply_integer_updates(params, updates)
    return (new, state), fgjax.changed_fraction(params, new, mask)

  adapt = jax.jit(lambda params, state, batches: jax.lax.scan(step, (params, state), batches))
  batches = np.random.default_rng(seed).integers(0, len(ay), (args.steps, args.batch_size))
  state = optimizer.init(params)
  trajectory, changed = [to_float(params)], []
  for start in range(0, args.steps, args.record_every):
    chunk = jnp.asarray(batches[start : start + args.record_every])
    (params, state), moved = adapt(params, state, chunk)
    trajectory.append(to_float(params))
    changed.append(np.asarray(moved))
  accuracy = float(jnp.mean(jnp.argmax(jax.jit(apply_fn)(params, tx), -1) == ty))
  settings = {"lr": config["optimizer_kwargs"]["learning_rate"]}
  if method != "backprop":
    settings["epsilon"] = epsilon
  return (
    trajectory,
    {
      "accuracy": accuracy,
      "zero_update_rate": float(1.0 - np.concatenate(changed).mean()),
    },
    settings,
  )


def _norm(tree) -> float:
  return float(np.sqrt(sum(float(jnp.vdot(x, x)) for x in jax.tree.leaves(tree))))


def _sub(a, b):
  return jax.tree.map(lambda x, y: jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32), a, b)


def run(args) -> dict:
  """Pretrains, adapts every run for every seed, measures sharpness; returns plain results."""
  if args.steps % args.record_every:
    raise ValueError("--steps must be a multiple of --record_every.")
  hidden = tuple(int(h) for h in args.hidden.split(","))
  layers = tuple(args.trainable.split(","))
  (px, py), (ax, ay), (tx, ty) = load_data(args.rotation)
  float_model = MLP(hidden_sizes=hidden, num_classes=10)
  float_variables = pretrain(float_model, px, py, args.pretrain_steps, args.batch_size)
  mask = kernel_mask(float_variables["params"], layers)

  def loss_fn(params):
    return training.cross_entropy(float_model.apply({"params": params}, ax), ay)

  runs = []
  for label, method, precision in RUNS:
    begin = time.time()
    per_seed = []
    for seed in range(args.seeds):
      trajectory, metrics, settings = adapt_with_trajectory(
        args, method, precision, float_variables, ((ax, ay), (tx, ty)), seed
      )
      end = trajectory[-1]
      top, _ = landscape.hessian_top_eigenvalue(
        loss_fn, end, jax.random.key(seed), num_iterations=args.hessian_iterations, mask=mask
      )
      rise = landscape.loss_rise(
        loss_fn, end, jax.random.key(100 + seed), radius=args.radius,
        num_samples=args.rise_samples, mask=mask,
      )  # fmt: skip
      steps = [_norm(_sub(b, a)) for a, b in zip(trajectory[:-1], trajectory[1:], strict=True)]
      metrics.update(
        train_loss=float(loss_fn(end)),
        hessian_top=top,
        loss_rise_mean=rise["mean"],
        loss_rise_max=rise["max"],
        distance=_norm(_sub(end, trajectory[0])),
        path_length=float(np.sum(steps)),
        mean_step=float(np.mean(steps)) / args.record_every,
      )
      per_seed.append((trajectory, metrics))
    summary = {"label": label, "method": method, "precision": precision, **settings}
    for key in per_seed[0][1]:
      values = np.array([m[key] for _, m in per_seed])
      summary[key], summary[key + "_std"] = float(values.mean()), float(values.std())
    summary["seconds"] = time.time() - begin
    print(f"{label:28s} acc {summary['accuracy']:.3f} ({summary['seconds']:.0f}s)", file=sys.stderr)
    runs.append({"summary": summary, "trajectory": per_seed[0][0]})

  start = float_variables["params"]
  zero_shot_top, _ = landscape.hessian_top_eigenvalue(
    loss_fn, start, jax.random.key(0), num_iterations=args.hessian_iterations, mask=mask
  )
  center = runs[0]["trajectory"][-1]  # The backprop solution.
  points = [p for r in runs for p in r["trajectory"]]
  pca, explained = landscape.pca_directions(points, center, mask)
  random_plane = [
    landscape.filter_normalized_direction(jax.random.key(7 + i), center, mask) for i in range(2)
  ]
  planes = {}
  for name, directions in (("pca", pca), ("random", random_plane)):
    paths = [landscape.project(r["trajectory"], center, directions) for r in runs]
    extent = max(float(np.abs(np.concatenate(paths)).max()), 1e-3) * (1 + args.margin)
    if name == "random":
      extent = max(extent, 0.5)  # Random planes: at least half a filter norm, to show the bowl.
    axis = np.linspace(-extent, extent, args.grid)
    surface = landscape.loss_surface(loss_fn, center, tuple(directions), axis, axis)
    planes[name] = {"x": axis, "y": axis, "surface": surface, "paths": paths}
  # The same PCA plane, zoomed on the start: forward-gradient paths are short at backprop's scale.
  paths = planes["pca"]["paths"]
  origin = paths[0][0]
  reach = max(float(np.abs(p - origin).max()) for p, r in zip(paths, runs, strict=True)
              if r["summary"]["method"] != "backprop")  # fmt: skip
  reach = max(reach, 1e-3) * (1 + args.margin)
  x = origin[0] + np.linspace(-reach, reach, args.grid)
  y = origin[1] + np.linspace(-reach, reach, args.grid)
  planes["pca_zoom"] = {
    "x": x,
    "y": y,
    "surface": landscape.loss_surface(loss_fn, center, tuple(pca), x, y),
    "paths": paths,
  }
  return {
    "runs": [r["summary"] for r in runs],
    "planes": planes,
    "pca_explained": [float(e) for e in explained],
    "zero_shot": {"train_loss": float(loss_fn(start)), "hessian_top": zero_shot_top},
  }


def plot(results: dict, path) -> None:
  """Three contour panels (PCA plane, its zoom on the start, a random plane) with the
  trajectories; writes a PNG."""
  # The object-oriented API without pyplot: no backend switch, safe inside notebooks.
  from matplotlib.figure import Figure

  fig = Figure(figsize=(16, 4.9))
  axes = fig.subplots(1, 3)
  explained = "{:.0%} + {:.0%}".format(*results["pca_explained"])
  titles = {
    "pca": f"PCA plane of all trajectories ({explained} of offsets)",
    "pca_zoom": "Same plane, zoomed on the pretrained start",
    "random": "Filter-normalised random plane",
  }
  pca_units = ("PC 1 (weight-space distance)", "PC 2 (weight-space distance)")
  units = {
    "pca": pca_units,
    "pca_zoom": pca_units,
    "random": ("direction 1 (multiples of filter norm)", "direction 2 (multiples of filter norm)"),
  }
  styles = {"float32": "-", "w16a8": "--", "w8a8": ":"}
  for ax, name in zip(axes, ("pca", "pca_zoom", "random"), strict=True):
    plane = results["planes"][name]
    surface = np.asarray(plane["surface"])
    # Levels by quantile, so that the low basin is resolved as well as the walls.
    levels = np.unique(np.quantile(surface, np.linspace(0.0, 1.0, 18)))
    contour = ax.contourf(plane["x"], plane["y"], surface, levels=levels, cmap="viridis")
    ax.contour(plane["x"], plane["y"], surface, levels=levels, colors="k", linewidths=0.3,
               alpha=0.4)  # fmt: skip
    fig.colorbar(contour, ax=ax, label="training loss (cross-entropy, nats)", format="%.2f")
    for run, path_xy in zip(results["runs"], plane["paths"], strict=True):
      path_xy = np.asarray(path_xy)
      color = _color(run["method"], run["precision"])
      style = "-" if run["method"] == "backprop" else styles[run["precision"]]
      ax.plot(path_xy[:, 0], path_xy[:, 1], style, marker="o", ms=2.5, lw=1.8, color=color,
              label=run["label"])  # fmt: skip
      ax.plot(path_xy[-1, 0], path_xy[-1, 1], "*", ms=12, color=color, mec="k", mew=0.5)
    start = np.asarray(plane["paths"][0])[0]
    ax.plot(start[0], start[1], "X", ms=9, color="white", mec="k", label="pretrained start")
    ax.set_xlim(plane["x"][0], plane["x"][-1])
    ax.set_ylim(plane["y"][0], plane["y"][-1])
    ax.set_title(titles[name], fontsize=10)
    ax.set_xlabel(units[name][0])
    ax.set_ylabel(units[name][1])
  axes[0].legend(fontsize=8, loc="best", framealpha=0.9)
  fig.suptitle(
    "Last-mile adaptation on rotated digits: backprop and forward-gradient trajectories "
    "(stars: end points; centre: the backprop solution)"
  )
  fig.tight_layout()
  fig.savefig(path, dpi=80)


def markdown_table(results: dict, command: str) -> str:
  lines = [
    "| run | adapted acc | train loss | top Hessian eigenvalue | loss rise (mean / max) "
    "| distance from start | path length | net move / step | zero-update rate |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  pm = lambda r, k, f: f"{r[k]:{f}} ± {r[k + '_std']:{f}}"  # noqa: E731
  for r in results["runs"]:
    lines.append(
      f"| {r['label']} | {pm(r, 'accuracy', '.3f')} | {pm(r, 'train_loss', '.3f')}"
      f" | {pm(r, 'hessian_top', '.2f')} | {r['loss_rise_mean']:.4f} / {r['loss_rise_max']:.4f}"
      f" | {pm(r, 'distance', '.3f')} | {pm(r, 'path_length', '.3f')} | {r['mean_step']:.2e}"
      f" | {r['zero_update_rate']:.3f} |"
    )
  zero = results["zero_shot"]
  lines += [
    "",
    f"Pretrained start: train loss {zero['train_loss']:.3f}, top Hessian eigenvalue "
    f"{zero['hessian_top']:.2f}. PCA plane explains "
    + " + ".join(f"{e:.1%}" for e in results["pca_explained"])
    + " of the trajectories' squared offsets.",
    "",
    f"Command: `{command}`",
  ]
  return "\n".join(lines) + "\n"


def _jsonable(results: dict) -> dict:
  out = dict(results)
  out["planes"] = {
    name: {key: np.asarray(value).tolist() for key, value in plane.items() if key != "paths"}
    | {"paths": [np.asarray(p).tolist() for p in plane["paths"]]}
    for name, plane in results["planes"].items()
  }
  return out


def main(argv=None) -> dict:
  args = parse_args(argv)
  begin = time.time()
  results = run(args)
  output = pathlib.Path(args.output_dir)
  output.mkdir(parents=True, exist_ok=True)
  command = "python scripts/loss_landscape.py " + " ".join(sys.argv[1:] if argv is None else argv)
  plot(results, output / "landscape.png")
  table = markdown_table(results, command.strip())
  table += f"Total time: {time.time() - begin:.0f} s on {os.cpu_count()} CPU cores.\n"
  (output / "table.md").write_text(table)
  (output / "results.json").write_text(json.dumps({"args": vars(args), **_jsonable(results)}))
  print(table)
  return results


if __name__ == "__main__":
  main()
