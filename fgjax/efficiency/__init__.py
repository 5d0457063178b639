"""Efficiency of models and training methods: operations, bytes, memory, latency, LPIRC score.

- `count_ops`: MACs (integer MACs apart) and elementwise ops of any function, from its jaxpr.
- `xla_cost`: XLA's flops, bytes accessed ("bytes moved") and peak memory of the compiled call.
- `median_latency_ms`, `lpirc_score`, `weight_bytes`.
- `measure` -> `EfficiencyRow`; `write_report` writes Markdown, CSV and a PNG.
"""

from fgjax.efficiency._counting import OpCount, count_jaxpr, count_ops
from fgjax.efficiency._report import (
  LPIRC_TARGET_MS,
  EfficiencyRow,
  lpirc_score,
  measure,
  median_latency_ms,
  num_parameters,
  to_markdown,
  weight_bytes,
  write_report,
  xla_cost,
)

__all__ = [
  "LPIRC_TARGET_MS",
  "EfficiencyRow",
  "OpCount",
  "count_jaxpr",
  "count_ops",
  "lpirc_score",
  "measure",
  "median_latency_ms",
  "num_parameters",
  "to_markdown",
  "weight_bytes",
  "write_report",
  "xla_cost",
]
