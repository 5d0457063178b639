"""Gradient estimators with one interface: `est(loss_fn, params, *args, key=key) -> Estimate`.

- `jvp`: the exact forward gradient from `jax.jvp` (forward mode, K directions).
- `spsa`: zeroth order from forward calls only (central or one-sided, sign-m-SPSA).
- `backprop`: `jax.value_and_grad`, the reference.
"""

from fgjax.estimators._backprop import Backprop, backprop
from fgjax.estimators._base import Estimate
from fgjax.estimators._jvp import JVP, jvp
from fgjax.estimators._perturbation import DISTRIBUTIONS, sample_directions
from fgjax.estimators._spsa import SPSA, spsa

__all__ = [
  "DISTRIBUTIONS",
  "JVP",
  "SPSA",
  "Backprop",
  "Estimate",
  "backprop",
  "jvp",
  "sample_directions",
  "spsa",
]
