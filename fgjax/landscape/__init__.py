"""Loss landscapes: 2-D slices around a solution, trajectory planes (PCA), sharpness.

Filter-normalised random planes and PCA planes of trajectories (Li et al., NeurIPS 2018), the
top Hessian eigenvalue by power iteration on forward-over-reverse Hessian-vector products, and
the loss rise under fixed-radius perturbations; used by `scripts/loss_landscape.py` and
`colab/loss_landscape.ipynb` to compare backprop and forward-gradient trajectories ("Stepping
Forward on the Last Mile", NeurIPS 2024).
"""

from fgjax.landscape._landscape import (
  filter_normalized_direction,
  hessian_top_eigenvalue,
  loss_rise,
  loss_surface,
  pca_directions,
  project,
)

__all__ = [
  "filter_normalized_direction",
  "hessian_top_eigenvalue",
  "loss_rise",
  "loss_surface",
  "pca_directions",
  "project",
]
