"""Memory of one training step: backprop against forward gradients, from XLA's compiled analysis.

Reproduces the memory figures of Chen et al., "Stepping Forward on the Last Mile" (NeurIPS 2024):
total and scratch memory of one adaptation step for backprop, the jvp forward gradient and SPSA
(sign-m-SPSA), for full fine-tuning, the last layers, a linear probe and prompts (ViTs), in
float32, bf16, w16a8 and w8a8, on the models of `fgjax.models` and a ViT-Base-sized transformer.

Every number is XLA's `memory_analysis()` of the compiled step (`fgjax.training.make_train_step`,
state donated): nothing runs, so even the ViT-Base step is only lowered and compiled. Each step
is `make_optimizer(config, mask=..., forward=True)` as the binaries build it: plain SGD behind
`fgjax.forward_gradient(estimator)`, K = `--num_directions` directions one at a time
(`chunk_size=1`). Fixed point: SPSA at w16a8 / w8a8 stores int16 / int8 kernels (QZO-FF, integer
perturbations and updates); backprop and jvp need float weights and run those precisions with
float master weights quantized in the forward (AQT fake quantization), as the paper's BP baseline.

Buffers, by kind (bytes):
- weights: the `params` the step takes (int8 / int16 kernels in fixed point); "state" adds the
  optimizer state, the frozen collections (BatchNorm statistics, quantization scales) and the batch;
- scratch: XLA's temporary buffers (`temp`), split by subtraction against the compiled inference
  forward on the same variables and batch: `inference scratch` (the forward's own activations) and
  `extra scratch = temp - inference temp`, which is, for backprop, the activations kept for the
  backward pass and the gradient buffers, and for jvp / SPSA the tangents or perturbations (SPSA
  regenerates each layer's perturbation from its key where the layer reads it) and the estimate;
- total = arguments + outputs + temp - aliased (donated) bytes.

Commands (about 1-3 minutes per model on 2 shared CPU cores; rows are appended to the JSONL and
skipped when already there, so a stopped run resumes):
  python scripts/memory_study.py --output_dir /tmp/memory_study
  python scripts/memory_study.py --output_dir /tmp/memory_study --models mlp,crnn   # a subset
  python scripts/memory_study.py --output_dir /tmp/memory_study --plot_only         # redraw
Writes `rows.jsonl`, `table.md`, `memory_precisions.png` and `memory_subsets.png`.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fgjax import models, training
from fgjax import quant as fq
from fgjax.data import Batch

MiB = 2**20
METHODS = ("backprop", "jvp", "spsa")
PRECISIONS = ("float32", "bf16", "w16a8", "w8a8")
SUBSETS = ("full", "last_k", "linear_probe", "prompts")
METHOD_LABELS = {"backprop": "backprop", "jvp": "jvp forward gradient", "spsa": "sign-m-SPSA"}
SUBSET_LABELS = {
  "full": "full FT",
  "last_k": "last 2 layers",
  "linear_probe": "linear probe",
  "prompts": "prompts",
}


class ModelSpec(NamedTuple):
  """A model of the study: constructor, input of one batch, prompts variant (ViTs)."""

  name: str
  label: str
  build: str  # fgjax.models name
  kwargs: dict
  input_shape: tuple[int, ...]  # one batch, (batch, ...)
  num_classes: int = 10
  prompts: int = 0  # deep prompts per block for the "prompts" subset (ViTs)


SPECS = {
  spec.name: spec
  for spec in (
    ModelSpec("mlp", "MLP 784-512-512-10", "mlp", {"hidden_sizes": (512, 512)}, (64, 28, 28, 1)),
    ModelSpec("resnet12", "ResNet-12, 84x84", "resnet12", {}, (16, 84, 84, 3), num_classes=5),
    ModelSpec("resnet18", "ResNet-18, 32x32", "resnet18", {}, (32, 32, 32, 3)),
    ModelSpec("mobilenet_v2", "MobileNetV2, 32x32", "mobilenet_v2", {}, (32, 32, 32, 3)),
    ModelSpec("vit_tiny", "ViT-tiny, 224x224", "vit_tiny", {}, (8, 224, 224, 3), prompts=10),
    ModelSpec("crnn", "CRNN, 101x40 log-mel", "crnn", {}, (32, 101, 40, 1)),
    ModelSpec(
      "vit_base",
      "ViT-Base depth (12 x 768), 224x224",
      "vit_tiny",
      {"dim": 768, "depth": 12, "num_heads": 12, "mlp_dim": 3072},
      (8, 224, 224, 3),
      prompts=10,
    ),
  )
}


# The rows that carry the paper's comparisons, measured first: full fine-tuning in float32 (all
# three methods) and at w16a8 (integer-weight SPSA against fake-quantized backprop), the linear
# probe, and prompts for ViTs. `--grid full` adds bf16, w8a8, jvp everywhere and the last layers.
CORE = (
  ("backprop", "float32", "full"),
  ("spsa", "float32", "full"),
  ("backprop", "w16a8", "full"),
  ("spsa", "w16a8", "full"),
  ("jvp", "float32", "full"),
  ("backprop", "float32", "linear_probe"),
  ("spsa", "float32", "linear_probe"),
  ("backprop", "float32", "prompts"),
  ("spsa", "float32", "prompts"),
)


def grid(spec: ModelSpec, which: str = "full") -> list[tuple[str, str, str]]:
  """(method, precision, subset) rows, most important first. "full": every precision for full
  fine-tuning and every subset in float32 (prompts only for ViTs); "core": `CORE`."""
  rows = list(CORE)
  if which == "full":
    rows += [(m, p, "full") for p in PRECISIONS for m in METHODS]
    rows += [(m, "float32", s) for s in SUBSETS[1:] for m in METHODS]
  rows = [r for r in rows if r[2] != "prompts" or spec.prompts]
  return list(dict.fromkeys(rows))  # Unique, in order.


def _nbytes(tree) -> int:
  # PRNG keys (typed dtypes) report their own itemsize (threefry: two uint32).
  return int(sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _abstract_variables(model, x):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype)))


_INFERENCE: dict = {}


def step_memory(spec: ModelSpec, method: str, precision: str, subset: str, num_directions: int):
  """Compiles one adaptation step (shapes only) and its inference forward; returns a row."""
  integer = method == "spsa" and precision in ("w16a8", "w8a8")
  quant = fq.preset(precision, weight_storage="integer") if integer else fq.preset(precision)
  kwargs = dict(spec.kwargs, num_classes=spec.num_classes, quant=quant)
  if subset == "prompts":
    kwargs["num_prompts"] = spec.prompts
  model = models.get_model(spec.build, **kwargs)
  x = jax.ShapeDtypeStruct(spec.input_shape, jnp.float32)
  batch = Batch(x=x, y=jax.ShapeDtypeStruct(spec.input_shape[:1], jnp.int32))
  variables = dict(_abstract_variables(model, x))
  params = variables.pop("params")
  mask = training.trainable_mask(params, subset, last_k=2)
  scales = None
  epsilon = 1e-3
  if integer:
    # The values of the grid steps do not change the compiled memory; their shapes do.
    shapes = jax.eval_shape(lambda p, v: fq.leaf_scales(p, v), params, variables)
    scales = {path: jnp.full(s.shape, 1e-4, s.dtype) for path, s in shapes.items()}
  config = {
    "method": "sign_spsa" if method == "spsa" else method,
    "num_directions": num_directions,
    "epsilon": epsilon,
    "chunk_size": 1,
    "optimizer": "sgd",
    "optimizer_kwargs": {"learning_rate": 1e-3},
    "rounding": "nearest",
  }
  optimizer = training.make_optimizer(
    config, mask=mask, forward=True, integer_weights=integer, scales=scales
  )
  state = jax.eval_shape(
    lambda p, v: training.TrainState.create(p, v, optimizer, jax.random.key(0)), params, variables
  )
  begin = time.time()
  step = training.make_train_step(model, optimizer, update_batch_stats=False)
  stats = training.memory_stats(step, state, batch)
  key = (spec.name, precision, integer, subset == "prompts")
  if key not in _INFERENCE:  # The trainable subset does not change the inference forward.
    infer = jax.jit(lambda v, x: model.apply(v, x, train=False))
    _INFERENCE[key] = training.memory_stats(infer, {"params": params, **variables}, x)
  inference = _INFERENCE[key]
  return {
    "model": spec.name,
    "method": method,
    "precision": precision,
    "weight_storage": "integer" if integer else "float",
    "subset": subset,
    "num_directions": num_directions,
    "batch": spec.input_shape[0],
    "params": training.num_params(params),
    "trainable_params": training.num_params(params, mask),
    "weights_bytes": _nbytes(params),
    "opt_state_bytes": _nbytes(state.opt_state),
    "frozen_bytes": _nbytes(variables),
    "batch_bytes": _nbytes(batch),
    **{f"{key}_bytes": value for key, value in stats.items()},
    "inference_temp_bytes": inference["temp"],
    "inference_total_bytes": inference["total"],
    "compile_seconds": round(time.time() - begin, 1),
  }


def _read(path: pathlib.Path) -> list[dict]:
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def measure(specs, output: pathlib.Path, num_directions: int, which: str) -> list[dict]:
  """Measures every missing row, row kind by row kind across the models (so that a run stopped
  early has the most important rows of every model), appending each to `rows.jsonl`."""
  path = output / "rows.jsonl"
  done = {(r["model"], r["method"], r["precision"], r["subset"]) for r in _read(path)}
  order = list(dict.fromkeys(row for spec in specs for row in grid(spec, which)))
  for method, precision, subset in order:
    for spec in specs:
      if (method, precision, subset) not in grid(spec, which):
        continue
      if (spec.name, method, precision, subset) in done:
        continue
      row = step_memory(spec, method, precision, subset, num_directions)
      with path.open("a") as file:
        file.write(json.dumps(row) + "\n")
      print(
        f"{spec.name:12s} {method:8s} {precision:7s} {subset:12s} total "
        f"{row['total_bytes'] / MiB:9.1f} MiB temp {row['temp_bytes'] / MiB:9.1f} MiB "
        f"({row['compile_seconds']:.0f}s)",
        file=sys.stderr,
        flush=True,
      )
  return _read(path)


def _find(rows, model, method, precision, subset):
  for r in rows:
    if (r["model"], r["method"], r["precision"], r["subset"]) == (model, method, precision, subset):
      return r
  return None


def _mib(nbytes) -> str:
  return f"{nbytes / MiB:.1f}"


def ratio_table(rows: list[dict]) -> str:
  """One line per model: backprop against jvp and SPSA, total and scratch, full fine-tuning."""
  lines = [
    "| model | params | precision | backprop total / scratch | jvp total / scratch "
    "| SPSA total / scratch | BP / SPSA total | BP / SPSA scratch |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for name in SPECS:
    for precision in PRECISIONS:
      bp = _find(rows, name, "backprop", precision, "full")
      ff = _find(rows, name, "spsa", precision, "full")
      if not (bp and ff):
        continue
      jvp = _find(rows, name, "jvp", precision, "full")
      cell = lambda r: f"{_mib(r['total_bytes'])} / {_mib(r['temp_bytes'])}" if r else "-"  # noqa: E731
      storage = " (SPSA int)" if ff["weight_storage"] == "integer" else ""
      lines.append(
        f"| {SPECS[name].label}, batch {bp['batch']} | {bp['params']:,} | {precision}{storage} "
        f"| {cell(bp)} | {cell(jvp)} | {cell(ff)} "
        f"| {bp['total_bytes'] / ff['total_bytes']:.2f}x "
        f"| {bp['temp_bytes'] / max(ff['temp_bytes'], 1):.2f}x |"
      )
  return "\n".join(lines) + "\n"


def markdown_table(rows: list[dict], command: str) -> str:
  """Per model: every row with its buffers, and the ratios backprop / FF."""
  lines = [
    "| model | subset | precision | method (weights) | trainable | weights | state + batch "
    "| inference scratch | extra scratch | scratch (temp) | total | BP / this (total, scratch) |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  models_seen = [s for s in SPECS if any(r["model"] == s for r in rows)]
  for name in models_seen:
    for r in rows:
      if r["model"] != name:
        continue
      bp = _find(rows, name, "backprop", r["precision"], r["subset"])
      ratio = "-"
      if bp and r["method"] != "backprop":
        ratio = (
          f"{bp['total_bytes'] / r['total_bytes']:.2f}x, {bp['temp_bytes'] / r['temp_bytes']:.2f}x"
        )
      state = r["opt_state_bytes"] + r["frozen_bytes"] + r["batch_bytes"]
      extra = r["temp_bytes"] - r["inference_temp_bytes"]
      lines.append(
        f"| {SPECS[name].label} | {SUBSET_LABELS[r['subset']]} | {r['precision']} "
        f"| {METHOD_LABELS[r['method']]} ({r['weight_storage']}) | {r['trainable_params']:,} "
        f"| {_mib(r['weights_bytes'])} | {_mib(state)} | {_mib(r['inference_temp_bytes'])} "
        f"| {_mib(extra)} | {_mib(r['temp_bytes'])} | {_mib(r['total_bytes'])} | {ratio} |"
      )
  lines += [
    "",
    "MiB. Scratch = XLA temp buffers; inference scratch = temp of the compiled inference forward "
    "(same variables, same batch); extra scratch = step temp - inference temp (backprop: "
    "activations kept for the backward pass and gradients; jvp / SPSA: tangents, perturbations "
    "and the estimate). Total = arguments + outputs + temp - donated.",
    "",
    f"Command: `{command}`",
  ]
  return "\n".join(lines) + "\n"


def _panels(rows, title, groups, group_key, fixed, path):
  """Small multiples, one panel per model: groups on x, one bar per method, each bar stacked
  weights / state + batch / scratch; BP / SPSA total ratio over each group."""
  # The object-oriented API without pyplot: no backend switch, safe inside notebooks.
  from matplotlib.figure import Figure

  names = [s for s in SPECS if any(r["model"] == s for r in rows)]
  cols = min(4, len(names))
  nrows = math.ceil(len(names) / cols)
  fig = Figure(figsize=(4.6 * cols, 3.9 * nrows))
  axes = fig.subplots(nrows, cols, squeeze=False)
  colors = {"backprop": "tab:red", "jvp": "tab:orange", "spsa": "tab:blue"}
  width = 0.26
  for ax, name in zip(axes.ravel(), names, strict=False):
    present = [g for g in groups if _find(rows, name, "backprop", **{group_key: g}, **fixed)]
    for gi, group in enumerate(present):
      top = 0.0
      for mi, method in enumerate(METHODS):
        r = _find(rows, name, method, **{group_key: group}, **fixed)
        if r is None:
          continue
        xpos = gi + (mi - 1) * width
        weights = r["weights_bytes"] / MiB
        state = (r["opt_state_bytes"] + r["frozen_bytes"] + r["batch_bytes"]) / MiB
        scratch = r["temp_bytes"] / MiB
        ax.bar(xpos, weights, width, color=colors[method], edgecolor="k", lw=0.4)
        ax.bar(xpos, state, width, bottom=weights, color=colors[method], alpha=0.55,
               edgecolor="k", lw=0.4, hatch="..")  # fmt: skip
        ax.bar(xpos, scratch, width, bottom=weights + state, color=colors[method], alpha=0.3,
               edgecolor="k", lw=0.4, hatch="//")  # fmt: skip
        top = max(top, weights + state + scratch)
      bp = _find(rows, name, "backprop", **{group_key: group}, **fixed)
      ff = _find(rows, name, "spsa", **{group_key: group}, **fixed)
      if bp and ff:
        total = bp["total_bytes"] / ff["total_bytes"]
        scratch = bp["temp_bytes"] / max(ff["temp_bytes"], 1)
        ax.text(gi, top * 1.02, f"BP / SPSA\ntotal {total:.1f}x\nscratch {scratch:.1f}x",
                ha="center", va="bottom", fontsize=7)  # fmt: skip
    ax.set_xticks(range(len(present)))
    ax.set_xlim(-0.6, len(present) - 0.4)
    ax.set_xticklabels([SUBSET_LABELS.get(g, g) for g in present], fontsize=8)
    ax.set_ylabel("memory of one step (MiB)")
    ax.set_title(SPECS[name].label + f", batch {SPECS[name].input_shape[0]}", fontsize=9)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.25)
  for ax in axes.ravel()[len(names) :]:
    ax.axis("off")
  from matplotlib.patches import Patch

  handles = [Patch(color=colors[m], label=METHOD_LABELS[m]) for m in METHODS] + [
    Patch(facecolor="white", edgecolor="k", label="weights (solid)"),
    Patch(facecolor="white", edgecolor="k", hatch="..", label="opt. state + frozen + batch"),
    Patch(facecolor="white", edgecolor="k", hatch="//", label="scratch (XLA temp)"),
  ]
  fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=8, frameon=False)
  fig.suptitle(title, fontsize=11)
  fig.tight_layout(rect=(0, 0.05, 1, 0.96))
  fig.savefig(path, dpi=72)


def plot(rows: list[dict], output: pathlib.Path) -> None:
  _panels(
    rows,
    "One training step, full fine-tuning: total memory by precision (SPSA at w16a8 / w8a8 on "
    "integer weights; BP and jvp with fake-quantized float weights)",
    PRECISIONS,
    "precision",
    {"subset": "full"},
    output / "memory_precisions.png",
  )
  _panels(
    rows,
    "One training step, float32: total memory by trainable subset",
    SUBSETS,
    "subset",
    {"precision": "float32"},
    output / "memory_subsets.png",
  )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--output_dir", default="/tmp/memory_study")
  parser.add_argument(
    "--models", default=",".join(SPECS), help="comma separated: " + ",".join(SPECS)
  )
  parser.add_argument("--num_directions", type=int, default=4)
  parser.add_argument("--grid", choices=("core", "full"), default="full")
  parser.add_argument("--plot_only", action="store_true")
  args = parser.parse_args(argv)
  output = pathlib.Path(args.output_dir)
  output.mkdir(parents=True, exist_ok=True)
  unknown = [m for m in args.models.split(",") if m not in SPECS]
  if unknown:
    parser.error(f"unknown models {unknown}; valid: {', '.join(SPECS)}")
  specs = [SPECS[m] for m in args.models.split(",")]
  if args.plot_only:
    rows = _read(output / "rows.jsonl")
  else:
    rows = measure(specs, output, args.num_directions, args.grid)
  command = "python scripts/memory_study.py " + " ".join(sys.argv[1:] if argv is None else argv)
  table = ratio_table(rows) + "\n" + markdown_table(rows, command.strip())
  (output / "table.md").write_text(table)
  plot(rows, output)
  print(table)
  return rows


if __name__ == "__main__":
  main()
