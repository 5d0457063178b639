"""Bytes communicated by a compiled computation, read from its optimized HLO.

For each collective (all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute, and
their async `-start` forms) the bytes of its operands on one device: the result's size for
all-reduce, all-to-all and collective-permute, the result divided by the group size for all-gather
and multiplied by it for reduce-scatter. Ops inside loops are counted once (per static occurrence);
fgjax.parallel places its collectives outside any loop.
"""

from __future__ import annotations

import math
import re

_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_OP = re.compile(r"=\s*(?P<type>.*?)\s+(?P<kind>" + "|".join(_KINDS) + r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b(?P<dtype>pred|[subf]\d+|bf16|c64|c128|f8e\w+)\[(?P<dims>[\d,]*)\]")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{(?P<first>[\d,]*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(?P<num>\d+),(?P<size>\d+)\]")


def _dtype_bytes(dtype: str) -> float:
  if dtype == "pred":
    return 1
  if dtype.startswith("f8"):
    return 1
  return int(re.sub(r"\D", "", dtype)) / 8


def _group_size(line: str) -> int:
  match = _GROUPS_IOTA.search(line)
  if match:
    return int(match["size"])
  match = _GROUPS_LIST.search(line)
  if match and match["first"]:
    return len(match["first"].split(","))
  return 1


def collectives(hlo_text: str) -> list[tuple[str, int]]:
  """(kind, operand bytes on one device) for every collective op in an HLO module's text."""
  out = []
  for line in hlo_text.splitlines():
    match = _OP.search(line)
    if match is None:
      continue
    arrays = list(_ARRAY.finditer(match["type"]))
    if match["start"] and match["kind"] != "all-reduce" and len(arrays) > 1:
      arrays = arrays[len(arrays) // 2 :]  # (operands..., results...) tuple of an async start
    size = sum(
      math.prod(int(d) for d in a["dims"].split(",") if d) * _dtype_bytes(a["dtype"])
      for a in arrays
    )
    if match["kind"] == "all-gather":
      size /= _group_size(line)
    elif match["kind"] == "reduce-scatter":
      size *= _group_size(line)
    out.append((match["kind"], int(size)))
  return out


def communicated_bytes(compiled) -> int:
  """Total operand bytes of the collectives of a compiled computation, per device per call.

  Args:
    compiled: `jax.jit(f).lower(*args).compile()`, or its HLO text.

  Returns:
    The sum over collective ops of their operand bytes on one device.

  Example:
    >>> step = jax.jit(fgjax.value_and_grad(loss_fn, est))
    >>> fgjax.parallel.communicated_bytes(step.lower(params, batch, key=key).compile())
  """
  text = compiled if isinstance(compiled, str) else compiled.as_text()
  return sum(size for _, size in collectives(text))
