"""Optax gradient transformations built on the estimators."""

from fgjax.transforms._forward_gradient import ForwardGradientState, forward_gradient
from fgjax.transforms._integer import (
  ROUNDINGS,
  IntegerUpdatesState,
  apply_integer_updates,
  changed_fraction,
  integer_updates,
)

__all__ = [
  "ROUNDINGS",
  "ForwardGradientState",
  "IntegerUpdatesState",
  "apply_integer_updates",
  "changed_fraction",
  "forward_gradient",
  "integer_updates",
]
