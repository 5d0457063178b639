"""The ProtoNet head: class prototypes, squared Euclidean logits, the same head as a linear layer.

Prototypical networks (Snell, Swersky and Zemel, NeurIPS 2017) classify a query `x` by the nearest
class mean of the support embeddings:

.. math::
  c_k = \\frac{1}{|S_k|} \\sum_{(x_i, y_i) \\in S_k} f(x_i), \\qquad
  \\text{logit}_k(x) = -\\lVert f(x) - c_k \\rVert^2 .

Expanding the square, `-||f - c_k||² = 2 c_kᵀ f - ||c_k||² - ||f||²`, and the last term is the same
for every class, so softmax and argmax see a linear layer with `W_k = 2 c_k`, `b_k = -||c_k||²`
(Triantafillou et al. 2020, Proto-MAML). `prototype_head` builds that layer: a backbone from
`fgjax.models` with its `head` replaced by it is the zero-shot ProtoNet, and fine-tuning it (all
weights, or the head alone: a linear probe) starts from the ProtoNet, in float or in fixed point.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def prototypes(embeddings: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
  """Class means of `embeddings`: `c_k = mean{f_i : y_i = k}`.

  Args:
    embeddings: (num_support, dim).
    labels: (num_support,) integers in [0, num_classes).
    num_classes: N, the number of prototypes.

  Returns:
    (num_classes, dim) float32; a class without examples gets a zero prototype.

  Example:
    >>> c = prototypes(embed(model, variables, episode.support_x), episode.support_y, 5)
  """
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  counts = jnp.maximum(one_hot.sum(axis=0), 1.0)
  return (one_hot.T @ embeddings.astype(jnp.float32)) / counts[:, None]


def squared_distances(embeddings: jax.Array, centers: jax.Array) -> jax.Array:
  """`||f_i - c_k||²` for every pair: (num, dim) x (num_classes, dim) -> (num, num_classes)."""
  diff = embeddings.astype(jnp.float32)[:, None, :] - centers.astype(jnp.float32)[None, :, :]
  return jnp.sum(diff * diff, axis=-1)


def protonet_logits(embeddings: jax.Array, centers: jax.Array) -> jax.Array:
  """ProtoNet logits `-||f(x) - c_k||²` of query embeddings against prototypes `centers`."""
  return -squared_distances(embeddings, centers)


def prototype_head(
  centers: jax.Array, temperature: float | jax.Array = 1.0
) -> dict[str, jax.Array]:
  """The ProtoNet classifier as `Dense` parameters: `kernel = 2 Cᵀ / τ`, `bias = -||c_k||² / τ`.

  Its logits equal `protonet_logits / τ` plus `||f||² / τ`, the same for every class, so the
  predictions are those of the ProtoNet; τ (the temperature) only sets how sharp the softmax is,
  which matters when the head is fine-tuned: with τ = 1 and well-separated classes the support
  loss is ~0 and so is its gradient.

  Args:
    centers: (num_classes, dim) prototypes.
    temperature: τ > 0, dividing the logits.

  Returns:
    `{"kernel": (dim, num_classes), "bias": (num_classes,)}`, float32: a `head` for the models of
    `fgjax.models` with `num_classes` outputs.
  """
  centers = centers.astype(jnp.float32)
  return {
    "kernel": 2.0 * centers.T / temperature,
    "bias": -jnp.sum(centers * centers, axis=-1) / temperature,
  }


def mean_prototype_distance(centers: jax.Array) -> jax.Array:
  """The mean of `||c_k - c_l||²` over pairs k ≠ l (the scale of the ProtoNet's logit gaps)."""
  num = centers.shape[0]
  distances = squared_distances(centers, centers)
  return jnp.sum(distances) / max(num * (num - 1), 1)


def embed(model: nn.Module, variables, x: jax.Array, **kwargs) -> jax.Array:
  """The backbone's features: what `model` feeds its top-level `head`, instead of the logits.

  Works for every model in `fgjax.models` (each ends in a layer named `head`) without changing it:
  the call of the top-level `head` is intercepted and its input returned.

  Args:
    model: a Flax module whose top-level classifier is named `head`.
    variables: its variables (float or fixed point).
    x: inputs.
    **kwargs: passed to `model.apply` (e.g. `train=False`).

  Returns:
    (batch, dim) features.
  """

  def interceptor(next_fun, args, call_kwargs, context):
    if context.method_name == "__call__" and context.module.scope.path == ("head",):
      return args[0]
    return next_fun(*args, **call_kwargs)

  with nn.intercept_methods(interceptor):
    return model.apply(variables, x, **kwargs)
