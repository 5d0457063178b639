"""Optax gradient transformations built on the estimators."""

from fgjax.transforms._forward_gradient import ForwardGradientState, forward_gradient
from fgjax.transforms._integer import (
  ROUNDINGS,
  IntegerOptimizerState,
  IntegerUpdatesState,
  apply_integer_updates,
  changed_fraction,
  float_view,
  integer_optimizer,
  integer_updates,
)

__all__ = [
  "ROUNDINGS",
  "ForwardGradientState",
  "IntegerOptimizerState",
  "IntegerUpdatesState",
  "apply_integer_updates",
  "changed_fraction",
  "float_view",
  "forward_gradient",
  "integer_optimizer",
  "integer_updates",
]
