"""Deterministic splits, few-shot sampling, held-out-speaker splits and batching, all by seed."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from fgjax.data._dataset import Batch, Dataset


def _counts(sizes: Sequence[int | float], total: int) -> list[int]:
  if not sizes:
    raise ValueError("split: give at least one size.")
  if all(isinstance(size, int | np.integer) for size in sizes):
    counts = [int(size) for size in sizes]
  elif all(isinstance(size, float) for size in sizes):
    if any(size < 0 for size in sizes) or sum(sizes) > 1.0 + 1e-9:
      raise ValueError(f"split: fractions must be >= 0 and sum to at most 1, got {list(sizes)}.")
    counts = [int(np.floor(size * total + 1e-9)) for size in sizes]
    if abs(sum(sizes) - 1.0) < 1e-9:
      # Fractions summing to one use every example: the last part takes the rounding remainder.
      counts[-1] = total - sum(counts[:-1])
  else:
    raise ValueError(
      f"split: sizes must be all ints (counts) or all floats (fractions), got {sizes}."
    )
  if any(count < 0 for count in counts) or sum(counts) > total:
    raise ValueError(f"split: counts {counts} do not fit in {total} examples.")
  return counts


def split(dataset: Dataset, sizes: Sequence[int | float], seed: int) -> tuple[Dataset, ...]:
  """Disjoint random parts of `dataset`, the same for the same seed.

  Args:
    dataset: the data.
    sizes: all ints (example counts) or all floats (fractions of the data). Fractions that sum to 1
      use every example (the last part takes the rounding remainder); otherwise leftover examples
      are dropped.
    seed: the permutation's seed.

  Returns:
    One `Dataset` per size, e.g. `train, test = split(data, (0.8, 0.2), seed=0)`.

  Raises:
    ValueError: sizes mix ints and floats, are negative, or ask for more examples than there are.
  """
  counts = _counts(sizes, len(dataset))
  order = np.random.default_rng(seed).permutation(len(dataset))
  bounds = np.cumsum([0, *counts])
  return tuple(
    dataset.subset(order[start:stop]) for start, stop in zip(bounds[:-1], bounds[1:], strict=True)
  )


def few_shot(
  dataset: Dataset, shots: int, seed: int, *, classes: Sequence[int] | None = None
) -> tuple[Dataset, Dataset]:
  """Samples `shots` examples of every class (a k-shot support set) and returns the rest apart.

  Args:
    dataset: the data.
    shots: examples per class (k).
    seed: the sampling seed.
    classes: the classes to sample (default all `range(num_classes)`); examples of other classes go
      to neither part.

  Returns:
    `(support, rest)`: the k * len(classes) sampled examples, ordered by class, and every other
    example of those classes in their original order.

  Raises:
    ValueError: a class has fewer than `shots` examples.
  """
  rng = np.random.default_rng(seed)
  classes = range(dataset.num_classes) if classes is None else classes
  chosen, pool = [], []
  for label in classes:
    indices = np.flatnonzero(dataset.y == label)
    if len(indices) < shots:
      raise ValueError(f"few_shot: class {label} has {len(indices)} examples, fewer than {shots}.")
    chosen.append(rng.choice(indices, size=shots, replace=False))
    pool.append(indices)
  support = np.concatenate(chosen)
  rest = np.setdiff1d(np.concatenate(pool), support)
  return dataset.subset(support), dataset.subset(rest)


def speaker_split(
  dataset: Dataset, held_out: str | Sequence[str] = "theo"
) -> tuple[Dataset, Dataset]:
  """Splits by speaker into `(others, held_out)`: pretrain on five FSDD speakers, adapt on one.

  Raises:
    ValueError: the dataset has no `speakers`, or a held-out speaker does not occur in it.
  """
  if dataset.speakers is None:
    raise ValueError(f"speaker_split: dataset {dataset.name!r} has no speakers.")
  held_out = (held_out,) if isinstance(held_out, str) else tuple(held_out)
  missing = set(held_out) - set(dataset.speakers.tolist())
  if missing:
    raise ValueError(
      f"speaker_split: no examples of {sorted(missing)}; "
      f"speakers are {sorted(set(dataset.speakers.tolist()))}."
    )
  is_held_out = np.isin(dataset.speakers, held_out)
  return dataset.subset(~is_held_out), dataset.subset(is_held_out)


def batches(
  dataset: Dataset,
  batch_size: int,
  *,
  seed: int | None = None,
  epochs: int | None = 1,
  drop_remainder: bool = False,
) -> Iterator[Batch]:
  """Mini-batches over `epochs` passes (`None`: forever).

  With a seed, each epoch visits the examples in its own permutation (seeded by `(seed, epoch)`, so
  the sequence of batches is reproducible and does not depend on how many were consumed before);
  with `seed=None` the order is the stored one.

  Args:
    dataset: the data.
    batch_size: examples per batch.
    seed: shuffling seed, or None for no shuffling.
    epochs: number of passes, or None for an endless iterator.
    drop_remainder: skip each epoch's last batch when it is smaller than `batch_size` (keeps shapes
      fixed, so a jitted step compiles once).

  Yields:
    `Batch(x, y)` of numpy arrays.
  """
  if batch_size <= 0:
    raise ValueError(f"batches: batch_size must be positive, got {batch_size}.")
  epoch = 0
  while epochs is None or epoch < epochs:
    if seed is None:
      order = np.arange(len(dataset))
    else:
      order = np.random.default_rng([seed, epoch]).permutation(len(dataset))
    stop = len(order) - len(order) % batch_size if drop_remainder else len(order)
    for start in range(0, stop, batch_size):
      indices = order[start : start + batch_size]
      yield Batch(x=dataset.x[indices], y=dataset.y[indices])
    epoch += 1
