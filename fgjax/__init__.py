"""fgjax: forward gradients in fixed point, in JAX.

Estimate gradients from forward calls only (SPSA, sign-m-SPSA) or forward-mode autodiff (jvp),
in float or on integer weights, as Optax transforms. From "Stepping Forward on the Last Mile"
(Chen et al., NeurIPS 2024).
"""

from fgjax import (
  data,
  efficiency,
  estimators,
  fewshot,
  landscape,
  lut,
  models,
  parallel,
  quant,
  sparse,
  testing,
  training,
  transforms,
)
from fgjax._api import value_and_grad
from fgjax._masks import leaf_paths, path_mask
from fgjax.estimators import Estimate
from fgjax.transforms import (
  ForwardGradientState,
  IntegerOptimizerState,
  IntegerUpdatesState,
  apply_integer_updates,
  changed_fraction,
  forward_gradient,
  integer_optimizer,
  integer_updates,
  num_directions_on_plateau,
  num_directions_schedule,
  sharpness_aware,
)

__version__ = "0.1.0"

__all__ = [
  "Estimate",
  "ForwardGradientState",
  "IntegerOptimizerState",
  "IntegerUpdatesState",
  "apply_integer_updates",
  "changed_fraction",
  "data",
  "efficiency",
  "estimators",
  "fewshot",
  "forward_gradient",
  "integer_optimizer",
  "integer_updates",
  "landscape",
  "leaf_paths",
  "lut",
  "models",
  "num_directions_on_plateau",
  "num_directions_schedule",
  "parallel",
  "path_mask",
  "quant",
  "sharpness_aware",
  "sparse",
  "testing",
  "training",
  "transforms",
  "value_and_grad",
]
