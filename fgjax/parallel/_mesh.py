"""Meshes from a text spec, for the binaries' `--config.mesh` ("directions=4,data=2")."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh


def parse_mesh(spec: str) -> dict[str, int]:
  """ "directions=4,data=2" -> {"directions": 4, "data": 2} (order kept; "" -> {})."""
  axes = {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, sep, size = part.partition("=")
    if not sep or not name.strip().isidentifier() or not size.strip().isdigit():
      raise ValueError(f"mesh: expected 'axis=size,...', got {spec!r}.")
    if name.strip() in axes or int(size) < 1:
      raise ValueError(f"mesh: repeated axis or size < 1 in {spec!r}.")
    axes[name.strip()] = int(size)
  return axes


def make_mesh(spec: str | dict[str, int], devices=None) -> Mesh:
  """A `jax.sharding.Mesh` with the named axes of `spec`, over the first devices in order.

  Args:
    spec: "directions=4,data=2" or {"directions": 4, "data": 2}; the product of the sizes must not
      exceed the number of devices (all hosts' devices after `jax.distributed.initialize()`).
    devices: the devices to use (default `jax.devices()`).

  Returns:
    The mesh; its axes are automatic (GSPMD) outside `fgjax.parallel.sharded`'s `shard_map`.

  Example:
    >>> mesh = fgjax.parallel.make_mesh("directions=4,data=2")
  """
  axes = parse_mesh(spec) if isinstance(spec, str) else dict(spec)
  if not axes:
    raise ValueError("mesh: at least one axis is needed, e.g. 'data=8'.")
  devices = list(jax.devices() if devices is None else devices)
  count = math.prod(axes.values())
  if count > len(devices):
    raise ValueError(f"mesh: {spec!r} needs {count} devices, {len(devices)} are available.")
  grid = np.array(devices[:count], dtype=object).reshape(tuple(axes.values()))
  return Mesh(grid, tuple(axes))
