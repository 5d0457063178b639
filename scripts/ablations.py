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
  step of sign-m-SPSA, backprop, and backprop with rematerialisation (`jax.checkpoint`);
- remat: backprop with rematerialisation (whole loss, per layer) against sign-m-SPSA's memory,
  and backprop's accuracy at the largest batch whose remat step fits in that memory.

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
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import _study  # noqa: E402
import shift_study  # noqa: E402

from fgjax import data as fdata  # noqa: E402
from fgjax import estimators, models  # noqa: E402

GROUPS = ("m", "sign", "sam", "schedule", "start", "precision", "passes", "remat")
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


def _block_fns(pool: str):
  """The SmallCNN of `model_fn` as its four layers, each `fn(layer_params, h) -> h` (so each can
  be rematerialised on its own). `pool="flax"`: the model's own `nn.max_pool`; "reshape": the
  same 2x2 max written as reshape + max (equal outputs on even sizes; a cheaper gradient)."""
  import flax.linen as nn

  from fgjax import quant as fq

  def max_pool(h):
    if pool == "flax":
      return nn.max_pool(h, (2, 2), strides=(2, 2), padding="SAME")
    b, height, width, c = h.shape
    return h.reshape(b, height // 2, 2, width // 2, 2, c).max(axis=(2, 4))

  def conv(width):
    module = fq.Conv(width, (3, 3), padding="SAME")
    return lambda p, h: max_pool(nn.relu(module.apply({"params": p}, h)))

  def dense(width, relu):
    module = nn.Dense(width)
    act = nn.relu if relu else (lambda a: a)
    return lambda p, h: act(module.apply({"params": p}, h.reshape(h.shape[0], -1)))

  return [
    ("conv_0", conv(16)),
    ("conv_1", conv(32)),
    ("dense_2", dense(64, True)),
    ("head", dense(10, False)),
  ]


def layered_loss(x, y, *, remat: bool, pool: str = "flax"):
  """The cross-entropy of `model_fn(None)` layer by layer; `remat`: each layer in
  `jax.checkpoint(policy=nothing_saveable)` (per-layer rematerialisation: only the layers'
  inputs are kept for the backward pass, each layer's inside is recomputed there)."""
  policy = jax.checkpoint_policies.nothing_saveable

  def loss(p):
    h = x
    for name, fn in _block_fns(pool):
      h = (jax.checkpoint(fn, policy=policy) if remat else fn)(p[name], h)
    return _study.cross_entropy(h, y)

  return loss


def _memory(fn, *args) -> tuple[float, float]:
  """(total, temporaries) in KiB, XLA's compiled estimate: arguments + outputs + temp − alias."""
  analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
  total = (
    analysis.argument_size_in_bytes
    + analysis.output_size_in_bytes
    + analysis.temp_size_in_bytes
    - analysis.alias_size_in_bytes
  )
  return total / 1024, analysis.temp_size_in_bytes / 1024


def _backprop_step(loss):
  """One SGD step of `loss` by backprop (lr 0.01): the step the memory rows compile."""
  return lambda p: jax.tree.map(lambda a, b: a - 0.01 * b, p, jax.grad(loss)(p))


def memory_row(variables, batch) -> dict[str, tuple[float, float]]:
  """Compiled memory (KiB: total, temporaries) of one SGD step on `batch`: sign-m-SPSA m=3,
  backprop, and backprop with rematerialisation (whole loss, per layer), and the forward alone."""
  model = model_fn(None)
  params = variables["params"]
  frozen = {k: v for k, v in variables.items() if k != "params"}
  x, y = (jnp.asarray(a) for a in batch)

  def loss(p):
    return _study.cross_entropy(model.apply({"params": p, **frozen}, x, train=False), y)

  # The layer-by-layer form is the model itself: same loss, same gradient (exactly).
  for pool in ("flax", "reshape"):
    layered = layered_loss(x, y, remat=True, pool=pool)
    np.testing.assert_allclose(layered(params), loss(params), rtol=1e-6)
    for a, b in zip(
      jax.tree.leaves(jax.grad(layered)(params)),
      jax.tree.leaves(jax.grad(loss)(params)),
      strict=True,
    ):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  sgd = lambda p, g: jax.tree.map(lambda a, b: a - 0.01 * b, p, g)
  spsa = estimators.spsa(3, epsilon=1e-3, sign=True, distribution="rademacher")
  whole = jax.checkpoint(loss, policy=jax.checkpoint_policies.nothing_saveable)
  step = _backprop_step
  return {
    "sign-m-SPSA m=3": _memory(
      lambda p: sgd(p, spsa(loss, p, key=jax.random.key(0)).grads), params
    ),
    "backprop": _memory(step(loss), params),
    "backprop + jax.checkpoint (whole loss)": _memory(step(whole), params),
    "backprop + per-layer remat": _memory(step(layered_loss(x, y, remat=True)), params),
    "backprop, pooling as reshape + max": _memory(
      step(layered_loss(x, y, remat=False, pool="reshape")), params
    ),
    "backprop + per-layer remat, pooling as reshape + max": _memory(
      step(layered_loss(x, y, remat=True, pool="reshape")), params
    ),
    "forward only (inference)": _memory(loss, params),
  }


def batch_at(memory_kib: float, variables, x, y, *, remat: bool, pool: str = "flax") -> int:
  """The largest power-of-two batch (<= 32) whose backprop step (with per-layer remat or not)
  fits in `memory_kib` total (0 if none)."""
  for batch in (32, 16, 8, 4, 2, 1):
    loss = layered_loss(jnp.asarray(x[:batch]), jnp.asarray(y[:batch]), remat=remat, pool=pool)
    if _memory(_backprop_step(loss), variables["params"])[0] <= memory_kib:
      return batch
  return 0


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
    elif group == "remat":
      # Backprop with rematerialisation at sign-m-SPSA's memory (issue 9, point 5).
      (xa, ya) = data[seeds[0]][1]
      memory = memory_row(pretrained[seeds[0]], (xa[:32], ya[:32]))
      lines = ["| one step, batch 32 | total KiB | temporaries KiB |", "|---|---|---|"]
      lines += [f"| {k} | {v[0]:.0f} | {v[1]:.0f} |" for k, v in memory.items()]
      budget = memory["sign-m-SPSA m=3"][0]
      found = {
        (remat, pool): batch_at(budget, pretrained[seeds[0]], xa, ya, remat=remat, pool=pool)
        for remat in (False, True)
        for pool in ("flax", "reshape")
      }
      lines += [
        "",
        f"Largest batch whose backprop step fits in sign-m-SPSA's {budget:.0f} KiB (batch 32):",
        "",
        "| pooling | backprop | backprop + per-layer remat |",
        "|---|---|---|",
        f"| model's max-pool | {found[False, 'flax']} | {found[True, 'flax']} |",
        f"| reshape + max | {found[False, 'reshape']} | {found[True, 'reshape']} |",
      ]
      results["remat"] = {
        "memory": memory,
        "batch_at_spsa_memory": {str(k): v for k, v in found.items()},
      }
      # Remat changes no value (checked in memory_row), nor does the pooling's spelling, so a
      # backprop run at that batch has the remat run's accuracy.
      methods = [
        _study.Method(
          f"backprop at sign-m-SPSA's memory, batch {b}, lr 0.05",
          method="backprop",
          learning_rate=0.05,
          steps=args.steps,
          batch_size=b,
        )
        for b in sorted({b for b in found.values() if b}, reverse=True)
      ]
      run_group("remat_accuracy", [*methods, backprop])
      sections.append(("remat", "\n".join(lines)))
      (workdir / "results.json").write_text(json.dumps(results, default=str))
      log("remat: " + "\n".join(lines))
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
