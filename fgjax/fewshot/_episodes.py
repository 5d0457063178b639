"""N-way K-shot episodes: classes never seen in pretraining, support and query sets, Lake's runs."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

from fgjax.data._dataset import Dataset


class Episode(NamedTuple):
  """One few-shot task; a NamedTuple, so a JAX pytree.

  Attributes:
    support_x: (num_ways * num_shots, ...) inputs, grouped by episode class (class 0's shots first).
    support_y: (num_ways * num_shots,) episode labels in [0, num_ways).
    query_x: (num_ways * num_queries, ...) inputs, grouped the same way.
    query_y: (num_ways * num_queries,) episode labels.
    classes: (num_ways,) the dataset class behind each episode label.
  """

  support_x: np.ndarray
  support_y: np.ndarray
  query_x: np.ndarray
  query_y: np.ndarray
  classes: np.ndarray

  @property
  def num_ways(self) -> int:
    return len(self.classes)


def sample_episode(
  data: Dataset,
  classes: Sequence[int] | np.ndarray,
  *,
  num_ways: int,
  num_shots: int,
  num_queries: int,
  rng: np.random.Generator,
) -> Episode:
  """Draws an N-way K-shot episode from `classes` of `data` (ProtoNets, Snell et al. 2017).

  N classes are drawn without replacement from `classes`; for each, K + Q distinct examples are
  drawn without replacement: the first K are the support, the other Q the queries. Episode label
  `i` stands for dataset class `classes[i]` (a random order).

  Args:
    data: the examples (`data.y` the dataset class of each).
    classes: the class ids episodes may use (e.g. held-out alphabets), disjoint from pretraining.
    num_ways: N.
    num_shots: K, support examples per class.
    num_queries: Q, query examples per class.
    rng: numpy generator (the episode is a function of its state).

  Returns:
    `Episode` with support (N K, ...) and queries (N Q, ...).

  Raises:
    ValueError: fewer than N classes, or a chosen class with fewer than K + Q examples.
  """
  classes = np.asarray(classes)
  if num_ways < 1 or num_shots < 1 or num_queries < 0:
    raise ValueError(
      f"sample_episode: num_ways ({num_ways}) and num_shots ({num_shots}) must be >= 1, "
      f"num_queries ({num_queries}) >= 0."
    )
  if len(classes) < num_ways:
    raise ValueError(f"sample_episode: {num_ways} ways but only {len(classes)} classes.")
  chosen = rng.choice(classes, size=num_ways, replace=False)
  support, query = [], []
  for cls in chosen:
    members = np.flatnonzero(data.y == cls)
    if len(members) < num_shots + num_queries:
      raise ValueError(
        f"sample_episode: class {cls} has {len(members)} examples, fewer than "
        f"num_shots + num_queries = {num_shots + num_queries}."
      )
    picked = rng.choice(members, size=num_shots + num_queries, replace=False)
    support.append(picked[:num_shots])
    query.append(picked[num_shots:])
  support, query = np.concatenate(support), np.concatenate(query)
  labels = lambda count: np.repeat(np.arange(num_ways, dtype=np.int32), count)  # noqa: E731
  return Episode(
    support_x=data.x[support],
    support_y=labels(num_shots),
    query_x=data.x[query],
    query_y=labels(num_queries),
    classes=chosen.astype(np.int32),
  )


class EpisodeSampler:
  """A reproducible stream of N-way K-shot episodes: episode `i` depends only on (seed, i).

  Example:
    >>> chars = fgjax.data.omniglot()
    >>> sampler = EpisodeSampler(chars.data, chars.classes_of(["Latin", "Tagalog"]), num_ways=5,
    ...                          num_shots=1, num_queries=15, seed=0)
    >>> episode = sampler[3]   # or: for episode in sampler.take(100)
  """

  def __init__(
    self,
    data: Dataset,
    classes: Sequence[int] | np.ndarray,
    *,
    num_ways: int,
    num_shots: int,
    num_queries: int,
    seed: int = 0,
    exclude: Sequence[int] | np.ndarray | None = None,
  ):
    """Args: as `sample_episode`, plus `seed` and `exclude`: class ids that must not appear
    (the pretraining classes); a `classes` list that meets them raises `ValueError`."""
    classes = np.unique(np.asarray(classes))
    if exclude is not None:
      overlap = np.intersect1d(classes, np.asarray(exclude))
      if overlap.size:
        raise ValueError(
          f"EpisodeSampler: {overlap.size} episode classes are also excluded (pretraining) "
          f"classes, e.g. {overlap[:5].tolist()}."
        )
    self.data, self.classes, self.seed = data, classes, seed
    self.num_ways, self.num_shots, self.num_queries = num_ways, num_shots, num_queries
    self[0]  # Validates the sizes now, not at the first use.

  def __getitem__(self, index: int) -> Episode:
    rng = np.random.default_rng([self.seed, index])
    return sample_episode(
      self.data,
      self.classes,
      num_ways=self.num_ways,
      num_shots=self.num_shots,
      num_queries=self.num_queries,
      rng=rng,
    )

  def take(self, count: int, start: int = 0) -> Iterator[Episode]:
    """Episodes `start` ... `start + count - 1`."""
    for index in range(start, start + count):
      yield self[index]


def episode_from_run(run) -> Episode:
  """An `Episode` from one of Lake's runs (`fgjax.data.omniglot_runs`): 20-way 1-shot, 20 queries.

  Its `classes` are -1: the runs' characters are not numbered in any `Omniglot` set.
  """
  return Episode(
    support_x=run.support_x,
    support_y=run.support_y,
    query_x=run.query_x,
    query_y=run.query_y,
    classes=np.full(len(run.support_y), -1, np.int32),
  )
