"""Small models and losses shared by tests, benchmarks and notebooks."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


class TinyMLP(nn.Module):
  """A small MLP classifier for tests."""

  hidden: tuple[int, ...] = (16,)
  num_classes: int = 3

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.tanh(nn.Dense(width)(x))
    return nn.Dense(self.num_classes, name="head")(x)


class TinyCNN(nn.Module):
  """A small convolutional classifier for tests."""

  features: int = 4
  num_classes: int = 3

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Conv(self.features, (3, 3))(x))
    x = nn.tanh(nn.Conv(self.features, (3, 3), strides=2)(x))
    return nn.Dense(self.num_classes, name="head")(x.reshape((x.shape[0], -1)))


def classification_loss(model: nn.Module, x: jax.Array, y: jax.Array):
  """loss(params) for softmax cross-entropy of `model` on one batch."""

  def loss(params):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return loss


def cosine(a, b) -> jax.Array:
  """Cosine similarity of two pytrees with the same structure."""
  a_flat = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(a)])
  b_flat = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(b)])
  return jnp.vdot(a_flat, b_flat) / (jnp.linalg.norm(a_flat) * jnp.linalg.norm(b_flat))


def jaxpr_equations(jaxpr):
  """Every equation of a (closed) jaxpr, sub-jaxprs included (jit, scan, custom_jvp, cond ...)."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for value in param if isinstance(param, tuple | list) else (param,):
        inner = getattr(value, "jaxpr", value)
        if hasattr(inner, "eqns"):
          yield from jaxpr_equations(inner)


def tree_vdot(a, b) -> jax.Array:
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
