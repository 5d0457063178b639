"""TinyLUT study: train small LUT networks, convert them to tables, adapt the tables with SPSA.

Tasks (issue 13): ×2 / ×4 bicubic super-resolution and Gaussian denoising (σ = 15), trained by
backprop on crops of scikit-image's sample photographs (`TRAIN`), measured on held-out ones
(`TEST`): PSNR / SSIM on the Y channel of the float network, its int8 tables and, for the
denoiser, the tables adapted to σ = 25 on crops of other images (`ADAPT`) with sign-SPSA on the
integer entries (forward calls only; ε = 1 table step, stochastic rounding of the updates)
against fine-tuning the float network by backprop and against no adaptation. Also: the
authors' published ×4 tables (`--authors_dir`), storage bytes, CPU latency, a crop figure.

Usage (the runs behind docs/tinylut.md, in this order: ×2 super-resolution and the authors' ×4
tables, then denoising and its adaptation; the figure takes the ×2 networks from the cache):
  python scripts/tinylut_study.py --out results/tinylut_sr2.json --cache_dir results/cache \
    --tasks sr2 --seeds 3 --steps 201 --figure "" --authors_dir /path/to/TinyLUT/TinyLUT_LUT
  python scripts/tinylut_study.py --out results/tinylut.json --cache_dir results/cache \
    --tasks denoise15 --seeds 3 --steps 201 --adapt_steps 150 --spsa_stages up
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import skimage.data
import skimage.transform

import fgjax
import fgjax.lut as lut_lib
from fgjax.lut._tables import STAGES

TRAIN = ("camera", "coffee", "rocket", "brick", "gravel", "grass")
ADAPT = ("chelsea", "immunohistochemistry")
# Held out. Not `moon`: its centre crop is flat (nearest ×2 upsampling scores 61 dB there), so it
# would dominate every mean.
TEST = ("astronaut", "coins", "page", "motorcycle")
TEST_CROP = 192


def image(name: str) -> np.ndarray:
  if name == "motorcycle":
    img = np.asarray(skimage.data.stereo_motorcycle()[0])
  else:
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


_COMPILED = {}


def compiled(key, make):
  """One jitted function per key: the seeds of a task share their compilations."""
  if key not in _COMPILED:
    _COMPILED[key] = make()
  return _COMPILED[key]


def backprop_step(net, opt, key):
  """A jitted Adam step on the MSE of `net`'s (tabulated) forward, shared under `key`."""

  def make():
    @jax.jit
    def step(variables, state, x, y):
      loss, grads = jax.value_and_grad(lambda v: mse(net.apply(v, x), y))(variables)
      updates, state = opt.update(grads, state, variables)
      return optax.apply_updates(variables, updates), state, loss

    return step

  return compiled(key, make)


def cache_name(task, seed, steps, batch, patch):
  return f"{task['name']}_seed{seed}_steps{steps}_b{batch}_p{patch}.msgpack"


def cache_path(args, task, seed):
  return pathlib.Path(args.cache_dir) / cache_name(task, seed, args.steps, args.batch, args.patch)


def train_float(task, seed, steps, batch, patch, lr=2e-3, cache_dir=None):
  """Backprop training of the network (its tabulated forward); cached in `cache_dir` if given."""
  net = lut_lib.TinyLUTNet(upscale=task["upscale"], channels=task["channels"], hidden=32)
  data = Patches(TRAIN, task)
  rng = np.random.default_rng(seed)
  x, _ = data.batch(rng, batch, patch)
  init = compiled(("init", task["name"]), lambda: jax.jit(net.init))
  variables = init(jax.random.key(seed), x)
  cache = None
  if cache_dir:
    cache = pathlib.Path(cache_dir) / cache_name(task, seed, steps, batch, patch)
    if cache.exists():
      return net, flax.serialization.from_bytes(variables, cache.read_bytes())
  opt = optax.adam(optax.cosine_decay_schedule(lr, steps, 0.1))
  state = opt.init(variables)
  step = backprop_step(net, opt, ("train", task["name"], steps, lr))
  for i in range(steps):
    x, y = data.batch(rng, batch, patch)
    variables, state, loss = step(variables, state, x, y)
    if i % 200 == 0 or i == steps - 1:
      print(
        f"  {task['name']} seed {seed} step {i} mse {float(loss):.2f} "
        f"cpu {time.process_time():.0f}s",
        flush=True,
      )
  if cache is not None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(flax.serialization.to_bytes(variables))
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


def spsa_adapt(lut, task, sigma, seed, steps, batch, patch, directions, lr, stages=STAGES):
  """Sign-SPSA on the int8 entries of the `stages` tables (ε = 1 entry, Rademacher, stochastic
  rounding of the update `lr · sign(ĝ)`), the other tables frozen; forward calls only.

  Returns the adapted tables and the loss on a fixed batch of the new task every 25 steps.
  """
  data = Patches(ADAPT, task)
  rng = np.random.default_rng(100 + seed)
  x_val, y_val = data.batch(np.random.default_rng(999), 2 * batch, patch, sigma)

  def merge(trainable):
    return {b: dict(lut.tables[b], **trainable[b]) for b in lut.tables}

  trainable = {b: {k: lut.tables[b][k] for k in stages} for b in lut.tables}
  scales = {path: 1.0 for path in fgjax.leaf_paths(trainable)}  # ε and lr in table units
  est = fgjax.estimators.spsa(
    directions, epsilon=1.0, sign=True, distribution="rademacher", scales=scales
  )
  opt = fgjax.integer_optimizer(
    optax.chain(fgjax.forward_gradient(est, seed=seed), optax.sgd(lr)),
    scales=scales,
    rounding="stochastic",
    seed=seed,
  )

  def loss(trainable, x, y):
    return mse(lut_lib.lut_apply(lut.replace(tables=merge(trainable)), x), y)

  @jax.jit
  def step(trainable, state, x, y):
    updates, state = opt.update(trainable, state, trainable, value_fn=lambda t: loss(t, x, y))
    return fgjax.apply_integer_updates(trainable, updates), state

  val_loss = jax.jit(loss)  # the batch is an argument: as a constant, XLA would fold the gathers
  state = opt.init(trainable)
  losses = []
  for i in range(steps):
    if i % 25 == 0:
      losses.append(round(float(val_loss(trainable, x_val, y_val)), 2))
    x, y = data.batch(rng, batch, patch, sigma)
    trainable, state = step(trainable, state, x, y)
  losses.append(round(float(val_loss(trainable, x_val, y_val)), 2))
  return lut.replace(tables=merge(trainable)), losses


def backprop_adapt(net, variables, task, sigma, seed, steps, batch, patch, lr=5e-4):
  data = Patches(ADAPT, task)
  rng = np.random.default_rng(100 + seed)
  opt = optax.adam(lr)
  state = opt.init(variables)
  step = backprop_step(net, opt, ("adapt", task["name"], lr))
  for _ in range(steps):
    x, y = data.batch(rng, batch, patch, sigma)
    variables, state, _ = step(variables, state, x, y)
  return variables


def latency(fn, x, repeats=3):
  fn(x).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn(x).block_until_ready()
    times.append(time.perf_counter() - start)
  return min(times) * 1e3


def mean_std(values):
  return [float(np.mean(values)), float(np.std(values))]


def psnr_ssim(rows):
  return {"psnr": mean_std([r[0] for r in rows]), "ssim": mean_std([r[1] for r in rows])}


def storage(lut, variables, upscale):
  return {
    "tables": lut_lib.table_bytes(lut, include_requant=False),
    "tables_and_requant": lut_lib.table_bytes(lut),
    "float_network": lut_lib.float_network_bytes(variables),
    # A non-separable table on the same 3×3 window (9 pixels), full 8 bits or 4-bit sampled.
    "naive_9d_8bit": lut_lib.naive_lut_bytes(9, upscale),
    "naive_9d_4bit_sampled": lut_lib.naive_lut_bytes(9, upscale, sampling_bits=4),
    # SR-LUT's 2×2 window (4-D, 4-bit sampled), for reference.
    "srlut_4d_4bit_sampled": lut_lib.naive_lut_bytes(4, upscale, sampling_bits=4),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="results/tinylut.json")
  parser.add_argument("--figure", default="docs/figures/tinylut_crops.png")
  parser.add_argument("--authors_dir", default=None, help="the authors' TinyLUT_LUT folder")
  parser.add_argument("--cache_dir", default=None, help="keeps trained networks between runs")
  parser.add_argument("--tasks", default="sr2,denoise15,sr4")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--patch", type=int, default=24)
  parser.add_argument("--adapt_sigma", type=float, default=25.0)
  parser.add_argument("--adapt_steps", type=int, default=300)
  parser.add_argument("--spsa_directions", type=int, default=4)
  parser.add_argument("--spsa_lr", type=float, default=0.2)
  parser.add_argument(
    "--spsa_stages",
    default="up",
    help="the tables SPSA adapts (of depth,point,up), variants separated by ';'",
  )
  args = parser.parse_args()
  tasks = {
    "sr2": {"name": "sr2", "upscale": 2, "channels": 8},
    "sr4": {"name": "sr4", "upscale": 4, "channels": 8},
    "denoise15": {"name": "denoise15", "upscale": 1, "channels": 8, "sigma": 15.0},
  }
  results = {"config": vars(args), "tasks": {}}
  example, trained = {}, {}
  lut_fn = jax.jit(lambda x, t: lut_lib.lut_apply(t, x))
  for name in args.tasks.split(","):
    task = tasks[name]
    rows = {"tables": []}
    for seed in range(args.seeds):
      net, variables = train_float(
        task, seed, args.steps, args.batch, args.patch, cache_dir=args.cache_dir
      )
      trained.setdefault(name, []).append((net, variables))
      lut = lut_lib.convert(variables, net)
      rows["tables"].append(evaluate(lambda x, t=lut: lut_fn(x, t), task))
      print(f"{name} seed {seed}: tables {rows['tables'][-1]} cpu {time.process_time():.0f}s")
      if seed == 0:
        probe = jnp.asarray(lut_lib.to_pixels(gray("astronaut")[:128, :128]))[None]
        # The network's own forward (float parameters, tabulated as in training) and the
        # ordinary per-pixel float network: the tables compute the first exactly (tests/lut).
        # Parameters and tables are arguments, not constants that XLA could fold.
        tabulated = jax.jit(lambda x, v, n=net: n.apply(v, x))
        per_pixel = jax.jit(lambda x, v, n=net: n.apply(v, x, mode="per_pixel"))
        table_out = np.asarray(lut_fn(probe, lut))
        rows["network_equals_tables_on_probe"] = {
          "tabulated": bool(np.array_equal(np.asarray(tabulated(probe, variables)), table_out)),
          "per_pixel_fraction": float(
            np.mean(np.asarray(per_pixel(probe, variables)) == table_out)
          ),
        }
        rows["latency_ms"] = {
          "float_per_pixel": latency(lambda x, v=variables, f=per_pixel: f(x, v), probe),
          "float_tabulated": latency(lambda x, v=variables, f=tabulated: f(x, v), probe),
          "tables": latency(lambda x, t=lut: lut_fn(x, t), probe),
          "input": list(probe.shape),
        }
        rows["bytes"] = storage(lut, variables, task["upscale"])
        example[name] = (net, variables, lut)
    rows["tables"] = psnr_ssim(rows["tables"])
    if task["upscale"] > 1:
      rows["bicubic"] = bicubic_baseline(task)
    else:
      rows["noisy_input"] = evaluate(lambda x: x, task)
    results["tasks"][name] = rows
    print(json.dumps({name: rows}), flush=True)

  if "denoise15" in example:
    results["adaptation"] = adapt_denoiser(
      args, tasks["denoise15"], lut_fn, trained["denoise15"], example
    )

  if args.authors_dir:
    authors = lut_lib.load_authors_tables(args.authors_dir)
    probe = jnp.asarray(lut_lib.to_pixels(gray("astronaut")[:128, :128]))[None]
    results["authors_x4"] = {
      "tables": evaluate(lambda x: lut_fn(x, authors), tasks["sr4"]),
      "bicubic": bicubic_baseline(tasks["sr4"]),
      "bytes": lut_lib.table_bytes(authors, include_requant=False),
      "tables_and_requant": lut_lib.table_bytes(authors),
      "latency_ms": latency(lambda x: lut_fn(x, authors), probe),
    }
    print(json.dumps({"authors_x4": results["authors_x4"]}), flush=True)

  results["cpu_seconds"] = time.process_time()
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.out).write_text(json.dumps(results, indent=1))
  if args.figure and example:
    for name in ("sr2", "sr4"):  # SR rows of the figure from another run's cached networks
      if name not in example and args.cache_dir and cache_path(args, tasks[name], 0).exists():
        net, variables = train_float(
          tasks[name], 0, args.steps, args.batch, args.patch, cache_dir=args.cache_dir
        )
        example[name] = (net, variables, lut_lib.convert(variables, net))
    write_figure(example, tasks, args.adapt_sigma, args.figure)


def adapt_denoiser(args, task, lut_fn, trained, example):
  """σ = 15 denoisers (seeds) adapted to σ = `adapt_sigma`: none / SPSA on tables / backprop."""
  sigma = args.adapt_sigma
  adapt = {
    "sigma": sigma,
    "steps": args.adapt_steps,
    "directions": args.spsa_directions,
    "spsa_forward_calls_per_step": 2 * args.spsa_directions,
    "noisy_input": evaluate(lambda x: x, task, sigma),
  }
  variants = args.spsa_stages.split(";")
  none_rows, bp_rows = [], []
  spsa_rows, curves = {v: [] for v in variants}, {v: [] for v in variants}
  for seed, (net, variables) in enumerate(trained):
    lut = lut_lib.convert(variables, net)
    none_rows.append(evaluate(lambda x, t=lut: lut_fn(x, t), task, sigma))
    for variant in variants:
      adapted, losses = spsa_adapt(
        lut,
        task,
        sigma,
        seed,
        args.adapt_steps,
        args.batch,
        32,
        args.spsa_directions,
        args.spsa_lr,
        tuple(variant.split(",")),
      )
      spsa_rows[variant].append(evaluate(lambda x, t=adapted: lut_fn(x, t), task, sigma))
      curves[variant].append(losses)
      print(f"adapt seed {seed} spsa[{variant}] {spsa_rows[variant][-1]} fixed-batch mse {losses}")
      if seed == 0 and variant == variants[0]:
        example["adapted"] = adapted
    tuned = backprop_adapt(net, variables, task, sigma, seed, args.adapt_steps, args.batch, 32)
    bp_lut = lut_lib.convert(tuned, net)
    bp_rows.append(evaluate(lambda x, t=bp_lut: lut_fn(x, t), task, sigma))
    print(
      f"adapt seed {seed}: none {none_rows[-1]} backprop {bp_rows[-1]} "
      f"cpu {time.process_time():.0f}s",
      flush=True,
    )
  adapt["none"] = psnr_ssim(none_rows)
  adapt["spsa_tables"] = {
    v: dict(psnr_ssim(spsa_rows[v]), fixed_batch_mse_every_25=curves[v]) for v in variants
  }
  adapt["backprop_float_then_tables"] = psnr_ssim(bp_rows)
  print(json.dumps({"adaptation": adapt}), flush=True)
  return adapt


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
