"""TinyLUT study: train small LUT networks, convert them to tables, adapt the tables with SPSA.

Tasks (issue 13): ×2 / ×4 bicubic super-resolution and Gaussian denoising (σ = 15), trained by
backprop on crops of scikit-image's sample photographs (`TRAIN`), measured on held-out ones
(`TEST`): PSNR / SSIM on the Y channel of the float network, its int8 tables and, for the
denoiser, the tables adapted to σ = 25 on crops of other images (`ADAPT`) with sign-SPSA on the
integer entries (forward calls only; ε = 1 table step, stochastic rounding of the updates)
against fine-tuning the float network by backprop and against no adaptation. Also: the
authors' published ×4 tables (`--authors_dir`), storage bytes, CPU latency, a crop figure.

Usage (about 15 min on 2 shared cores):
  python scripts/tinylut_study.py --out results/tinylut.json \
    --authors_dir /path/to/TinyLUT/TinyLUT_LUT
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import skimage.data
import skimage.transform

import fgjax
import fgjax.lut as lut_lib

TRAIN = ("camera", "coffee", "rocket", "brick", "gravel", "grass")
ADAPT = ("chelsea", "immunohistochemistry")
TEST = ("astronaut", "coins", "moon", "page")
TEST_CROP = 192


def image(name: str) -> np.ndarray:
  img = np.asarray(getattr(skimage.data, name)())
  return img[..., :3] if img.ndim == 3 else img


def gray(name: str) -> np.ndarray:
  return np.clip(np.round(lut_lib.rgb_to_y(image(name))), 0, 255).astype(np.uint8)


def test_image(name: str) -> np.ndarray:
  img = image(name)
  h, w = img.shape[:2]
  top, left = max(0, (h - TEST_CROP) // 2), max(0, (w - TEST_CROP) // 2)
  return img[top : top + TEST_CROP, left : left + TEST_CROP]


class Patches:
  """Random aligned (input, target) crops of a task from a set of gray images."""

  def __init__(self, names, task):
    self.task = task
    self.clean = [gray(n) for n in names]
    s = task["upscale"]
    self.low = [lut_lib.bicubic_downscale(c, s) if s > 1 else c for c in self.clean]

  def batch(self, rng, size, patch, sigma=None):
    s = self.task["upscale"]
    xs, ys = [], []
    for _ in range(size):
      k = rng.integers(len(self.clean))
      low, clean = self.low[k], self.clean[k]
      i, j = rng.integers(low.shape[0] - patch), rng.integers(low.shape[1] - patch)
      target = clean[s * i : s * (i + patch), s * j : s * (j + patch)]
      x = low[i : i + patch, j : j + patch]
      if s == 1:
        x = lut_lib.add_gaussian_noise(x, sigma or self.task["sigma"], int(rng.integers(2**31)))
      xs.append(lut_lib.to_pixels(x))
      ys.append(target.astype(np.float32) - 128.0)
    return jnp.asarray(np.stack(xs)), jnp.asarray(np.stack(ys))


def mse(prediction, target):
  return jnp.mean((prediction.astype(jnp.float32) - target) ** 2)


def train_float(task, seed, steps, batch, patch, lr=2e-3):
  net = lut_lib.TinyLUTNet(upscale=task["upscale"], channels=task["channels"], hidden=32)
  data = Patches(TRAIN, task)
  rng = np.random.default_rng(seed)
  x, _ = data.batch(rng, batch, patch)
  variables = net.init(jax.random.key(seed), x)
  opt = optax.adam(optax.cosine_decay_schedule(lr, steps, 0.1))
  state = opt.init(variables)

  @jax.jit
  def step(variables, state, x, y):
    loss, grads = jax.value_and_grad(lambda v: mse(net.apply(v, x), y))(variables)
    updates, state = opt.update(grads, state, variables)
    return optax.apply_updates(variables, updates), state, loss

  for i in range(steps):
    x, y = data.batch(rng, batch, patch)
    variables, state, loss = step(variables, state, x, y)
    if i % 200 == 0 or i == steps - 1:
      print(f"  {task['name']} seed {seed} step {i} mse {float(loss):.2f}", flush=True)
  return net, variables


def evaluate(predict, task, sigma=None):
  """Mean PSNR / SSIM (Y) over TEST; `predict(int32 (B, H, W)) -> int (B, sH, sW)`."""
  s = task["upscale"]
  psnrs, ssims = [], []
  for k, name in enumerate(TEST):
    hr = test_image(name)
    if s == 1:  # denoising on the Y channel, fixed noise per image
      clean = np.clip(np.round(lut_lib.rgb_to_y(hr)), 0, 255).astype(np.uint8)
      noisy = lut_lib.add_gaussian_noise(clean, sigma or task["sigma"], 1000 + k)
      out = lut_lib.from_pixels(predict(jnp.asarray(lut_lib.to_pixels(noisy))[None])[0])
      target = clean
    else:
      low = lut_lib.bicubic_downscale(hr, s)
      channels = low[..., None] if low.ndim == 2 else low
      pixels = jnp.asarray(lut_lib.to_pixels(np.moveaxis(channels, -1, 0)))
      out = np.moveaxis(lut_lib.from_pixels(predict(pixels)), 0, -1)
      out = out[..., 0] if low.ndim == 2 else out
      target = hr[: out.shape[0], : out.shape[1]]
    psnrs.append(lut_lib.psnr_y(out, target, s if s > 1 else 0))
    ssims.append(lut_lib.ssim_y(out, target, s if s > 1 else 0))
  return float(np.mean(psnrs)), float(np.mean(ssims))


def bicubic_baseline(task):
  s = task["upscale"]

  def predict(pixels):
    low = np.asarray(pixels, np.float64) + 128
    shape = (low.shape[0], low.shape[1] * s, low.shape[2] * s)
    up = skimage.transform.resize(low, shape, order=3, preserve_range=True)
    return np.clip(np.round(up), 0, 255).astype(np.int32) - 128

  return evaluate(predict, task)


def spsa_adapt(lut, task, sigma, seed, steps, batch, patch, directions, lr):
  """Sign-SPSA on the int8 table entries (ε = 1 entry, Rademacher, stochastic rounding)."""
  data = Patches(ADAPT, task)
  rng = np.random.default_rng(100 + seed)
  scales = {path: 1.0 for path in fgjax.leaf_paths(lut.tables)}  # ε and lr in table units
  est = fgjax.estimators.spsa(
    directions, epsilon=1.0, sign=True, distribution="rademacher", scales=scales
  )
  opt = fgjax.integer_optimizer(
    optax.chain(fgjax.forward_gradient(est, seed=seed), optax.sgd(lr)),
    scales=scales,
    rounding="stochastic",
    seed=seed,
  )

  def loss(tables, x, y):
    return mse(lut_lib.lut_apply(lut.replace(tables=tables), x), y)

  @jax.jit
  def step(tables, state, x, y):
    updates, state = opt.update(tables, state, tables, value_fn=lambda t: loss(t, x, y))
    return fgjax.apply_integer_updates(tables, updates), state

  tables = lut.tables
  state = opt.init(tables)
  losses = []
  for i in range(steps):
    x, y = data.batch(rng, batch, patch, sigma)
    if i % 100 == 0:
      losses.append(float(loss(tables, x, y)))
    tables, state = step(tables, state, x, y)
  return lut.replace(tables=tables), losses


def backprop_adapt(net, variables, task, sigma, seed, steps, batch, patch, lr=5e-4):
  data = Patches(ADAPT, task)
  rng = np.random.default_rng(100 + seed)
  opt = optax.adam(lr)
  state = opt.init(variables)

  @jax.jit
  def step(variables, state, x, y):
    grads = jax.grad(lambda v: mse(net.apply(v, x), y))(variables)
    updates, state = opt.update(grads, state, variables)
    return optax.apply_updates(variables, updates), state

  for _ in range(steps):
    x, y = data.batch(rng, batch, patch, sigma)
    variables, state = step(variables, state, x, y)
  return variables


def latency(fn, x, repeats=5):
  fn(x).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn(x).block_until_ready()
    times.append(time.perf_counter() - start)
  return min(times) * 1e3


def mean_std(values):
  return [float(np.mean(values)), float(np.std(values))]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="results/tinylut.json")
  parser.add_argument("--figure", default="docs/figures/tinylut_crops.png")
  parser.add_argument("--authors_dir", default=None, help="the authors' TinyLUT_LUT folder")
  parser.add_argument("--tasks", default="sr2,denoise15,sr4")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--patch", type=int, default=24)
  parser.add_argument("--adapt_sigma", type=float, default=25.0)
  parser.add_argument("--adapt_steps", type=int, default=300)
  parser.add_argument("--spsa_directions", type=int, default=4)
  parser.add_argument("--spsa_lr", type=float, default=0.2)
  args = parser.parse_args()
  tasks = {
    "sr2": {"name": "sr2", "upscale": 2, "channels": 8},
    "sr4": {"name": "sr4", "upscale": 4, "channels": 8},
    "denoise15": {"name": "denoise15", "upscale": 1, "channels": 8, "sigma": 15.0},
  }
  results = {"config": vars(args), "tasks": {}}
  example = {}
  for name in args.tasks.split(","):
    task = tasks[name]
    rows = {"float": [], "tables": [], "bytes": None}
    for seed in range(args.seeds):
      net, variables = train_float(task, seed, args.steps, args.batch, args.patch)
      lut = lut_lib.convert(variables, net)
      float_fn = jax.jit(lambda x, v=variables, n=net: n.apply(v, x, mode="per_pixel"))
      lut_fn = jax.jit(lambda x, t=lut: lut_lib.lut_apply(t, x))
      rows["float"].append(evaluate(float_fn, task))
      rows["tables"].append(evaluate(lut_fn, task))
      print(
        f"{name} seed {seed}: float {rows['float'][-1]} tables {rows['tables'][-1]}", flush=True
      )
      if seed == 0:
        probe = jnp.asarray(lut_lib.to_pixels(gray("astronaut")[:128, :128]))[None]
        rows["latency_ms"] = {
          "float_per_pixel": latency(float_fn, probe),
          "float_tabulated": latency(jax.jit(lambda x, v=variables, n=net: n.apply(v, x)), probe),
          "tables": latency(lut_fn, probe),
          "input": list(probe.shape),
        }
        rows["bytes"] = {
          "tables": lut_lib.table_bytes(lut, include_requant=False),
          "tables_and_requant": lut_lib.table_bytes(lut),
          "float_network": lut_lib.float_network_bytes(variables),
          "naive_9d_8bit": lut_lib.naive_lut_bytes(9, task["upscale"]),
          "srlut_4d_4bit_sampled": lut_lib.naive_lut_bytes(4, task["upscale"], sampling_bits=4),
        }
        example[name] = (net, variables, lut)
    for key in ("float", "tables"):
      rows[key] = {
        "psnr": mean_std([r[0] for r in rows[key]]),
        "ssim": mean_std([r[1] for r in rows[key]]),
      }
    if task["upscale"] > 1:
      rows["bicubic"] = bicubic_baseline(task)
    else:
      rows["noisy_input"] = evaluate(lambda x: x, task)
    results["tasks"][name] = rows
    print(json.dumps({name: rows}), flush=True)

  if "denoise15" in example:
    task = tasks["denoise15"]
    sigma = args.adapt_sigma
    net, variables, lut = example["denoise15"]
    adapt = {"sigma": sigma, "steps": args.adapt_steps, "directions": args.spsa_directions}
    lut_fn = jax.jit(lambda x, t: lut_lib.lut_apply(t, x))
    adapt["none"] = evaluate(lambda x: lut_fn(x, lut), task, sigma)
    adapt["noisy_input"] = evaluate(lambda x: x, task, sigma)
    spsa_rows, bp_rows, curves = [], [], []
    for seed in range(args.seeds):
      adapted, losses = spsa_adapt(
        lut, task, sigma, seed, args.adapt_steps, args.batch, 32, args.spsa_directions, args.spsa_lr
      )
      spsa_rows.append(evaluate(lambda x, a=adapted: lut_fn(x, a), task, sigma))
      curves.append(losses)
      tuned = backprop_adapt(net, variables, task, sigma, seed, args.adapt_steps, args.batch, 32)
      bp_lut = lut_lib.convert(tuned, net)
      bp_rows.append(evaluate(lambda x, a=bp_lut: lut_fn(x, a), task, sigma))
      print(
        f"adapt seed {seed}: spsa {spsa_rows[-1]} backprop {bp_rows[-1]} loss {losses}", flush=True
      )
      if seed == 0:
        example["adapted"] = adapted
    adapt["spsa_tables"] = {
      "psnr": mean_std([r[0] for r in spsa_rows]),
      "ssim": mean_std([r[1] for r in spsa_rows]),
      "train_mse_every_100": curves,
      "forward_calls_per_step": 2 * args.spsa_directions,
    }
    adapt["backprop_float_then_tables"] = {
      "psnr": mean_std([r[0] for r in bp_rows]),
      "ssim": mean_std([r[1] for r in bp_rows]),
    }
    results["adaptation"] = adapt
    print(json.dumps({"adaptation": adapt}), flush=True)

  if args.authors_dir:
    authors = lut_lib.load_authors_tables(args.authors_dir)
    fn = jax.jit(lambda x: lut_lib.lut_apply(authors, x))
    results["authors_x4"] = {
      "tables": evaluate(fn, tasks["sr4"]),
      "bicubic": bicubic_baseline(tasks["sr4"]),
      "bytes": lut_lib.table_bytes(authors, include_requant=False),
    }
    print(json.dumps({"authors_x4": results["authors_x4"]}), flush=True)

  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.out).write_text(json.dumps(results, indent=1))
  if args.figure and example:
    write_figure(example, tasks, args.adapt_sigma, args.figure)


def write_figure(example, tasks, sigma, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  hr = np.clip(np.round(lut_lib.rgb_to_y(test_image("astronaut"))), 0, 255).astype(np.uint8)
  crop = hr[40:136, 40:136]
  rows = []
  for name in ("sr2", "sr4"):
    if name in example:
      s = tasks[name]["upscale"]
      low = lut_lib.bicubic_downscale(crop, s)
      out = lut_lib.lut_apply(example[name][2], jnp.asarray(lut_lib.to_pixels(low)))
      rows.append(
        (
          f"×{s} input (nearest)",
          np.kron(low, np.ones((s, s), np.uint8)),
          f"×{s} tables",
          lut_lib.from_pixels(out),
        )
      )
  if "denoise15" in example:
    noisy = lut_lib.add_gaussian_noise(crop, sigma, 7)
    lut = example["denoise15"][2]
    out = lut_lib.lut_apply(lut, jnp.asarray(lut_lib.to_pixels(noisy)))
    extra = ("σ=15 tables", lut_lib.from_pixels(out))
    if "adapted" in example:
      out = lut_lib.lut_apply(example["adapted"], jnp.asarray(lut_lib.to_pixels(noisy)))
      extra = extra + (f"SPSA-adapted to σ={sigma:g}", lut_lib.from_pixels(out))
    rows.append((f"σ={sigma:g} input", noisy) + extra)
  columns = max(len(r) // 2 for r in rows) + 1
  fig, axes = plt.subplots(len(rows), columns, figsize=(2.2 * columns, 2.3 * len(rows)), dpi=80)
  axes = np.atleast_2d(axes)
  for r, row in enumerate(rows):
    panels = list(zip(row[::2], row[1::2], strict=True)) + [("target", crop)]
    for c in range(columns):
      ax = axes[r, c]
      ax.axis("off")
      if c < len(panels):
        ax.imshow(panels[c][1], cmap="gray", vmin=0, vmax=255)
        ax.set_title(panels[c][0], fontsize=8)
  fig.tight_layout()
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
