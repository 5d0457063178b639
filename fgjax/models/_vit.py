"""A small Vision Transformer with optional deep visual prompt tuning."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from fgjax import quant as fq


class _Stem(nn.Module):
  """Patch embedding (a conv with kernel = stride = patch), class token, learned positions."""

  dim: int
  patch_size: int
  quant: fq.QuantConfig | None = None

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    patches = fq.Conv(
      self.dim,
      (self.patch_size, self.patch_size),
      strides=self.patch_size,
      padding="VALID",
      quant=self.quant,
      name="patch_embed",
    )(images)
    batch, height, width, _ = patches.shape
    tokens = patches.reshape((batch, height * width, self.dim))
    cls = self.param("cls", nn.initializers.zeros, (1, 1, self.dim))
    tokens = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.dim)), tokens], axis=1)
    positions = self.param(
      "pos_embedding", nn.initializers.normal(stddev=0.02), (1, tokens.shape[1], self.dim)
    )
    return tokens + positions


class _SelfAttention(nn.Module):
  """Multi-head self-attention whose q, k, v and output projections are `fgjax.quant` layers.

  Only the projections carry weights, so only they are quantized; the products q k^T and softmax(q
  k^T) v, and the softmax itself, stay in float.
  """

  num_heads: int
  quant: fq.QuantConfig | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    if dim % self.num_heads:
      raise ValueError(f"ViTTiny: dim {dim} is not divisible by num_heads {self.num_heads}.")
    head_dim = dim // self.num_heads

    def project(name):
      return fq.DenseGeneral((self.num_heads, head_dim), quant=self.quant, name=name)(x)

    query, key, value = project("query"), project("key"), project("value")
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key) / math.sqrt(head_dim)
    weights = jax.nn.softmax(logits, axis=-1)
    attended = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
    return fq.DenseGeneral(dim, axis=(-2, -1), quant=self.quant, name="out")(attended)


class _EncoderBlock(nn.Module):
  """Pre-norm transformer block; with `num_prompts > 0`, it inserts its own deep prompts.

  The block's own prompt tokens (parameter `prompts`, shape (num_prompts, dim)) go right after the
  class token; their outputs are dropped at the end of the block, so the next block sees fresh
  prompts of its own (VPT-deep, Jia et al. 2022).
  """

  num_heads: int
  mlp_dim: int
  num_prompts: int = 0
  quant: fq.QuantConfig | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, _, dim = x.shape
    if self.num_prompts:
      prompts = self.param("prompts", _prompt_init, (self.num_prompts, dim))
      x = jnp.concatenate(
        [x[:, :1], jnp.broadcast_to(prompts, (batch, self.num_prompts, dim)), x[:, 1:]], axis=1
      )
    x = x + _SelfAttention(self.num_heads, quant=self.quant, name="attention")(
      nn.LayerNorm(name="ln_0")(x)
    )
    y = nn.LayerNorm(name="ln_1")(x)
    y = nn.gelu(fq.Dense(self.mlp_dim, quant=self.quant, name="mlp_0")(y))
    x = x + fq.Dense(dim, quant=self.quant, name="mlp_1")(y)
    if self.num_prompts:
      x = jnp.concatenate([x[:, :1], x[:, 1 + self.num_prompts :]], axis=1)
    return x


def _prompt_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
  # Uniform Xavier-style init, scaled by the token width (VPT uses sqrt(6 / (patch_dim + dim))).
  bound = math.sqrt(6.0 / (2 * shape[-1]))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class ViTTiny(nn.Module):
  """Vision Transformer (Dosovitskiy et al. 2021), ViT-Ti by default, with optional deep prompts.

  `stem` (patch embedding conv, class token `cls`, learned `pos_embedding`), `block_0` ...
  `block_<depth-1>` (pre-norm attention + MLP blocks), `norm` (LayerNorm), `head` on the class
  token. The image size is read from the input at `init` (the position table has one row per patch
  plus one); apply with the same image size afterwards. With the defaults (dim 192, depth 12, 3
  heads, MLP 768, patch 16) on 224x224x3 inputs and 1000 classes the model has 5,717,416 parameters,
  as timm's `vit_tiny_patch16_224`. Dropout is left out so that the forward pass is deterministic.

  Deep visual prompt tuning (VPT-deep, Jia et al. 2022): with `num_prompts = p > 0` every block owns
  a parameter `block_<i>/prompts` of shape (p, dim), prepended (after the class token) to that
  block's input and dropped from its output; the pretrained weights are unchanged in shape, so a
  pretrained checkpoint loads by adding the prompt leaves. Train only prompts and head with a path
  mask such as the regular expression `r"prompts|^head/"` (see `path_mask` in fgjax._masks).

  Attributes:
    patch_size: side of the square patches.
    dim: token width.
    depth: number of transformer blocks.
    num_heads: attention heads (must divide `dim`).
    mlp_dim: hidden width of each block's MLP.
    num_prompts: deep prompt tokens per block (0: no prompts).
    num_classes: number of output logits.
    quant: quantization of the patch embedding, the q/k/v/out projections, the MLPs and the head
      (`None`: float). LayerNorm, softmax and the attention products stay in float.
  """

  patch_size: int = 16
  dim: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_dim: int = 768
  num_prompts: int = 0
  num_classes: int = 10
  quant: fq.QuantConfig | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Logits for images `x` (batch, height, width, channels), sides divisible by the patch."""
    del train  # No batch statistics or dropout.
    if x.shape[1] % self.patch_size or x.shape[2] % self.patch_size:
      raise ValueError(
        f"ViTTiny: image size {x.shape[1:3]} is not divisible by patch_size {self.patch_size}."
      )
    x = _Stem(self.dim, self.patch_size, quant=self.quant, name="stem")(x)
    for index in range(self.depth):
      x = _EncoderBlock(
        self.num_heads, self.mlp_dim, self.num_prompts, quant=self.quant, name=f"block_{index}"
      )(x)
    x = nn.LayerNorm(name="norm")(x)
    return fq.Dense(self.num_classes, quant=self.quant, name="head")(x[:, 0])
