"""A small convolutional network for 8x8 to 32x32 images."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from fgjax import quant as fq


class SmallCNN(nn.Module):
  """`(Conv 3x3 -> ReLU -> 2x2 max-pool)` per entry of `features`, flatten, `Dense -> ReLU`, `head`.

  No batch normalization, so forward-gradient training needs no care about batch statistics. Convs
  use "SAME" padding; pooling uses "SAME" padding too, so an 8x8 input stays non-empty. Layers are
  named `conv_0`, `conv_1`, ..., `dense_<n>`, `head` (one index counts all body layers, see
  `layer_names`).

  Parameter count, for input channels c_0, conv widths c_1..c_n, hidden width h, C classes and a
  spatial size s after the n poolings (s = ceil(H / 2^n) * ceil(W / 2^n)): `sum_i (9 c_{i-1} + 1)
  c_i + (s c_n + 1) h + (h + 1) C`.

  Attributes:
    features: output channels of each conv layer.
    hidden: width of the dense layer before the head (0: no such layer).
    num_classes: number of output logits.
    quant: quantization of every conv and matmul (`None`: float).
  """

  features: Sequence[int] = (16, 32)
  hidden: int = 64
  num_classes: int = 10
  quant: fq.QuantConfig | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Logits for images `x` of shape (batch, height, width, channels)."""
    del train  # No batch statistics or dropout.
    index = 0
    for width in self.features:
      x = fq.Conv(width, (3, 3), padding="SAME", quant=self.quant, name=f"conv_{index}")(x)
      x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2), padding="SAME")
      index += 1
    x = x.reshape((x.shape[0], -1))
    if self.hidden:
      x = nn.relu(fq.Dense(self.hidden, quant=self.quant, name=f"dense_{index}")(x))
    return fq.Dense(self.num_classes, quant=self.quant, name="head")(x)
