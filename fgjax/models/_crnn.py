"""A convolutional recurrent network for keyword spotting on log-mel spectrograms."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax

from fgjax import quant as fq
from fgjax.models._common import batch_norm


class QuantGRUCell(nn.GRUCell):
  """`flax.linen.GRUCell` whose six projections are `fgjax.quant.Dense`, so `quant` reaches them.

  Same equations, parameter names (`ir`, `iz`, `in`, `hr`, `hz`, `hn`) and initializers as the flax
  cell; with `quant=None` it computes exactly what `nn.GRUCell` computes. The gates' sigmoid/tanh
  and the state update stay in float.

  Attributes:
    quant: quantization of the input and recurrent projections (`None`: float).
  """

  quant: fq.QuantConfig | None = None

  @nn.compact
  def __call__(self, carry: jax.Array, inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One step: returns `(new_hidden, new_hidden)`."""
    hidden = carry
    features = hidden.shape[-1]
    dense_h = functools.partial(
      fq.Dense,
      features=features,
      use_bias=False,
      kernel_init=self.recurrent_kernel_init,
      bias_init=self.bias_init,
      param_dtype=self.param_dtype,
      quant=self.quant,
    )
    dense_i = functools.partial(
      fq.Dense,
      features=features,
      use_bias=True,
      kernel_init=self.kernel_init,
      bias_init=self.bias_init,
      param_dtype=self.param_dtype,
      quant=self.quant,
    )
    reset = self.gate_fn(dense_i(name="ir")(inputs) + dense_h(name="hr")(hidden))
    update = self.gate_fn(dense_i(name="iz")(inputs) + dense_h(name="hz")(hidden))
    candidate = self.activation_fn(
      dense_i(name="in")(inputs) + reset * dense_h(name="hn", use_bias=True)(hidden)
    )
    new_hidden = (1.0 - update) * candidate + update * hidden
    return new_hidden, new_hidden


class CRNN(nn.Module):
  """Conv + GRU keyword spotter (in the spirit of Arik et al. 2017) on log-mel spectrograms.

  Input: (batch, time, mels, 1), e.g. `fgjax.data.log_mel_spectrogram(waves)[..., None]`. Then
  `conv_0` ... `conv_<n-1>` (each 3x3 conv without bias + BatchNorm + ReLU + 2x2 max-pool over time
  and mel), the mel and channel axes are flattened per time step, `gru_<n>` runs a GRU over time
  (`nn.RNN(QuantGRUCell)`, so its projections are quantized too), and `head` classifies the final
  hidden state.

  Batch statistics: call with `train=True` and `mutable=["batch_stats"]` to pretrain with backprop
  (statistics update); call with `train=False` for evaluation and for forward-gradient or SPSA
  adaptation, which then uses the frozen running statistics and needs no mutable collection.

  Attributes:
    features: output channels of each conv block.
    hidden: GRU state width.
    num_classes: number of output logits.
    quant: quantization of every conv and matmul, the GRU's included (`None`: float). BatchNorm and
      the GRU's gate nonlinearities stay in float.
  """

  features: Sequence[int] = (16, 32)
  hidden: int = 64
  num_classes: int = 10
  quant: fq.QuantConfig | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Logits for spectrograms `x` of shape (batch, time, mels, 1)."""
    for index, width in enumerate(self.features):
      x = _ConvBlock(width, quant=self.quant, name=f"conv_{index}")(x, train)
    batch, time, mels, channels = x.shape
    x = x.reshape((batch, time, mels * channels))
    # The cell carries the name: its parameters live at `gru_<n>/ir/kernel` etc. (nn.RNN has none).
    cell = QuantGRUCell(self.hidden, quant=self.quant, name=f"gru_{len(self.features)}")
    # Quantization scales (integer weight storage) are shared by all time steps, like params.
    hidden = nn.RNN(cell, return_carry=True, variable_broadcast=("params", "quant"))(x)[0]
    return fq.Dense(self.num_classes, quant=self.quant, name="head")(hidden)


class _ConvBlock(nn.Module):
  """3x3 conv (no bias) -> BatchNorm -> ReLU -> 2x2 max-pool ("SAME", so short inputs survive)."""

  features: int
  quant: fq.QuantConfig | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = fq.Conv(
      self.features, (3, 3), padding="SAME", use_bias=False, quant=self.quant, name="conv"
    )(x)
    x = nn.relu(batch_norm(train, "bn")(x))
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
