"""Parameter masks: which leaves an estimator perturbs and estimates (linear probe, last layers)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax

PyTree = Any
# A mask is a pytree of bools with the structure of the parameters, or a predicate on a leaf's path
# ("head/kernel") and value, in the spirit of optax.masked.
Mask = PyTree | Callable[[str, jax.Array], bool]


def path_to_str(path) -> str:
  """Joins a jax key path into "a/b/kernel"."""
  parts = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      parts.append(str(entry))
  return "/".join(parts)


def leaf_paths(params: PyTree) -> list[str]:
  """The "/"-joined path of every leaf of `params`, in `jax.tree.leaves` order."""
  return [path_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def resolve_mask(mask: Mask | None, params: PyTree) -> tuple[bool, ...]:
  """Returns one bool per leaf of `params` (flattened order); True means trainable.

  Raises:
    ValueError: when `mask` is a pytree whose structure differs from `params`, holds non-bools, or
      selects no leaf at all.
  """
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  if mask is None:
    flags = tuple(True for _ in leaves_with_path)
  elif callable(mask) and not isinstance(mask, dict):
    flags = tuple(bool(mask(path_to_str(p), leaf)) for p, leaf in leaves_with_path)
  else:
    mask_leaves, mask_def = jax.tree_util.tree_flatten(mask)
    if mask_def != treedef:
      raise ValueError(
        f"mask: its tree structure {mask_def} does not match the parameters' {treedef}; "
        "pass a pytree of bools with the parameters' structure, or a predicate "
        "(path, leaf) -> bool."
      )
    if not all(isinstance(m, bool) for m in mask_leaves):
      raise ValueError("mask: every leaf must be a Python bool (trainable or not).")
    flags = tuple(mask_leaves)
  if leaves_with_path and not any(flags):
    raise ValueError("mask: it selects no parameter; at least one leaf must be trainable.")
  return flags


def path_mask(pattern: str) -> Callable[[str, jax.Array], bool]:
  """A mask predicate selecting the leaves whose path matches the regular expression `pattern`.

  Example: `path_mask(r"^head/")` trains only the classifier head (a linear probe);
  `path_mask(r"prompts")` trains only prompt tokens.
  """
  regex = re.compile(pattern)
  return lambda path, leaf: regex.search(path) is not None
