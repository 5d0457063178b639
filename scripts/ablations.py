"""Ablations of forward-gradient adaptation on one last-mile task, mean ± std over seeds.

Task: scikit-learn digits, pretrained upright (60 % of the data, SmallCNN 16-32-64, Adam, 600
steps), adapted to the other 40 % rotated by 30 degrees from 10 shots per class (the README demo's
task), tested on the rest. Each seed redraws the split, the pretraining and the perturbations.
Groups (`--groups`, comma-separated):
- m: sign-m-SPSA with m = 1, 3, 8 directions (float32 weights);
- sign: sign-m-SPSA against plain (magnitude) SPSA, each over three learning rates;
- sam: sharpness-aware (rho = 0.05) on/off;
- schedule: m = 3 constant, a fixed (step, m) list, m grown on plateaus;
- start: from the pretrained weights against from scratch (sign-m-SPSA and backprop);
- precision: integer weights w16a8 against w8a8, nearest and stochastic rounding, over a
  learning-rate sweep (not one rate);
- passes: test accuracy against forward passes for sign-m-SPSA m = 3 over a long run, against
  backprop's final accuracy: forward passes to reach 95 % of it; plus the compiled memory of one
  step of sign-m-SPSA, backprop, and backprop with rematerialisation (`jax.checkpoint`).

  python scripts/ablations.py --seeds=0,1,2 --out=docs/results/ablations.md
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
import traceback

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import _study  # noqa: E402
import shift_study  # noqa: E402

from fgjax import data as fdata  # noqa: E402
from fgjax import estimators, models  # noqa: E402

GROUPS = ("m", "sign", "sam", "schedule", "start", "precision", "passes")
STEPS = 400
PRECISION_LRS = [0.003, 0.01, 0.03]
SIGN_LR = 0.01


def model_fn(quant):
  return models.get_model("small_cnn", num_classes=10, quant=quant, features=(16, 32), hidden=64)


def group_methods(group: str, steps: int) -> list[_study.Method]:
  sign = {"steps": steps, "epsilon": 1e-3}
  if group == "m":
    return [
      _study.Method(f"sign-m-SPSA m={m}", num_directions=m, learning_rate=SIGN_LR, **sign)
      for m in (1, 3, 8)
    ]
  if group == "sign":
    return [
      *[
        _study.Method(f"sign-m-SPSA m=3, lr {lr:g}", learning_rate=lr, **sign)
        for lr in (0.003, 0.01, 0.03)
      ],
      *[
        _study.Method(f"SPSA (magnitude) m=3, lr {lr:g}", method="spsa", learning_rate=lr, **sign)
        for lr in (0.001, 0.003, 0.01)
      ],
    ]
  if group == "sam":
    return [
      _study.Method("sign-m-SPSA m=3", learning_rate=SIGN_LR, **sign),
      _study.Method("sign-m-SPSA m=3 + SAM rho 0.05", rho=0.05, learning_rate=SIGN_LR, **sign),
      _study.Method("sign-m-SPSA m=3 + SAM rho 0.02", rho=0.02, learning_rate=SIGN_LR, **sign),
    ]
  if group == "schedule":
    half = steps // 2
    return [
      _study.Method("m=3 constant", learning_rate=SIGN_LR, **sign),
      _study.Method(
        f"m: (0,1),({half},5)", schedule=((0, 1), (half, 5)), learning_rate=SIGN_LR, **sign
      ),
      _study.Method("m on plateau (1,3,6,12)", schedule="plateau", learning_rate=SIGN_LR, **sign),
    ]
  if group == "precision":
    out = []
    for precision in ("w16a8", "w8a8"):
      for rounding in ("nearest", "stochastic"):
        for lr in PRECISION_LRS:
          out.append(
            _study.Method(
              f"{precision} {rounding} lr {lr:g}",
              precision=precision,
              rounding=rounding,
              learning_rate=lr,
              steps=steps,
              # Above half of the coarsest 8-bit grid step of these models (~7e-3 / 2).
              epsilon=5e-3,
            )
          )
    return out
  raise ValueError(group)


def task(seed: int):
  x, y = shift_study.image_data("digits")
  src_train, src_test, chosen, rest = shift_study.split(x, y, seed, 10, 0.6)
  target = np.clip(fdata.rotate(x[np.concatenate([chosen, rest])], 30.0), 0.0, 1.0)
  return (
    (x[src_train], y[src_train]),
    (target[: len(chosen)], y[chosen]),
    (
      target[len(chosen) :],
      y[rest],
    ),
  )


def memory_row(variables, batch) -> dict[str, float]:
  """Compiled memory (KiB, XLA's estimate: arguments + outputs + temporaries) of one step."""
  model = model_fn(None)
  params = {k: v for k, v in variables.items() if k == "params"}["params"]
  frozen = {k: v for k, v in variables.items() if k != "params"}
  x, y = batch

  def loss(p):
    return _study.cross_entropy(model.apply({"params": p, **frozen}, x, train=False), y)

  def stats(fn):
    analysis = jax.jit(fn).lower(params).compile().memory_analysis()
    total = (
      analysis.argument_size_in_bytes
      + analysis.output_size_in_bytes
      + analysis.temp_size_in_bytes
      - analysis.alias_size_in_bytes
    )
    return total / 1024, analysis.temp_size_in_bytes / 1024

  sgd = lambda p, g: jax.tree.map(lambda a, b: a - 0.01 * b, p, g)
  spsa = estimators.spsa(3, epsilon=1e-3, sign=True, distribution="rademacher")
  remat = jax.checkpoint(loss, policy=jax.checkpoint_policies.nothing_saveable)
  return {
    "sign-m-SPSA m=3": stats(lambda p: sgd(p, spsa(loss, p, key=jax.random.key(0)).grads)),
    "backprop": stats(lambda p: sgd(p, jax.grad(loss)(p))),
    "backprop + jax.checkpoint": stats(lambda p: sgd(p, jax.grad(remat)(p))),
    "forward only (inference)": stats(loss),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--groups", default=",".join(GROUPS))
  parser.add_argument("--steps", type=int, default=STEPS)
  parser.add_argument("--long_steps", type=int, default=3000)
  parser.add_argument("--workdir", default="/tmp/fgjax_ablations")
  parser.add_argument("--precision_lrs", default="0.003,0.01,0.03")
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  PRECISION_LRS[:] = [float(v) for v in args.precision_lrs.split(",")]
  seeds = [int(s) for s in args.seeds.split(",")]
  groups = args.groups.split(",")
  workdir = pathlib.Path(args.workdir)
  log = _study.progress_log(workdir)

  float_model = model_fn(None)
  pretrained, data = {}, {}
  for seed in seeds:
    data[seed] = task(seed)
    start = time.time()
    pretrained[seed] = _study.pretrain(float_model, *data[seed][0], steps=600, seed=seed)
    zero = _study.accuracy(float_model, pretrained[seed], *data[seed][2])
    log(f"seed {seed}: pretrained in {time.time() - start:.0f} s; rotated zero-shot {zero:.3f}")
    data[seed] = (*data[seed], zero)

  results: dict[str, dict[str, list]] = {}
  sections = []
  backprop = _study.Method(
    "backprop, lr 0.05", method="backprop", learning_rate=0.05, steps=args.steps
  )

  def run_group(name, methods, starts=("pretrained",)):
    rows = results.setdefault(name, {})
    rows["zero-shot"] = [data[s][3] for s in seeds]
    for method in methods:
      adapter = _study.Adapter(model_fn, method)
      for start_from in starts:
        label = method.name if len(starts) == 1 else f"{method.name}, {start_from}"
        for seed in seeds:
          (xs, ys), (xa, ya), (xt, yt), _ = data[seed]
          variables = pretrained[seed]
          if start_from == "scratch":
            variables = dict(float_model.init(jax.random.key(100 + seed), xa[:1], train=False))
          out = adapter(variables, xa, ya, xt, yt, seed)
          rows.setdefault(label, []).append(out["adapted"])
        log(
          f"{name}: {label}: {_study.mean_std(rows[label])} "
          f"({method.forward_passes()} forward passes)"
        )
    lines = ["| method | test accuracy % (rotated 30°) | forward passes |", "|---|---|---|"]
    passes = {m.name: m.forward_passes() for m in methods}
    for label, values in rows.items():
      base = label.rsplit(", scratch", 1)[0].rsplit(", pretrained", 1)[0]
      count = passes.get(base, "-")
      if "plateau" in label:
        count = "adaptive (m from 1 to 12)"
      lines.append(f"| {label} | {_study.mean_std(values)} | {count} |")
    sections.append((name, "\n".join(lines)))
    (workdir / "results.json").write_text(json.dumps(results))

  def run_one(group):
    if group == "start":
      run_group(
        "start",
        [
          _study.Method("sign-m-SPSA m=3", learning_rate=SIGN_LR, steps=args.steps),
          backprop,
        ],
        starts=("pretrained", "scratch"),
      )
    elif group == "passes":
      every = max(1, args.long_steps // 15)
      long = _study.Method(
        "sign-m-SPSA m=3 (long)", learning_rate=SIGN_LR, steps=args.long_steps, eval_every=every
      )
      reference = _study.Method(
        "backprop, lr 0.05",
        method="backprop",
        learning_rate=0.05,
        steps=args.steps,
        eval_every=max(1, args.steps // 8),
      )
      curves = {"sign": [], "backprop": []}
      for method, key in ((long, "sign"), (reference, "backprop")):
        adapter = _study.Adapter(model_fn, method)
        for seed in seeds:
          (_, _), (xa, ya), (xt, yt), _ = data[seed]
          curves[key].append(adapter(pretrained[seed], xa, ya, xt, yt, seed)["curve"])
      lines = [
        "| seed | backprop final % (passes fwd+bwd) | 95 % of it | sign-m-SPSA m=3: "
        "forward passes to reach it | sign-m-SPSA final % (passes) |",
        "|---|---|---|---|---|",
      ]
      reached = []
      for seed, bp, sg in zip(seeds, curves["backprop"], curves["sign"], strict=True):
        target = 0.95 * bp[-1][1]
        hit = next((long.forward_passes(step) for step, acc in sg if acc >= target), None)
        reached.append(hit)
        lines.append(
          f"| {seed} | {100 * bp[-1][1]:.1f} ({bp[-1][0]}+{bp[-1][0]}) | {100 * target:.1f} | "
          f"{hit if hit is not None else 'not reached'} | {100 * sg[-1][1]:.1f} "
          f"({long.forward_passes()}) |"
        )
      memory = memory_row(
        pretrained[seeds[0]], (data[seeds[0]][1][0][:32], data[seeds[0]][1][1][:32])
      )
      lines += ["", "| one step, batch 32 | total KiB | temporaries KiB |", "|---|---|---|"]
      lines += [f"| {k} | {v[0]:.0f} | {v[1]:.0f} |" for k, v in memory.items()]
      curve_lines = [
        "",
        "Accuracy curve of sign-m-SPSA m=3 (mean over seeds): "
        + ", ".join(
          f"{long.forward_passes(step)} passes: "
          f"{100 * np.mean([c[i][1] for c in curves['sign']]):.1f} %"
          for i, (step, _) in enumerate(curves["sign"][0])
        ),
      ]
      sections.append(("passes", "\n".join(lines + curve_lines)))
      results["passes"] = {"curves": curves, "reached": reached, "memory": memory}
      (workdir / "results.json").write_text(json.dumps(results, default=str))
      log("passes: " + "\n".join(lines + curve_lines))
    else:
      run_group(group, group_methods(group, args.steps))

  for group in groups:
    try:
      run_one(group)
    except Exception:  # A failed group is logged; the others still run.
      log(f"{group}: failed\n{traceback.format_exc()}")
  command = "python scripts/ablations.py " + " ".join(sys.argv[1:])
  text = f"Command: `{command}`\n\n" + "\n\n".join(f"### {t}\n\n{b}" for t, b in sections)
  (workdir / "tables.md").write_text(text + "\n")
  print(text)
  if args.out:
    pathlib.Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
  main()
