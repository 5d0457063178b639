"""Flax models for last-mile adaptation; each takes `num_classes` and an optional `quant` config.

Every weight matmul and conv goes through `fgjax.quant` layers, so one `quant` setting quantizes the
whole model. Every model's classifier is named `head`, and its top-level layers follow one naming
rule (`stem`, `<kind>_<i>`, `norm`, `head`) so that `layer_names` gives their forward order for
"linear probe" and "last k layers" masks.

Batch statistics: models with BatchNorm (ResNet12, ResNet18, MobileNetV2, CRNN) take `train` at call
time. `train=True` (with `mutable=["batch_stats"]`) uses and updates batch statistics, for backprop
pretraining. `train=False` uses the frozen running statistics and writes nothing; use it for
evaluation and for forward-gradient / SPSA adaptation, whose perturbed forward passes must not move
the statistics. Models without BatchNorm accept `train` and ignore it.
"""

from fgjax.models._crnn import CRNN, QuantGRUCell
from fgjax.models._factory import get_model, model_names
from fgjax.models._mlp import MLP
from fgjax.models._mobilenet import MobileNetV2
from fgjax.models._naming import layer_names
from fgjax.models._resnet import ResNet12, ResNet18
from fgjax.models._small_cnn import SmallCNN
from fgjax.models._vit import ViTTiny

__all__ = [
  "CRNN",
  "MLP",
  "MobileNetV2",
  "QuantGRUCell",
  "ResNet12",
  "ResNet18",
  "SmallCNN",
  "ViTTiny",
  "get_model",
  "layer_names",
  "model_names",
]
