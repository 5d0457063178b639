"""MobileNetV2 with a width multiplier."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from fgjax import quant as fq
from fgjax.models._common import batch_norm

# (expansion t, output channels c, repeats n, first stride s), from Sandler et al. 2018, Table 2.
_INVERTED_RESIDUAL_SETTING = (
  (1, 16, 1, 1),
  (6, 24, 2, 2),
  (6, 32, 3, 2),
  (6, 64, 4, 2),
  (6, 96, 3, 1),
  (6, 160, 3, 2),
  (6, 320, 1, 1),
)


def _make_divisible(value: float, divisor: int = 8) -> int:
  """Rounds to a multiple of `divisor`, never below 90% of `value` (as torchvision)."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * value:
    rounded += divisor
  return rounded


def _depthwise_by_shifts(
  lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, **kwargs
) -> jax.Array:
  """A float NHWC depthwise conv as kh·kw shifted multiply-adds (`lax.conv_general_dilated`'s
  signature, as `flax.linen.Conv(conv_general_dilated=...)` calls it).

  y[b, i, j, c] = Σ_{u,v} x_pad[b, s_h i + u, s_w j + v, c] · k[u, v, 0, c]: the same sum as the
  grouped conv (up to float summation order), but XLA:CPU runs these elementwise ops and their
  gradients several times faster than its grouped convolution (measured 4x for the backward, 30x
  for the forward of a 64x8x8x96 map).
  """
  del kwargs  # dimension numbers (NHWC, HWIO), feature_group_count = channels, precision
  if any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))):
    raise ValueError("_depthwise_by_shifts: dilation is not supported.")
  kh, kw, _, _ = rhs.shape
  sh, sw = window_strides
  x = jnp.pad(lhs, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  out_h = (x.shape[1] - kh) // sh + 1
  out_w = (x.shape[2] - kw) // sw + 1
  y = 0.0
  for u in range(kh):
    for v in range(kw):
      window = lax.slice(
        x,
        (0, u, v, 0),
        (x.shape[0], u + sh * (out_h - 1) + 1, v + sw * (out_w - 1) + 1, x.shape[3]),
        (1, sh, sw, 1),
      )
      y = y + window * rhs[u, v, 0]
  return y


class _ConvBN(nn.Module):
  """Conv (no bias) -> BatchNorm (optional) -> optional ReLU6 (or ReLU)."""

  features: int
  kernel_size: int = 3
  strides: int = 1
  groups: int = 1
  activation: bool = True
  quant: fq.QuantConfig | None = None
  relu6: bool = True
  normalize: bool = True
  shifts: bool = False  # a float depthwise conv as shifted multiply-adds (faster on CPU)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    pad = (self.kernel_size - 1) // 2
    by_shifts = self.shifts and self.quant is None and self.groups == x.shape[-1] == self.features
    x = fq.Conv(
      self.features,
      (self.kernel_size, self.kernel_size),
      strides=self.strides,
      padding=((pad, pad), (pad, pad)),
      feature_group_count=self.groups,
      use_bias=False,
      quant=self.quant,
      conv_general_dilated=_depthwise_by_shifts if by_shifts else None,
      name="conv",
    )(x)
    if self.normalize:
      x = batch_norm(train, "bn")(x)
    if not self.activation:
      return x
    return nn.relu6(x) if self.relu6 else nn.relu(x)


class _InvertedResidual(nn.Module):
  """1x1 expansion, 3x3 depthwise, 1x1 linear projection; residual when shapes allow."""

  features: int
  strides: int
  expansion: int
  quant: fq.QuantConfig | None = None
  quant_friendly: bool = False
  depthwise_quant: fq.QuantConfig | None = None
  depthwise_shifts: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    in_features = x.shape[-1]
    hidden = in_features * self.expansion
    relu6 = not self.quant_friendly
    y = x
    if self.expansion != 1:
      y = _ConvBN(hidden, kernel_size=1, quant=self.quant, relu6=relu6, name="expand")(y, train)
    y = _ConvBN(
      hidden,
      strides=self.strides,
      groups=hidden,
      quant=self.depthwise_quant,
      relu6=relu6,
      # Quantization-friendly: no BatchNorm and no activation after the depthwise conv.
      normalize=not self.quant_friendly,
      activation=not self.quant_friendly,
      shifts=self.depthwise_shifts,
      name="depthwise",
    )(y, train)
    y = _ConvBN(self.features, kernel_size=1, activation=False, quant=self.quant, name="project")(
      y, train
    )
    if self.strides == 1 and in_features == self.features:
      y = x + y
    return y


class MobileNetV2(nn.Module):
  """MobileNetV2 (Sandler et al. 2018) with a width multiplier.

  `stem` (3x3 conv + BN + ReLU6), 17 inverted-residual blocks `block_0` ... `block_16`, a 1x1 conv
  to 1280 channels `conv_17`, global average pooling, `head` (the original's dropout is left out:
  the forward pass stays deterministic, which forward-gradient estimators rely on). Channel counts
  follow torchvision (`round to a multiple of 8`); with width 1.0, 3 input channels and 1000 classes
  the model has 3,504,872 parameters, as torchvision's `mobilenet_v2`.

  `small_images=True` (default) is the CIFAR variant: the stem and the second stage use stride 1
  instead of 2 (total downsampling 8 instead of 32), so 32x32 inputs keep a 4x4 map. Strides do not
  change the parameter count.

  Batch statistics: call with `train=True` and `mutable=["batch_stats"]` to pretrain with backprop
  (statistics update); call with `train=False` for evaluation and for forward-gradient or SPSA
  adaptation, which then uses the frozen running statistics and needs no mutable collection.

  Quantization-friendly variant (`quant_friendly=True`), after Sheng et al., "A Quantization-
  Friendly Separable Convolution for MobileNets" (EMC2 2018; the approach of the LPIRC 2018 Track 1
  winners, Alyamkin et al. 2019): ReLU instead of ReLU6 everywhere (the clip at 6 wastes int8
  range on layers whose activations stay small and distorts the ones that do not), and the
  depthwise conv has no BatchNorm and no activation (BatchNorm folded into a depthwise kernel
  gives channels with tiny variance huge weights, which break per-tensor int8 weights). The
  depthwise convs can also keep a higher precision (`depthwise_quant`): they hold about 2 % of
  the parameters and MACs, so 16 bits there costs little. fgjax quantizes weights per channel and
  keeps BatchNorm in float (no folding), which already removes the worst of the second problem;
  the report (docs/efficiency.md) measures what is left.

  Attributes:
    width_multiplier: scales every channel count (the last conv is never narrower than 1280).
    num_classes: number of output logits.
    small_images: stride 1 in the stem and second stage (for 32x32 and smaller inputs).
    quant: quantization of every conv and matmul (`None`: float). BatchNorm stays in float.
    quant_friendly: the quantization-friendly variant (above); same parameter names, minus the
      depthwise BatchNorms.
    depthwise_quant: quantization of the depthwise convs; default (`"same"`): `quant`.
    depthwise_shifts: compute the float depthwise convs as 9 shifted multiply-adds instead of a
      grouped `conv_general_dilated`: the same parameters and outputs (up to float summation
      order), several times faster to train on XLA:CPU, whose grouped convolutions (and their
      gradients) are slow. Quantized depthwise convs are unaffected. The jaxpr then has no conv
      for these layers, so `fgjax.efficiency.count_ops` counts them as elementwise ops: count
      operations with the default (False).
  """

  width_multiplier: float = 1.0
  num_classes: int = 10
  small_images: bool = True
  quant: fq.QuantConfig | None = None
  quant_friendly: bool = False
  depthwise_quant: fq.QuantConfig | None | str = "same"
  depthwise_shifts: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Logits for images `x` of shape (batch, height, width, channels)."""
    stem_features = _make_divisible(32 * self.width_multiplier)
    last_features = _make_divisible(1280 * max(1.0, self.width_multiplier))
    relu6 = not self.quant_friendly
    depthwise_quant = self.quant if self.depthwise_quant == "same" else self.depthwise_quant
    x = _ConvBN(
      stem_features,
      strides=1 if self.small_images else 2,
      quant=self.quant,
      relu6=relu6,
      name="stem",
    )(x, train)
    index = 0
    for stage, (expansion, channels, repeats, stride) in enumerate(_INVERTED_RESIDUAL_SETTING):
      if self.small_images and stage == 1:
        stride = 1
      features = _make_divisible(channels * self.width_multiplier)
      for repeat in range(repeats):
        x = _InvertedResidual(
          features,
          stride if repeat == 0 else 1,
          expansion,
          quant=self.quant,
          quant_friendly=self.quant_friendly,
          depthwise_quant=depthwise_quant,
          depthwise_shifts=self.depthwise_shifts,
          name=f"block_{index}",
        )(x, train)
        index += 1
    x = _ConvBN(last_features, kernel_size=1, quant=self.quant, relu6=relu6, name=f"conv_{index}")(
      x, train
    )
    x = jnp.mean(x, axis=(1, 2))
    return fq.Dense(self.num_classes, quant=self.quant, name="head")(x)
