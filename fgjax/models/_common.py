"""Pieces shared by the models: BatchNorm with the library's batch-statistics rule."""

from __future__ import annotations

import flax.linen as nn

# Batch statistics (every BatchNorm model in fgjax.models follows this rule):
#   train=True   BatchNorm normalizes with the batch's statistics and updates the running averages
#                in `batch_stats` (apply with mutable=["batch_stats"]). This is for pretraining with
#                backprop, where each step runs the network once on the true weights.
#   train=False  BatchNorm normalizes with the stored running averages and never writes them, so
#                `apply` needs no mutable collection. Use this for evaluation AND for
#                forward-gradient / SPSA adaptation: those estimators evaluate the loss several
#                times per step on perturbed weights; letting perturbed passes update the
#                statistics would corrupt them (and make loss differences depend on evaluation
#                order). Frozen statistics are the standard choice for last-mile fine-tuning.
_BATCH_NORM_MOMENTUM = 0.9
_BATCH_NORM_EPSILON = 1e-5


def batch_norm(train: bool, name: str | None = None) -> nn.BatchNorm:
  """BatchNorm using batch statistics when `train`, else the frozen running averages."""
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=_BATCH_NORM_MOMENTUM,
    epsilon=_BATCH_NORM_EPSILON,
    name=name,
  )
