"""Models by name: `get_model("resnet18", num_classes=10)`."""

from __future__ import annotations

import flax.linen as nn

from fgjax.models._crnn import CRNN
from fgjax.models._mlp import MLP
from fgjax.models._mobilenet import MobileNetV2
from fgjax.models._resnet import ResNet12, ResNet18
from fgjax.models._small_cnn import SmallCNN
from fgjax.models._vit import ViTTiny

# A plain dict, no registration side effects: adding a model means adding a line here.
_MODELS: dict[str, type[nn.Module]] = {
  "mlp": MLP,
  "small_cnn": SmallCNN,
  "resnet12": ResNet12,
  "resnet18": ResNet18,
  "mobilenet_v2": MobileNetV2,
  "vit_tiny": ViTTiny,
  "crnn": CRNN,
}


def _normalize(name: str) -> str:
  return name.lower().replace("_", "").replace("-", "")


def model_names() -> list[str]:
  """The names `get_model` accepts (canonical spelling)."""
  return list(_MODELS)


def get_model(name: str, **kwargs) -> nn.Module:
  """Builds a model by name, passing `kwargs` (e.g. `num_classes`, `quant`) to its constructor.

  Names are matched ignoring case, "_" and "-", so "resnet18", "ResNet18" and "vit-tiny" all work.

  Args:
    name: one of `model_names()`: mlp, small_cnn, resnet12, resnet18, mobilenet_v2, vit_tiny, crnn.
    **kwargs: the model's attributes.

  Returns:
    The (unbound) Flax module.

  Raises:
    ValueError: for an unknown name; the message lists the valid ones.

  Example:
    >>> model = get_model("small_cnn", num_classes=10, quant=fgjax.quant.preset("w8a8"))
  """
  by_normalized = {_normalize(key): constructor for key, constructor in _MODELS.items()}
  constructor = by_normalized.get(_normalize(name))
  if constructor is None:
    raise ValueError(f"get_model: unknown model {name!r}; valid names: {', '.join(_MODELS)}.")
  return constructor(**kwargs)
