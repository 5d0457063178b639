"""Example forgetting: find the training examples a model never forgets, to drop them.

Toneva et al., "An Empirical Study of Example Forgetting during Deep Neural Network Learning"
(ICLR 2019); used for data efficiency by MEST (Yuan et al., NeurIPS 2021, Sec. 4.3). A
*forgetting event* is an example that was classified correctly at its previous presentation and
is misclassified now. Examples learned early and never forgotten carry little information: after a
few epochs they can be removed from the (pre)training set, so each later epoch is shorter.

The state is three arrays over the dataset's examples; `forgetting_update` is jittable and takes
the indices of a batch and whether each was classified correctly.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class ForgettingState(NamedTuple):
  """Per-example statistics (arrays of the dataset's size).

  Attributes:
    last_correct: whether the example was correct at its last presentation.
    learned: whether it has ever been correct.
    forgetting_events: how many times it went from correct to incorrect (int32).
  """

  last_correct: jax.Array
  learned: jax.Array
  forgetting_events: jax.Array


def forgetting_init(num_examples: int) -> ForgettingState:
  """A state for a dataset of `num_examples` examples, none seen yet."""
  if not (isinstance(num_examples, int) and num_examples >= 1):
    raise ValueError(f"num_examples: expected an integer >= 1, got {num_examples!r}.")
  return ForgettingState(
    last_correct=jnp.zeros((num_examples,), bool),
    learned=jnp.zeros((num_examples,), bool),
    forgetting_events=jnp.zeros((num_examples,), jnp.int32),
  )


def forgetting_update(state: ForgettingState, indices, correct) -> ForgettingState:
  """Records one presentation of the examples `indices` (int array) with `correct` (bool array).

  Example:
    >>> correct = jnp.argmax(logits, -1) == labels
    >>> tracker = fgjax.sparse.forgetting_update(tracker, batch_indices, correct)
  """
  indices = jnp.asarray(indices)
  correct = jnp.asarray(correct, bool)
  forgotten = state.last_correct[indices] & ~correct
  return ForgettingState(
    last_correct=state.last_correct.at[indices].set(correct),
    learned=state.learned.at[indices].max(correct),
    forgetting_events=state.forgetting_events.at[indices].add(forgotten.astype(jnp.int32)),
  )


def keep_examples(state: ForgettingState, drop_fraction: float, seed: int = 0) -> np.ndarray:
  """Indices of the examples to keep after dropping up to `drop_fraction` unforgettable ones.

  Unforgettable: learned and never forgotten. If there are more of them than
  `drop_fraction · n`, a random subset of that size (from `seed`) is dropped; examples never
  learned are always kept (they are the hard ones).

  Returns:
    Sorted int64 NumPy indices into the dataset.
  """
  if not 0 <= drop_fraction <= 1:
    raise ValueError(f"drop_fraction: expected a fraction in [0, 1], got {drop_fraction!r}.")
  learned = np.asarray(state.learned)
  events = np.asarray(state.forgetting_events)
  unforgettable = np.flatnonzero(learned & (events == 0))
  budget = int(np.floor(drop_fraction * learned.size))
  rng = np.random.default_rng(seed)
  dropped = rng.permutation(unforgettable)[:budget]
  keep = np.ones(learned.size, bool)
  keep[dropped] = False
  return np.flatnonzero(keep).astype(np.int64)
