"""Per-episode fine-tuning from the ProtoNet: backprop, jvp, SPSA, sign-m-SPSA; float, fixed point.

The few-shot protocol of "Stepping Forward on the Last Mile" (Chen et al., NeurIPS 2024):
a backbone pretrained on base classes meets an episode of new classes. Its zero-shot classifier is
the ProtoNet (prototypes of the support embeddings); fine-tuning then adapts the backbone and/or
the classifier on the support set alone and is scored on the episode's queries.

`EpisodeLearner` builds, for one setting (method, precision, trainable subset, steps, learning
rate), the episode model (backbone + `prototype_head`), optionally in fixed point
(`fgjax.quant.to_fixed_point`: integer kernels, perturbed and updated on their grid), and one
jitted function that runs the whole episode: zero-shot accuracy, `steps` updates with
`fgjax.training.make_optimizer` (one estimator interface for every method), final accuracy. It
compiles once per setting and episode shape; the episode, the prototypes and the grid steps are
arguments. Each step's loss is the cross-entropy of the support images, randomly shifted by up to
`shift` pixels (a fresh shift every step, so a 1-shot support still has a loss to descend, as in
the fine-tuning of Hu et al., "P>M>F", 2022); BatchNorm statistics stay frozen (`train=False`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import fgjax
from fgjax import quant as fq
from fgjax import training
from fgjax.fewshot._episodes import Episode
from fgjax.fewshot._protonet import embed, mean_prototype_distance, prototype_head, prototypes

PyTree = Any
METHODS = ("none", "backprop", "jvp", "spsa", "sign_spsa")
TRAINABLE = ("full", "linear_probe", "prompts")
PADDINGS = ("zeros", "edge")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """One fine-tuning setting (a row of the few-shot table).

  Attributes:
    method: "none" (zero-shot ProtoNet), "backprop", "jvp", "spsa" or "sign_spsa" (sign-m-SPSA).
    precision: a `fgjax.quant.preset` name; integer presets ("w16a8", "w8a8") store the weights as
      int16 / int8 (`to_fixed_point`) and update them on their grid; "float32" is float.
    trainable: "full" (every weight), "linear_probe" (the prototype head only) or "prompts" (ViT
      deep prompts + head; the model must have `num_prompts > 0`).
    steps: updates per episode.
    learning_rate: SGD learning rate, in weight units (the same at every precision).
    num_directions: K, directions per step (jvp, SPSA).
    epsilon: SPSA perturbation, in weight units; for integer weights it must exceed half of the
      largest trainable grid step (else the perturbation rounds to zero).
    distribution: "normal" or "rademacher" directions.
    rounding: integer rounding of the updates ("nearest", "stochastic", "error_feedback").
    shift: support images are shifted by up to this many pixels at every step (0: none).
    shift_padding: what a shift brings in at the border: "zeros" (right for clean Omniglot, whose
      background is 0) or "edge" (the border pixels repeated: for images whose background is
      not 0, e.g. corrupted by noise or low contrast, where zeros would draw a frame that the
      queries do not have).
    logit_gap: the head's temperature τ is set per episode so that the mean logit gap between
      two prototypes, `mean ||c_k - c_l||² / τ`, is `logit_gap` (0: τ = 1, the plain ProtoNet).
      Zero-shot predictions do not depend on it; without it the support loss of a well-separated
      episode is ~0 and fine-tuning has no gradient to follow.
  """

  method: str = "backprop"
  precision: str = "float32"
  trainable: str = "full"
  steps: int = 20
  learning_rate: float = 1e-2
  num_directions: int = 4
  epsilon: float = 1e-3
  distribution: str = "normal"
  rounding: str = "stochastic"
  shift: int = 2
  shift_padding: str = "zeros"
  logit_gap: float = 4.0

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"method: unknown {self.method!r}; valid: {', '.join(METHODS)}.")
    if self.trainable not in TRAINABLE:
      raise ValueError(f"trainable: unknown {self.trainable!r}; valid: {', '.join(TRAINABLE)}.")
    if self.precision not in fq.PRESET_NAMES:
      raise ValueError(f"precision: unknown {self.precision!r}; valid: {fq.PRESET_NAMES}.")
    if self.steps < 0 or self.shift < 0:
      raise ValueError(f"steps ({self.steps}) and shift ({self.shift}) must be >= 0.")
    if self.shift_padding not in PADDINGS:
      raise ValueError(f"shift_padding: unknown {self.shift_padding!r}; valid: {PADDINGS}.")
    if self.integer and self.method in ("backprop", "jvp"):
      raise ValueError(
        f"method: {self.method} needs float weights; integer precision {self.precision!r} "
        "trains with spsa or sign_spsa (forward calls only)."
      )

  @property
  def integer(self) -> bool:
    config = fq.preset(self.precision)
    return config is not None and config.weight_bits is not None

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def random_shift(
  images: jax.Array, key: jax.Array, shift: int, padding: str = "zeros"
) -> jax.Array:
  """Each image translated by an integer offset in [-shift, shift]².

  `padding` fills what comes in at the border: "zeros", or "edge" (the border pixels repeated).
  """
  if shift == 0:
    return images
  widths = ((0, 0), (shift, shift), (shift, shift), (0, 0))
  mode = {"zeros": "constant", "edge": "edge"}[padding]
  padded = jnp.pad(images, widths, mode=mode)
  offsets = jax.random.randint(key, (images.shape[0], 2), 0, 2 * shift + 1)
  height, width, channels = images.shape[1:]

  def crop(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

  return jax.vmap(crop)(padded, offsets)


def _reseed(opt_state: PyTree, key: jax.Array) -> PyTree:
  """`opt_state` with the key of every state that holds one (estimator, rounding) drawn from key."""
  kinds = (fgjax.ForwardGradientState, fgjax.IntegerUpdatesState)
  counter = iter(range(1 << 30))

  def fix(node):
    if isinstance(node, kinds):
      return node._replace(key=jax.random.fold_in(key, next(counter)))
    return node

  return jax.tree.map(fix, opt_state, is_leaf=lambda node: isinstance(node, kinds))


def _overlay(target: Mapping, source: Mapping) -> dict:
  """`target` with every leaf that `source` has at the same path (and shape) taken from it."""
  out = {}
  for name, value in target.items():
    if isinstance(value, Mapping):
      out[name] = _overlay(value, source.get(name, {}) if isinstance(source, Mapping) else {})
    elif (
      isinstance(source, Mapping) and name in source and np.shape(source[name]) == np.shape(value)
    ):
      out[name] = jnp.asarray(source[name])
    else:
      out[name] = value
  return out


class EpisodeLearner:
  """Zero-shot ProtoNet accuracy and fine-tuned accuracy on an episode, for one setting.

  Args:
    make_model: `make_model(num_classes=..., quant=...) -> flax Module`, called with keywords
      (e.g. a `functools.partial` of a `fgjax.models` class); its classifier must be the
      top-level `head`.
    pretrained: the backbone's float variables (`params` and e.g. `batch_stats`), pretrained on
      base classes; its `head` is ignored (replaced by the episode's prototypes).
    config: the `FinetuneConfig`.
    num_ways: N, the classes of every episode.
    example_shape: one input's shape, e.g. (28, 28, 1).

  Example:
    >>> learner = EpisodeLearner(functools.partial(ResNet12, widths=(32, 64, 128, 256)),
    ...                          variables, FinetuneConfig("sign_spsa", "w16a8", steps=20), 5)
    >>> learner(sampler[0], seed=0)   # {"zero_shot": ..., "accuracy": ..., "final_loss": ...}
  """

  def __init__(
    self,
    make_model: Callable[..., nn.Module],
    pretrained: Mapping[str, Any],
    config: FinetuneConfig,
    num_ways: int,
    example_shape: tuple[int, ...] = (28, 28, 1),
  ):
    self.config, self.num_ways = config, num_ways
    quant_config = fq.preset(config.precision)
    self.float_model = make_model(num_classes=num_ways, quant=None)
    self.model = (
      make_model(num_classes=num_ways, quant=fq.integer_storage(quant_config))
      if config.integer
      else make_model(num_classes=num_ways, quant=quant_config)
    )
    dummy = jnp.zeros((1, *example_shape), jnp.float32)
    self._fresh = dict(self.float_model.init(jax.random.key(0), dummy))
    self.like = (
      jax.eval_shape(lambda: self.model.init(jax.random.key(0), dummy)) if config.integer else None
    )
    self._embed = jax.jit(functools.partial(embed, self.float_model, train=False))
    self._run = jax.jit(self._episode)
    self.rebind(pretrained)

  def rebind(self, pretrained: Mapping[str, Any]) -> EpisodeLearner:
    """Uses another pretrained backbone (e.g. another seed) of the same shapes; the compiled
    episode function is kept. Leaves the backbone lacks (the episode head, ViT prompts) start
    from the model's init (key 0). Returns `self`."""
    self.float_variables = _overlay(self._fresh, dict(pretrained))
    return self

  def _variables(self, episode: Episode) -> tuple[PyTree, PyTree]:
    """(params, frozen) of the episode model: backbone + prototype head, at the precision."""
    features = self._embed(self.float_variables, jnp.asarray(episode.support_x))
    centers = prototypes(features, jnp.asarray(episode.support_y), self.num_ways)
    temperature = 1.0
    if self.config.logit_gap > 0:
      temperature = jnp.maximum(mean_prototype_distance(centers), 1e-6) / self.config.logit_gap
    head = prototype_head(centers, temperature)
    variables = dict(self.float_variables)
    variables["params"] = {**variables["params"], "head": head}
    if self.config.integer:
      fixed = fq.to_fixed_point(variables, fq.preset(self.config.precision), like=self.like)
      return fixed.params, fixed.frozen
    params = variables.pop("params")
    return params, variables

  def trainable_mask(self, params: PyTree) -> PyTree:
    subset = self.config.trainable
    if subset == "prompts":
      prompts = training.trainable_mask(params, "prompts")
      head = training.trainable_mask(params, "linear_probe")
      return jax.tree.map(lambda a, b: a or b, prompts, head)
    return training.trainable_mask(params, subset)

  def _episode(self, params, frozen, scales, support_x, support_y, query_x, query_y, key):
    config = self.config

    def logits(p, x):
      return self.model.apply({"params": p, **frozen}, x, train=False)

    def accuracy(p):
      return jnp.mean(jnp.argmax(logits(p, query_x), -1) == query_y)

    zero_shot = accuracy(params)
    if config.method == "none" or config.steps == 0:
      return {"zero_shot": zero_shot, "accuracy": zero_shot, "final_loss": jnp.nan}
    mask = self.trainable_mask(params)
    optimizer = training.make_optimizer(
      {
        "method": config.method,
        "num_directions": config.num_directions,
        "epsilon": config.epsilon,
        "distribution": config.distribution,
        "rounding": config.rounding,
        "optimizer": "sgd",
        "optimizer_kwargs": {"learning_rate": config.learning_rate},
      },
      mask=mask,
      forward=True,
      integer_weights=config.integer,
      scales=scales if config.integer else None,
    )
    estimator_key, augment_key = jax.random.split(key)
    state = _reseed(optimizer.init(params), estimator_key)

    def step(carry, index):
      params, state = carry
      images = random_shift(
        support_x, jax.random.fold_in(augment_key, index), config.shift, config.shift_padding
      )
      value_fn = lambda p: training.cross_entropy(logits(p, images), support_y)  # noqa: E731
      updates, state = optimizer.update(params, state, params, value_fn=value_fn)
      loss = training._forward_state(state).value
      return (fgjax.apply_integer_updates(params, updates), state), loss

    (params, _), losses = jax.lax.scan(step, (params, state), jnp.arange(config.steps))
    return {"zero_shot": zero_shot, "accuracy": accuracy(params), "final_loss": losses[-1]}

  def __call__(self, episode: Episode, seed: int = 0) -> dict[str, float]:
    """Runs one episode; returns `zero_shot`, `accuracy` (after fine-tuning) and `final_loss`."""
    params, frozen = self._variables(episode)
    scales = fq.leaf_scales(params, frozen) if self.config.integer else {}
    out = self._run(
      params,
      frozen,
      scales,
      jnp.asarray(episode.support_x),
      jnp.asarray(episode.support_y),
      jnp.asarray(episode.query_x),
      jnp.asarray(episode.query_y),
      jax.random.key(seed),
    )
    return {name: float(value) for name, value in out.items()}


def mean_confidence_interval(values, z: float = 1.96) -> tuple[float, float]:
  """Mean and the half-width `z σ / √n` of its 95 % normal confidence interval (episodes)."""
  values = np.asarray(values, np.float64)
  if values.size < 2:
    return float(values.mean()) if values.size else float("nan"), float("nan")
  return float(values.mean()), float(z * values.std(ddof=1) / np.sqrt(values.size))
