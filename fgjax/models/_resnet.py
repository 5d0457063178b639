"""Residual networks: ResNet-12 (few-shot learning) and ResNet-18 (small-image variant)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fgjax import quant as fq
from fgjax.models._common import batch_norm


class _ResNet12Block(nn.Module):
  """Three `Conv 3x3 -> BN` (leaky ReLU between), a `1x1 conv -> BN` shortcut, max-pool."""

  features: int
  quant: fq.QuantConfig | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = functools.partial(fq.Conv, self.features, use_bias=False, quant=self.quant)
    shortcut = batch_norm(train, "shortcut_bn")(conv((1, 1), name="shortcut_conv")(x))
    for index in range(3):
      x = conv((3, 3), padding=((1, 1), (1, 1)), name=f"conv_{index}")(x)
      x = batch_norm(train, f"bn_{index}")(x)
      if index < 2:
        x = nn.leaky_relu(x, 0.1)
    x = nn.leaky_relu(x + shortcut, 0.1)
    # "SAME" pooling keeps tiny test inputs (8x8 through four poolings) non-empty.
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")


class ResNet12(nn.Module):
  """ResNet-12 as used in few-shot learning (MetaOptNet, Lee et al. 2019; FEAT; Tian et al. 2020).

  Four residual blocks (`block_0` ... `block_3`), each of three 3x3 conv + BatchNorm + leaky ReLU
  (0.1) with a 1x1 conv + BatchNorm shortcut and a 2x2 max-pool, then global average pooling and
  `head`. Convs have no bias (BatchNorm follows). With widths 64-160-320-640 and 3 input channels
  the body has 12,424,320 parameters (the usual "12.4M"), plus `(640 + 1) * num_classes` in the
  head.

  Batch statistics: call with `train=True` and `mutable=["batch_stats"]` to pretrain with backprop
  (statistics update); call with `train=False` for evaluation and for forward-gradient or SPSA
  adaptation, which then uses the frozen running statistics and needs no mutable collection
  (perturbed passes must not move the statistics).

  Attributes:
    widths: output channels of the four blocks.
    num_classes: number of output logits.
    quant: quantization of every conv and matmul (`None`: float). BatchNorm stays in float.
  """

  widths: Sequence[int] = (64, 160, 320, 640)
  num_classes: int = 5
  quant: fq.QuantConfig | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Logits for images `x` of shape (batch, height, width, channels)."""
    for index, width in enumerate(self.widths):
      x = _ResNet12Block(width, quant=self.quant, name=f"block_{index}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return fq.Dense(self.num_classes, quant=self.quant, name="head")(x)


class _BasicBlock(nn.Module):
  """The ResNet basic block: two `Conv 3x3 -> BN`, identity or `1x1 conv -> BN` shortcut, ReLU."""

  features: int
  strides: int = 1
  quant: fq.QuantConfig | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = functools.partial(fq.Conv, self.features, use_bias=False, quant=self.quant)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = conv((1, 1), strides=self.strides, name="shortcut_conv")(x)
      shortcut = batch_norm(train, "shortcut_bn")(shortcut)
    y = conv((3, 3), strides=self.strides, padding=((1, 1), (1, 1)), name="conv_0")(x)
    y = nn.relu(batch_norm(train, "bn_0")(y))
    y = conv((3, 3), padding=((1, 1), (1, 1)), name="conv_1")(y)
    y = batch_norm(train, "bn_1")(y)
    return nn.relu(y + shortcut)


class _Stem(nn.Module):
  """A 3x3 stride-1 conv, BatchNorm, ReLU: the small-image (CIFAR) stem, without max-pool."""

  features: int
  quant: fq.QuantConfig | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = fq.Conv(
      self.features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, quant=self.quant, name="conv"
    )(x)
    return nn.relu(batch_norm(train, "bn")(x))


class ResNet18(nn.Module):
  """ResNet-18 (He et al. 2016) with the small-image stem used for CIFAR-sized inputs.

  `stem` (3x3 conv stride 1 + BatchNorm + ReLU, no max-pool), eight basic blocks `block_0` ...
  `block_7` (two per stage; stages of widths 64-128-256-512, strides 1-2-2-2), global average
  pooling, `head`. With 3 input channels and 10 classes this has 11,173,962 parameters, the figure
  usually quoted for ResNet-18 on CIFAR-10 (e.g. the kuangliu/pytorch-cifar model); BatchNorm
  running statistics are not counted (they live in `batch_stats`).

  Batch statistics: call with `train=True` and `mutable=["batch_stats"]` to pretrain with backprop
  (statistics update); call with `train=False` for evaluation and for forward-gradient or SPSA
  adaptation, which then uses the frozen running statistics and needs no mutable collection
  (perturbed passes must not move the statistics).

  Attributes:
    widths: channels of the four stages.
    blocks_per_stage: basic blocks in each stage ((2, 2, 2, 2) is ResNet-18).
    num_classes: number of output logits.
    quant: quantization of every conv and matmul (`None`: float). BatchNorm stays in float.
  """

  widths: Sequence[int] = (64, 128, 256, 512)
  blocks_per_stage: Sequence[int] = (2, 2, 2, 2)
  num_classes: int = 10
  quant: fq.QuantConfig | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Logits for images `x` of shape (batch, height, width, channels)."""
    x = _Stem(self.widths[0], quant=self.quant, name="stem")(x, train)
    index = 0
    for stage, (width, num_blocks) in enumerate(
      zip(self.widths, self.blocks_per_stage, strict=True)
    ):
      for block in range(num_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = _BasicBlock(width, strides, quant=self.quant, name=f"block_{index}")(x, train)
        index += 1
    x = jnp.mean(x, axis=(1, 2))
    return fq.Dense(self.num_classes, quant=self.quant, name="head")(x)
