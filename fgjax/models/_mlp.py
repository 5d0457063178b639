"""A multilayer perceptron on flattened inputs."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax

from fgjax import quant as fq


class MLP(nn.Module):
  """Fully connected network: flatten, `Dense -> activation` per hidden size, then a `head`.

  Layers are named `dense_0`, `dense_1`, ..., `head`. With input dimension d, hidden sizes h_1..h_n
  and C classes the parameter count is `sum_i (h_{i-1} + 1) * h_i + (h_n + 1) * C` with h_0 = d.

  Attributes:
    hidden_sizes: width of each hidden layer, input side first.
    num_classes: number of output logits.
    activation: nonlinearity after each hidden layer.
    quant: quantization of every weight matmul (`None`: float). See `fgjax.quant`.

  Example:
    >>> model = MLP(hidden_sizes=(32,), num_classes=10)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    >>> logits = model.apply(variables, x)  # (batch, 10)
  """

  hidden_sizes: Sequence[int] = (128,)
  num_classes: int = 10
  activation: Callable[[jax.Array], jax.Array] = nn.relu
  quant: fq.QuantConfig | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Logits for a batch `x` of shape (batch, ...); `train` is accepted for a uniform interface."""
    del train  # No batch statistics or dropout.
    x = x.reshape((x.shape[0], -1))
    for index, width in enumerate(self.hidden_sizes):
      x = self.activation(fq.Dense(width, quant=self.quant, name=f"dense_{index}")(x))
    return fq.Dense(self.num_classes, quant=self.quant, name="head")(x)
