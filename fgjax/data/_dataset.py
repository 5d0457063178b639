"""The in-memory dataset container and the batch type."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """Examples held in memory as numpy arrays.

  Derive a shifted copy with `dataclasses.replace`, e.g. `dataclasses.replace(data, x=rotate(data.x,
  30.0))`, or a subset with `data.subset(indices)`.

  Attributes:
    x: inputs, first axis the example (images are (N, height, width, channels) float32 in [0, 1];
      audio is (N, samples) float32 in [-1, 1]).
    y: integer labels in [0, num_classes), shape (N,).
    num_classes: number of classes.
    name: where the data came from, e.g. "mnist", "fsdd".
    speakers: optional per-example speaker names, shape (N,) (FSDD), for held-out-speaker splits.
  """

  x: np.ndarray
  y: np.ndarray
  num_classes: int
  name: str
  speakers: np.ndarray | None = None

  def __post_init__(self):
    if len(self.x) != len(self.y):
      raise ValueError(f"Dataset {self.name!r}: {len(self.x)} inputs but {len(self.y)} labels.")
    if self.speakers is not None and len(self.speakers) != len(self.y):
      raise ValueError(
        f"Dataset {self.name!r}: {len(self.speakers)} speakers but {len(self.y)} labels."
      )

  def __len__(self) -> int:
    return len(self.y)

  def subset(self, indices: np.ndarray) -> Dataset:
    """The examples at `indices` (an integer array or a boolean mask), in that order."""
    indices = np.asarray(indices)
    speakers = None if self.speakers is None else self.speakers[indices]
    return dataclasses.replace(self, x=self.x[indices], y=self.y[indices], speakers=speakers)


class Batch(NamedTuple):
  """One mini-batch; a NamedTuple, so a JAX pytree that jitted steps accept as is."""

  x: np.ndarray  # inputs, (batch, ...)
  y: np.ndarray  # integer labels, (batch,)
