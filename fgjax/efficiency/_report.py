"""Efficiency measurements and the LPIRC-style report: one row per model, method and precision.

Alyamkin et al., "Low-Power Computer Vision: Status, Challenges, Opportunities" (IEEE JETCAS 2019):
edge models are chosen by accuracy against latency, memory and operations. The Low-Power Image
Recognition Challenge 2018 (Track 1, a TFLite model on one phone core, batch 1) scored a
submission by

  score = accuracy / max(30 · T, runtime)      (T images, runtime in ms for all of them),

so nothing is gained below 30 ms per image. Here T = 1 image: score = accuracy / max(30 ms,
median batch-1 latency), in 1/ms (multiply by 30 to read it as a fraction of the accuracy kept).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import pathlib
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from fgjax.efficiency import _counting

LPIRC_TARGET_MS = 30.0


def lpirc_score(accuracy: float, latency_ms: float, target_ms: float = LPIRC_TARGET_MS) -> float:
  """accuracy / max(target_ms, latency_ms): LPIRC 2018 Track 1's score for one image (T = 1)."""
  if not latency_ms > 0:
    raise ValueError(f"latency_ms: expected a time > 0, got {latency_ms!r}.")
  return accuracy / max(target_ms, latency_ms)


def weight_bytes(params) -> int:
  """Bytes of the parameters as stored (int8 kernels count 1 byte, float32 4)."""
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(params)))


def num_parameters(params) -> int:
  return int(sum(math.prod(np.shape(x)) for x in jax.tree.leaves(params)))


def xla_cost(fn: Callable, *args) -> dict[str, float]:
  """XLA's view of one call of `jax.jit(fn)(*args)` after compilation.

  Returns:
    `flops` and `bytes_accessed` (cost analysis: what XLA's fused program reads and writes, our
    "bytes moved"), `peak_bytes` (memory analysis: arguments + outputs + temporaries − aliased),
    `temp_bytes`; -1 where the backend gives none.
  """
  compiled = jax.jit(fn).lower(*args).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):  # older JAX returned one dict per device
    cost = cost[0] if cost else {}
  cost = cost or {}
  memory = compiled.memory_analysis()
  if memory is None:
    peak = temp = -1
  else:
    temp = int(memory.temp_size_in_bytes)
    peak = int(
      memory.argument_size_in_bytes
      + memory.output_size_in_bytes
      + memory.temp_size_in_bytes
      - memory.alias_size_in_bytes
    )
  return {
    "flops": float(cost.get("flops", -1)),
    "bytes_accessed": float(cost.get("bytes accessed", -1)),
    "peak_bytes": peak,
    "temp_bytes": temp,
  }


def median_latency_ms(fn: Callable, *args, repeats: int = 50, warmup: int = 3) -> float:
  """Median wall time of `jax.jit(fn)(*args)` in ms, after `warmup` calls (compilation excluded)."""
  jitted = jax.jit(fn)
  for _ in range(warmup):
    jax.block_until_ready(jitted(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(jitted(*args))
    times.append(1e3 * (time.perf_counter() - start))
  return statistics.median(times)


@dataclasses.dataclass
class EfficiencyRow:
  """One line of the report; -1 (or NaN for accuracy) where not measured."""

  model: str
  method: str
  precision: str
  parameters: int
  weight_bytes: int
  forward_macs: int
  forward_integer_ops: int
  step_macs: int
  step_integer_ops: int
  step_flops_xla: float
  step_bytes_moved: float
  step_peak_bytes: int
  latency_ms: float
  accuracy: float = float("nan")

  @property
  def lpirc(self) -> float:
    if math.isnan(self.accuracy) or not self.latency_ms > 0:
      return float("nan")
    return lpirc_score(self.accuracy, self.latency_ms)


def measure(
  *,
  model: str,
  method: str,
  precision: str,
  params,
  forward: Callable,
  forward_args: Sequence,
  step: Callable | None = None,
  step_args: Sequence = (),
  accuracy: float = float("nan"),
  repeats: int = 50,
) -> EfficiencyRow:
  """Measures one (model, method, precision): counts, bytes, memory, latency.

  Args:
    model, method, precision: labels of the row.
    params: the parameters as stored (for the count and the bytes).
    forward: `forward(*forward_args) -> logits`; called with a batch of one for the latency.
    forward_args: its arguments (a batch-1 input).
    step: optionally a training step `step(*step_args)`; its MACs, integer ops, XLA flops,
      bytes moved and peak memory fill the step columns.
    step_args: its arguments.
    accuracy: measured elsewhere (the report does not train).
    repeats: latency samples.

  Returns:
    An `EfficiencyRow`.

  Example:
    >>> row = fgjax.efficiency.measure(model="mlp", method="inference", precision="float32",
    ...     params=params, forward=lambda x: model.apply({"params": params}, x), forward_args=(x1,))
  """
  forward_count = _counting.count_ops(forward, *forward_args)
  step_macs = step_integer_ops = -1
  cost = {"flops": -1.0, "bytes_accessed": -1.0, "peak_bytes": -1}
  if step is not None:
    step_count = _counting.count_ops(step, *step_args)
    step_macs, step_integer_ops = step_count.macs, step_count.integer_ops
    cost = xla_cost(step, *step_args)
  return EfficiencyRow(
    model=model,
    method=method,
    precision=precision,
    parameters=num_parameters(params),
    weight_bytes=weight_bytes(params),
    forward_macs=forward_count.macs,
    forward_integer_ops=forward_count.integer_ops,
    step_macs=step_macs,
    step_integer_ops=step_integer_ops,
    step_flops_xla=cost["flops"],
    step_bytes_moved=cost["bytes_accessed"],
    step_peak_bytes=cost["peak_bytes"],
    latency_ms=median_latency_ms(forward, *forward_args, repeats=repeats),
    accuracy=accuracy,
  )


_COLUMNS = (
  ("model", "model", "{}"),
  ("method", "method", "{}"),
  ("precision", "precision", "{}"),
  ("parameters", "params", "{:,}"),
  ("weight_bytes", "weights (KiB)", "kib"),
  ("forward_macs", "MACs / forward", "{:,}"),
  ("forward_integer_ops", "int ops / forward", "{:,}"),
  ("step_macs", "MACs / step", "{:,}"),
  ("step_integer_ops", "int ops / step", "{:,}"),
  ("step_bytes_moved", "bytes moved / step (MiB)", "mib"),
  ("step_peak_bytes", "peak memory / step (KiB)", "kib"),
  ("latency_ms", "latency b=1 (ms)", "{:.3f}"),
  ("accuracy", "accuracy (%)", "pct"),
  ("lpirc", "LPIRC score (1/s)", "score"),
)


def _cell(value, fmt: str) -> str:
  if isinstance(value, float) and math.isnan(value):
    return "-"
  if isinstance(value, int | float) and value < 0:
    return "-"
  if fmt == "kib":
    return f"{value / 1024:,.1f}"
  if fmt == "mib":
    return f"{value / 2**20:,.2f}"
  if fmt == "pct":
    return f"{100 * value:.1f}"
  if fmt == "score":
    return f"{1e3 * value:.2f}"
  return fmt.format(value)


def to_markdown(rows: Sequence[EfficiencyRow]) -> str:
  """The report as a Markdown table."""
  lines = ["| " + " | ".join(h for _, h, _ in _COLUMNS) + " |"]
  lines.append("|" + "---|" * len(_COLUMNS))
  for row in rows:
    lines.append("| " + " | ".join(_cell(getattr(row, k), f) for k, _, f in _COLUMNS) + " |")
  return "\n".join(lines)


def write_report(rows: Sequence[EfficiencyRow], folder, stem: str = "efficiency") -> dict:
  """Writes `{stem}.md`, `{stem}.csv` and `{stem}.png` (accuracy vs latency and vs peak memory).

  Returns:
    `{"md": path, "csv": path, "png": path}` (no PNG when no row has an accuracy).
  """
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  paths = {"md": folder / f"{stem}.md", "csv": folder / f"{stem}.csv"}
  paths["md"].write_text(to_markdown(rows) + "\n")
  with paths["csv"].open("w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow([k for k, _, _ in _COLUMNS])
    for row in rows:
      writer.writerow([getattr(row, k) for k, _, _ in _COLUMNS])
  measured = [r for r in rows if not math.isnan(r.accuracy)]
  if measured:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for row in measured:
      label = f"{row.model} {row.method} {row.precision}"
      axes[0].scatter(row.latency_ms, 100 * row.accuracy, label=label)
      axes[1].scatter(row.step_peak_bytes / 1024, 100 * row.accuracy, label=label)
    axes[0].set_xlabel("batch-1 latency (ms, median)")
    axes[1].set_xlabel("peak memory of a training step (KiB, XLA)")
    spans = (
      [r.latency_ms for r in measured],
      [r.step_peak_bytes / 1024 for r in measured],
    )
    for ax, values in zip(axes, spans, strict=True):
      ax.set_ylabel("accuracy (%)")
      if min(values) > 0 and max(values) > 10 * min(values):  # log only for a wide range
        ax.set_xscale("log")
      ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    paths["png"] = folder / f"{stem}.png"
    fig.savefig(paths["png"], dpi=90)
    plt.close(fig)
  return paths
