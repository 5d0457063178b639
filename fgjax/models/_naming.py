"""Forward order of a model's top-level layers, from their names (for "last k layers" masks)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# Every model in fgjax.models names its top-level modules by one rule, so that the forward order
# can be recovered from the names alone. Dict order is not enough: `jax.tree.map` (and so every
# optax update) rebuilds dicts with sorted keys, which would put "block_10" before "block_2" and
# "head" before "stem".
#   stem           the input layer(s), when a model has one
#   <kind>_<i>     the body, with one index i counting all body layers in forward order
#   norm           a final normalization, when a model has one
#   head           the classifier (a linear probe trains only this)
_INDEXED = re.compile(r"^[a-z][a-z0-9]*_(\d+)$")


def _order_key(name: str) -> tuple[int, int]:
  if name == "stem":
    return (0, 0)
  if name == "norm":
    return (2, 0)
  if name == "head":
    return (3, 0)
  match = _INDEXED.match(name)
  if match is None:
    raise ValueError(
      f"layer_names: top-level name {name!r} does not follow the fgjax.models naming rule "
      "('stem', '<kind>_<index>', 'norm', 'head')."
    )
  return (1, int(match.group(1)))


def layer_names(params: Mapping[str, Any]) -> list[str]:
  """Names of a model's top-level layers in forward order (input first, `head` last).

  Every model in `fgjax.models` names its top-level modules `stem` (if any), then `<kind>_<i>` with
  an index `i` counting body layers in forward order (e.g. `dense_0`, `dense_1`; `block_0` ...
  `block_7`; `conv_0`, `conv_1`, `gru_2`), then `norm` (if any), then `head`. This function recovers
  that order from the names alone, so it also holds after `jax.tree.map` has sorted the dict keys.

  Args:
    params: the `params` collection of a model (`variables["params"]`); a full variables dict
      holding a `params` entry is accepted too.

  Returns:
    The top-level names, first layer first. `layer_names(params)[-k:]` are the last k layers, so a
    "last k layers" mask is `lambda path, leaf: path.split("/")[0] in
    set(layer_names(params)[-k:])`.

  Raises:
    ValueError: when a name does not follow the rule, or two body layers share an index.

  Example:
    >>> params = MLP(hidden_sizes=(8, 8), num_classes=3).init(key, x)["params"]
    >>> layer_names(params)
    ['dense_0', 'dense_1', 'head']
  """
  if "params" in params and isinstance(params["params"], Mapping):
    params = params["params"]
  names = sorted(params, key=_order_key)
  keys = [_order_key(name) for name in names]
  if len(set(keys)) != len(keys):
    raise ValueError(f"layer_names: two top-level layers share a position: {names}.")
  return names
