"""Sparse training: MEST (elastic mutation, soft memory bound) as an optax transformation.

- `mest`: wraps an optimizer; masks per leaf (unstructured, block, channel), mutation with a
  decaying ratio, importance |w| + λ|ĝ| from the gradient estimate, sparse directions for
  forward-gradient estimators, masked updates.
- `sparse_estimate`: any estimator with directions restricted to the active weights.
- `forgetting_init`, `forgetting_update`, `keep_examples`: example forgetting (Toneva et al.
  2019), to drop the examples that are never forgotten.
"""

from fgjax.sparse._forgetting import (
  ForgettingState,
  forgetting_init,
  forgetting_update,
  keep_examples,
)
from fgjax.sparse._mest import (
  MestState,
  apply_masks,
  decaying_ratio,
  density,
  mest,
  sparse_estimate,
)
from fgjax.sparse._schemes import SCHEMES, UnitView

__all__ = [
  "SCHEMES",
  "ForgettingState",
  "MestState",
  "UnitView",
  "apply_masks",
  "decaying_ratio",
  "density",
  "forgetting_init",
  "forgetting_update",
  "keep_examples",
  "mest",
  "sparse_estimate",
]
