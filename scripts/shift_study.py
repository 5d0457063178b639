"""Domain shift: corruptions (MNIST-C / CIFAR-10-C style) and FSDD speakers, full vs partial, m.

For each seed: pretrain in float by backprop on the clean source domain, then adapt to a shifted
target domain from a few labelled examples per class, and test on the rest of the target domain.
- images (`--image_sources digits[,mnist]`): each corruption of `fgjax.data.corrupt` at
  `--severity`, applied to the target part of the data (disjoint from the source part);
- FSDD speakers: pretrain on five speakers, adapt to the sixth, every speaker as target in turn;
  cheap features (mean and std over time of a 40-band log-mel spectrogram) and an MLP.
Methods: zero-shot, backprop (float32, full), sign-m-SPSA with m = 1 and m = 3 (full), and with
m = 3 on the last layers only (`last_k`) and on the head only (linear probe). All in float32
weights (the fixed-point comparison is in ablations.py). Mean ± std over the seeds.

  python scripts/shift_study.py --seeds=0,1,2 --out=docs/results/shift.md
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import _study  # noqa: E402

from fgjax import data as fdata  # noqa: E402
from fgjax import models  # noqa: E402

IMAGE_CORRUPTIONS = (
  "gaussian_noise",
  "impulse_noise",
  "gaussian_blur",
  "motion_blur",
  "contrast",
  "rotate",
  "shear",
  "elastic",
)


def methods(steps: int, lr: float, backprop_lr: float, last_k: int) -> list[_study.Method]:
  common = {"steps": steps, "learning_rate": lr, "epsilon": 1e-3}
  return [
    _study.Method("backprop", method="backprop", steps=steps, learning_rate=backprop_lr),
    _study.Method("sign-m-SPSA m=1", num_directions=1, **common),
    _study.Method("sign-m-SPSA m=3", num_directions=3, **common),
    _study.Method(
      f"sign-m-SPSA m=3, last {last_k}",
      num_directions=3,
      trainable="last_k",
      last_k=last_k,
      **common,
    ),
    _study.Method("sign-m-SPSA m=3, head", num_directions=3, trainable="linear_probe", **common),
  ]


def image_data(source: str):
  if source == "digits":
    d = fdata.digits()
  else:
    d = fdata.mnist_idx(os.path.join(os.environ.get("FGJAX_DATA_DIR", ""), "mnist"))
  x = np.asarray(d.x, np.float32)
  if x.ndim == 3:
    x = x[..., None]
  return x, np.asarray(d.y, np.int32)


def split(x, y, seed: int, shots: int, source_fraction: float):
  """Source train/test (clean) and target few-shot/test indices, by seed."""
  order = np.random.default_rng([seed, 11]).permutation(len(y))
  num_source = int(source_fraction * len(y))
  source, target = order[:num_source], order[num_source:]
  source_test, source_train = source[: num_source // 5], source[num_source // 5 :]
  chosen = np.concatenate([target[y[target] == c][:shots] for c in range(10)])
  rest = np.setdiff1d(target, chosen)
  return source_train, source_test, chosen, rest


def image_study(source: str, seeds, corruptions, severity, steps, lr, backprop_lr, log):
  x, y = image_data(source)
  side = x.shape[1]
  kwargs = {"features": (16, 32), "hidden": 64}
  model_fn = lambda quant: models.get_model("small_cnn", num_classes=10, quant=quant, **kwargs)
  float_model = model_fn(None)
  runs = methods(steps, lr, backprop_lr, last_k=2)
  adapters = [_study.Adapter(model_fn, m) for m in runs]
  rows = {}
  pretrain_steps = 600 if side <= 8 else 1500
  fraction = 0.6 if side <= 8 else 0.8
  for seed in seeds:
    src_train, src_test, chosen, rest = split(x, y, seed, 10, fraction)
    start = time.time()
    variables = _study.pretrain(
      float_model, x[src_train], y[src_train], steps=pretrain_steps, seed=seed
    )
    clean = _study.accuracy(float_model, variables, x[src_test], y[src_test])
    log(f"{source} seed {seed}: pretrained in {time.time() - start:.0f} s, source test {clean:.3f}")
    for corruption in corruptions:
      shifted = fdata.corrupt(x[np.concatenate([chosen, rest])], corruption, severity, seed=seed)
      xa, xt = shifted[: len(chosen)], shifted[len(chosen) :]
      ya, yt = y[chosen], y[rest]
      zero = _study.accuracy(float_model, variables, xt, yt)
      rows.setdefault((source, corruption, "zero-shot"), []).append(zero)
      for method, adapter in zip(runs, adapters, strict=True):
        acc = adapter(variables, xa, ya, xt, yt, seed)["adapted"]
        rows.setdefault((source, corruption, method.name), []).append(acc)
      log(
        f"  {corruption}: zero-shot {zero:.3f}, "
        + ", ".join(f"{m.name} {rows[(source, corruption, m.name)][-1]:.3f}" for m in runs)
      )
  return rows, ["zero-shot", *[m.name for m in runs]]


def fsdd_features(cache: pathlib.Path):
  if cache.exists():
    z = np.load(cache)
    return z["x"], z["y"], z["speakers"]
  d = fdata.fsdd()
  mels = fdata.log_mel_spectrogram(np.asarray(d.x))  # (N, frames, mels)
  x = np.concatenate([mels.mean(1), mels.std(1)], -1).astype(np.float32)
  cache.parent.mkdir(parents=True, exist_ok=True)
  np.savez(cache, x=x, y=np.asarray(d.y), speakers=np.asarray(d.speakers))
  return x, np.asarray(d.y, np.int32), np.asarray(d.speakers)


def fsdd_study(seeds, steps, lr, backprop_lr, cache, log):
  x, y, speakers = fsdd_features(cache)
  y = y.astype(np.int32)
  model_fn = lambda quant: models.get_model("mlp", num_classes=10, quant=quant, hidden_sizes=(64,))
  float_model = model_fn(None)
  runs = methods(steps, lr, backprop_lr, last_k=1)
  adapters = [_study.Adapter(model_fn, m) for m in runs]
  rows = {}
  for target in sorted(set(speakers.tolist())):
    for seed in seeds:
      source = np.flatnonzero(speakers != target)
      tgt = np.flatnonzero(speakers == target)
      order = np.random.default_rng([seed, 13]).permutation(len(source))
      source = source[order]
      mean, std = x[source].mean(0), x[source].std(0) + 1e-6
      xs = (x - mean) / std
      variables = _study.pretrain(float_model, xs[source], y[source], steps=1000, seed=seed)
      rng = np.random.default_rng([seed, 17])
      chosen = np.concatenate([rng.permutation(tgt[y[tgt] == c])[:5] for c in range(10)])
      rest = np.setdiff1d(tgt, chosen)
      zero = _study.accuracy(float_model, variables, xs[rest], y[rest])
      rows.setdefault(("fsdd", target, "zero-shot"), []).append(zero)
      for method, adapter in zip(runs, adapters, strict=True):
        acc = adapter(variables, xs[chosen], y[chosen], xs[rest], y[rest], seed)["adapted"]
        rows.setdefault(("fsdd", target, method.name), []).append(acc)
      log(
        f"fsdd {target} seed {seed}: zero-shot {zero:.3f}, "
        + ", ".join(f"{m.name} {rows[('fsdd', target, m.name)][-1]:.3f}" for m in runs)
      )
  return rows, ["zero-shot", *[m.name for m in runs]]


def table(rows, columns, first: str) -> str:
  groups = sorted(
    {k[:2] for k in rows}, key=lambda k: list(dict.fromkeys(r[:2] for r in rows)).index(k)
  )
  lines = [f"| {first} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
  means = {c: [] for c in columns}
  for group in groups:
    cells = []
    for column in columns:
      values = rows.get((*group, column), [])
      cells.append(_study.mean_std(values))
      if values:
        means[column].append(float(np.mean(values)))
    lines.append(f"| {group[1]} | " + " | ".join(cells) + " |")
  lines.append(
    "| **mean over rows** | "
    + " | ".join(f"**{100 * np.mean(means[c]):.1f}**" if means[c] else "-" for c in columns)
    + " |"
  )
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--image_sources", default="digits")
  parser.add_argument("--corruptions", default=",".join(IMAGE_CORRUPTIONS))
  parser.add_argument("--severity", type=int, default=3)
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--lr", type=float, default=0.01, help="sign-m-SPSA learning rate")
  parser.add_argument("--backprop_lr", type=float, default=0.05)
  parser.add_argument("--fsdd", type=int, default=1)
  parser.add_argument("--workdir", default="/tmp/fgjax_shift")
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  workdir = pathlib.Path(args.workdir)
  log = _study.progress_log(workdir)

  sections = []
  command = "python scripts/shift_study.py " + " ".join(sys.argv[1:])
  for source in filter(None, args.image_sources.split(",")):
    rows, columns = image_study(
      source,
      seeds,
      args.corruptions.split(","),
      args.severity,
      args.steps,
      args.lr,
      args.backprop_lr,
      log,
    )
    (workdir / f"{source}.json").write_text(json.dumps({"/".join(k): v for k, v in rows.items()}))
    sections.append(
      (f"{source}, corruptions at severity {args.severity}", table(rows, columns, "corruption"))
    )
  if args.fsdd:
    rows, columns = fsdd_study(
      seeds, args.steps, args.lr, args.backprop_lr, workdir / "fsdd_features.npz", log
    )
    (workdir / "fsdd.json").write_text(json.dumps({"/".join(k): v for k, v in rows.items()}))
    sections.append(("FSDD, every speaker as target", table(rows, columns, "target speaker")))
  text = "\n\n".join(f"### {title}\n\n{body}" for title, body in sections)
  print(text)
  (workdir / "tables.md").write_text(f"Command: `{command}`\n\n{text}\n")
  if args.out:
    pathlib.Path(args.out).write_text(f"Command: `{command}`\n\n{text}\n")


if __name__ == "__main__":
  os.environ.setdefault(
    "FGJAX_DATA_DIR", str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "data")
  )
  main()
