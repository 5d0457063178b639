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
from fgjax.transforms._schedule import (
  NumDirectionsState,
  num_directions_on_plateau,
  num_directions_schedule,
  with_num_directions,
)
from fgjax.transforms._sharpness import SharpnessAware, sharpness_aware

__all__ = [
  "ROUNDINGS",
  "ForwardGradientState",
  "IntegerOptimizerState",
  "IntegerUpdatesState",
  "NumDirectionsState",
  "SharpnessAware",
  "apply_integer_updates",
  "changed_fraction",
  "float_view",
  "forward_gradient",
  "integer_optimizer",
  "integer_updates",
  "num_directions_on_plateau",
  "num_directions_schedule",
  "sharpness_aware",
  "with_num_directions",
]
