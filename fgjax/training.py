"""Training state, optimizers by name, train and eval steps: pretraining and last-mile adaptation.

Importable by the binaries in `experiments/`, by tests and by Colabs. Two kinds of step:

- pretraining (`make_train_step(..., update_batch_stats=True)`): backprop in float with
  `train=True`, so BatchNorm running statistics move;
- adaptation (`make_train_step(..., update_batch_stats=False)`): the optimizer starts with
  `fgjax.forward_gradient(estimator)`, so the same step runs backprop, jvp, SPSA or sign-m-SPSA; the
  model runs with `train=False` (frozen running statistics, see `fgjax.models`), because the
  estimators evaluate the loss on perturbed weights that must not move the statistics.

Integer (fixed-point) parameters: `make_optimizer(..., integer_weights=True, scales=...)` wraps the
chain in `fgjax.integer_optimizer`, so the estimate, the optimizer state and the learning rate are
in weight units (float32) and the last link rounds each update onto the leaf's grid (nearest,
stochastic or error feedback; its key and residual live in the optimizer state); the step adds
them with saturation at the dtype's bounds (`fgjax.apply_integer_updates`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

import fgjax
from fgjax import estimators as fe
from fgjax.transforms import ROUNDINGS  # noqa: F401  (re-exported: nearest, stochastic, error_feedback)

PyTree = Any

TRAINABLE_SUBSETS = ("full", "linear_probe", "last_k", "prompts")
METHODS = ("backprop", "jvp", "spsa", "sign_spsa")
SCHEDULES = ("constant", "cosine", "linear")
# Default patience of `m_schedule="plateau:..."` (steps without progress before m grows).
M_PATIENCE = 50


class TrainState(flax.struct.PyTreeNode):
  """Everything a training run needs to resume bit for bit.

  Attributes:
    step: number of steps taken (int32 scalar).
    params: the model's `params` collection (float, or integer kernels for fixed point).
    model_state: the model's other collections, e.g. `batch_stats` and the fixed-point `quant`
      scales; only pretraining changes them.
    opt_state: the optax state; for forward methods it holds the `ForwardGradientState` whose key
      draws the perturbations, and for integer weights the `IntegerUpdatesState` whose key draws
      the stochastic rounding (or whose residual holds error feedback's remainders).
    rng: a typed PRNG key for step-level randomness (step `t` would use `fold_in(rng, t)`); the
      steps here draw none from it, all their randomness is in `opt_state`.
  """

  step: jax.Array
  params: PyTree
  model_state: PyTree
  opt_state: PyTree
  rng: jax.Array

  @classmethod
  def create(cls, params, model_state, optimizer, rng) -> TrainState:
    """A state at step 0. For integer parameters `optimizer` must come from
    `make_optimizer(..., integer_weights=True)` (`fgjax.integer_optimizer`: float states)."""
    return cls(
      step=jnp.zeros((), jnp.int32),
      params=params,
      model_state=dict(model_state),
      opt_state=optimizer.init(params),
      rng=rng,
    )


def is_integer(leaf) -> bool:
  return jnp.issubdtype(jnp.result_type(leaf), jnp.integer)


def trainable_mask(params: PyTree, subset: str = "full", *, last_k: int = 1) -> PyTree:
  """Which leaves adapt: a pytree of bools with the structure of `params`.

  Args:
    params: the model's `params` collection (top-level names follow `fgjax.models.layer_names`).
    subset: "full" (every leaf), "linear_probe" (`head/` only), "last_k" (the last `last_k`
      top-level layers in forward order), "prompts" (leaves whose path contains "prompt", e.g.
      `ViTTiny(num_prompts=...)`).
    last_k: the k of "last_k".

  Raises:
    ValueError: an unknown subset, `last_k` out of range, or a subset that selects nothing.
  """
  if subset not in TRAINABLE_SUBSETS:
    raise ValueError(
      f"trainable: unknown subset {subset!r}; valid: {', '.join(TRAINABLE_SUBSETS)}."
    )
  if subset == "full":
    predicate = lambda path: True
  elif subset == "linear_probe":
    predicate = lambda path: path.split("/")[0] == "head"
  elif subset == "last_k":
    from fgjax.models import layer_names

    names = layer_names(params)
    if not 1 <= last_k <= len(names):
      raise ValueError(
        f"trainable: last_k={last_k} must be in [1, {len(names)}] for layers {names}."
      )
    chosen = set(names[-last_k:])
    predicate = lambda path: path.split("/")[0] in chosen
  else:
    predicate = lambda path: "prompt" in path
  paths = fgjax.leaf_paths(params)
  flags = [bool(predicate(path)) for path in paths]
  if not any(flags):
    raise ValueError(f"trainable: subset {subset!r} selects no parameter of this model.")
  return jax.tree.unflatten(jax.tree.structure(params), flags)


def _get(config, name, default=None):
  if isinstance(config, Mapping):
    return config.get(name, default)
  return getattr(config, name, default) if hasattr(config, name) else default


def make_estimator(config, mask=None, scales=None, mesh: str = ""):
  """The estimator named by `config.method`: backprop, jvp, spsa, or sign_spsa (sign-m-SPSA).

  Reads `num_directions`, `epsilon` (weight units), `central`, `distribution`, `sign_scale`,
  `chunk_size` from `config` (a ConfigDict or dict); `mask` and `scales` (the grid steps of
  integer leaves, `fgjax.quant.leaf_scales`) are passed on. A `mesh` spec such as
  "directions=4" splits the K directions of jvp / spsa over that many devices
  (`fgjax.parallel.sharded`; the estimate is the single-device one).
  """
  estimator = _make_estimator(config, mask, scales)
  if not mesh:
    return estimator
  from fgjax import parallel

  axes = parallel.parse_mesh(mesh)
  if set(axes) - {"directions"}:
    raise ValueError(
      f"mesh: {mesh!r}: only a 'directions' axis goes through the optimizer (its loss closes "
      "over the batch); split data with fgjax.parallel.sharded and the batch as an argument."
    )
  if "directions" not in axes or isinstance(estimator, fe.Backprop):
    return estimator
  return parallel.sharded(estimator, parallel.make_mesh(axes), data_axis=None)


def _make_estimator(config, mask, scales):
  method = _get(config, "method", "backprop")
  chunk_size = _get(config, "chunk_size", "auto")
  if method == "backprop":
    return fe.backprop(mask=mask)
  if method == "jvp":
    return fe.jvp(
      num_directions=int(_get(config, "num_directions", 1)),
      distribution=_get(config, "distribution", "normal"),
      chunk_size=chunk_size,
      mask=mask,
    )
  if method in ("spsa", "sign_spsa"):
    return fe.spsa(
      num_directions=int(_get(config, "num_directions", 1)),
      epsilon=float(_get(config, "epsilon", 1e-3)),
      central=bool(_get(config, "central", True)),
      sign=method == "sign_spsa",
      sign_scale=float(_get(config, "sign_scale", 1.0)),
      distribution=_get(config, "distribution", "normal"),
      chunk_size=chunk_size,
      mask=mask,
      scales=scales,
    )
  raise ValueError(f"method: unknown {method!r}; valid: {', '.join(METHODS)}.")


def parse_m_schedule(text: str | None) -> tuple[str, tuple] | None:
  """The number-of-directions schedule of `config.m_schedule`, parsed; None for "" (constant m).

  Two spellings (issue 9: the paper's "nFold" schedule, from the binaries):

  - "0:1,200:3,500:8": m by step, (step, m) pairs (`fgjax.num_directions_schedule`);
    returns ("steps", ((0, 1), (200, 3), (500, 8))).
  - "plateau:1,3,8": m moves to the next level when the smoothed loss stalls for
    `config.m_patience` steps (`fgjax.num_directions_on_plateau`); returns ("plateau", (1, 3, 8)).

  Raises:
    ValueError: any other text (the pairs' own rules are checked by the transforms).
  """
  if text is None or not str(text).strip():
    return None
  text = str(text).strip()
  try:
    if text.startswith("plateau:"):
      levels = tuple(int(v) for v in text[len("plateau:") :].split(","))
      return "plateau", levels
    pairs = []
    for item in text.split(","):
      step, m = item.split(":")
      pairs.append((int(step), int(m)))
    return "steps", tuple(pairs)
  except ValueError:
    raise ValueError(
      f"m_schedule: can't read {text!r}; expected (step:m) pairs such as '0:1,200:3' or "
      "'plateau:1,3,8'."
    ) from None


def forward_passes_per_step(config, num_directions: int | None = None) -> dict[str, int]:
  """Passes one step costs: backprop 1 forward + 1 backward; jvp K jvp passes (forward mode);
  SPSA 2K forwards (central) or K + 1 (one-sided). `num_directions` overrides the config's K
  (the m a scheduled step used)."""
  method = _get(config, "method", "backprop")
  k = int(_get(config, "num_directions", 1) if num_directions is None else num_directions)
  if method == "backprop":
    return {"forward": 1, "backward": 1, "jvp": 0}
  if method == "jvp":
    return {"forward": 0, "backward": 0, "jvp": k}
  central = bool(_get(config, "central", True))
  return {"forward": 2 * k if central else k + 1, "backward": 0, "jvp": 0}


def _rounding_seed(seed: int) -> int:
  """The seed of the rounding key: drawn from `seed` but apart from the estimator's `key(seed)`, so
  that perturbations and rounding noise never come from one key stream."""
  return int(np.random.SeedSequence([seed % 2**32, 1]).generate_state(1)[0])


def make_optimizer(
  config,
  *,
  mask: PyTree | None = None,
  forward: bool = True,
  seed: int = 0,
  integer_weights: bool = False,
  scales: dict | None = None,
  mesh: str = "",
):
  """An optax optimizer by name, behind the estimator of `config.method` when `forward`.

  `config.optimizer` names any optax optimizer (`getattr(optax, name)(**kwargs)`), with
  `config.optimizer_kwargs` (e.g. `{"learning_rate": 0.1, "momentum": 0.9}`); `config.schedule`
  "cosine" or "linear" decays that learning rate to 0 over `config.steps`. With a `mask`, frozen
  leaves get `optax.set_to_zero()` (no optimizer state, no weight decay). With `forward=True` the
  chain starts with `fgjax.forward_gradient(make_estimator(config, mask), seed)`, and `update`
  needs `value_fn=`; with `forward=False` it takes ordinary gradients. `mesh` ("directions=4")
  splits the estimator's directions over devices (`make_estimator`). `config.m_schedule`
  ("0:1,200:3" or "plateau:1,3,8", see `parse_m_schedule`) replaces `forward_gradient` by
  `fgjax.num_directions_schedule` / `fgjax.num_directions_on_plateau` (patience
  `config.m_patience`), so the number of directions changes during the run.

  With `integer_weights=True` (fixed-point parameters) the chain is wrapped in
  `fgjax.integer_optimizer(chain, scales=scales, rounding=config.rounding, mask=mask)` (rounding
  "nearest", "stochastic" or "error_feedback"; its key is seeded from `seed`): the optimizer state
  and learning rate are in weight units, and the updates of integer leaves become integer steps
  that keep `q + Δ` on the leaf's grid (its dtype's bit width). `scales` (`{path: grid step}`,
  `fgjax.quant.leaf_scales`) is required then, and is also handed to the estimator.

  Raises:
    ValueError: the optimizer name is not an optax optimizer, or its kwargs don't fit, or an
      unknown rounding.
  """
  name = _get(config, "optimizer", "sgd")
  kwargs = dict(_get(config, "optimizer_kwargs", {}) or {})
  schedule = _get(config, "schedule", "constant") or "constant"
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule: unknown {schedule!r}; valid: {', '.join(SCHEDULES)}.")
  if schedule != "constant":
    if "learning_rate" not in kwargs:
      raise ValueError(f"schedule: {schedule!r} needs optimizer_kwargs.learning_rate.")
    steps = int(_get(config, "steps", 0) or 0)
    if steps < 1:
      raise ValueError(f"schedule: {schedule!r} needs steps >= 1.")
    peak = kwargs["learning_rate"]
    if schedule == "cosine":
      kwargs["learning_rate"] = optax.cosine_decay_schedule(peak, steps)
    else:
      kwargs["learning_rate"] = optax.linear_schedule(peak, 0.0, steps)
  factory = (
    getattr(optax, name, None) if isinstance(name, str) and not name.startswith("_") else None
  )
  if not callable(factory):
    raise ValueError(f"optimizer: {name!r} is not an optax optimizer (e.g. sgd, adam, adamw).")
  try:
    optimizer = factory(**kwargs)
  except TypeError as error:
    raise ValueError(f"optimizer: optax.{name}({kwargs}) failed: {error}") from None
  if not isinstance(optimizer, optax.GradientTransformation):
    raise ValueError(f"optimizer: optax.{name}(...) is not a GradientTransformation.")
  if mask is not None:
    labels = jax.tree.map(lambda on: "train" if on else "freeze", mask)
    optimizer = optax.partition({"train": optimizer, "freeze": optax.set_to_zero()}, labels)
  if integer_weights and scales is None:
    raise ValueError("scales: integer weights need their grid steps (fgjax.quant.leaf_scales).")
  if forward:
    estimator = make_estimator(config, mask, scales if integer_weights else None, mesh)
    optimizer = optax.chain(_estimate(config, estimator, seed), optimizer)
  if integer_weights:
    rounding = _get(config, "rounding", "nearest") or "nearest"
    optimizer = fgjax.integer_optimizer(
      optimizer, scales=scales, rounding=rounding, seed=_rounding_seed(seed), mask=mask
    )
  return optimizer


def _estimate(config, estimator, seed: int):
  """The chain's first link: `forward_gradient`, or an m schedule (`config.m_schedule`)."""
  schedule = parse_m_schedule(_get(config, "m_schedule", ""))
  if schedule is None:
    return fgjax.forward_gradient(estimator, seed)
  if isinstance(estimator, fe.Backprop):
    raise ValueError("m_schedule: backprop has no directions to schedule; use jvp or spsa.")
  kind, values = schedule
  if kind == "plateau":
    patience = int(_get(config, "m_patience", M_PATIENCE))
    return fgjax.num_directions_on_plateau(estimator, values, patience=patience, seed=seed)
  return fgjax.num_directions_schedule(estimator, values, seed)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def _find_state(opt_state, kind):
  """The first sub-state of type `kind` in an optax state, or None."""
  found = [
    s
    for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, kind))
    if isinstance(s, kind)
  ]
  return found[0] if found else None


def _forward_state(opt_state):
  """The estimating link's state, wherever it sits in the chain: `forward_gradient`'s, or an m
  schedule's (`NumDirectionsState`, which also holds the m of the last step)."""
  kinds = (fgjax.ForwardGradientState, fgjax.transforms.NumDirectionsState)
  return _find_state(opt_state, kinds)


def train_step(
  state: TrainState,
  batch,
  *,
  model,
  optimizer,
  update_batch_stats: bool = False,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One step. Returns the new state and metrics (`loss`, plus estimator health for forward
  methods). Jit it with `make_train_step` (static model and optimizer, donated state).

  `update_batch_stats=True`: pretraining by backprop with `train=True` (BatchNorm statistics move;
  `optimizer` takes plain gradients). Otherwise: adaptation with `train=False`; `optimizer` must
  start with `fgjax.forward_gradient` (see `make_optimizer`).

  The updates are added by `fgjax.apply_integer_updates(params, updates)`: float leaves as
  `optax.apply_updates`, integer leaves with a saturating add at their dtype's `±(2^{b-1} - 1)`.
  For integer weights the optimizer comes from `make_optimizer(..., integer_weights=True)`
  (`fgjax.integer_optimizer`), which does the rounding; the metrics then include its
  `changed_fraction` (the fraction of trainable integer weights the step moved).
  """
  variables = lambda params: {"params": params, **state.model_state}
  if update_batch_stats:
    mutable = [name for name in state.model_state if name == "batch_stats"]

    def loss_fn(params):
      if mutable:
        logits, new_state = model.apply(variables(params), batch.x, train=True, mutable=mutable)
      else:
        logits, new_state = model.apply(variables(params), batch.x, train=True), {}
      return cross_entropy(logits, batch.y), new_state

    (loss, new_model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    model_state = {**state.model_state, **new_model_state}
    metrics = {"loss": loss}
  else:

    def value_fn(params):
      return cross_entropy(model.apply(variables(params), batch.x, train=False), batch.y)

    # The incoming updates are ignored: the first link estimates the gradient from value_fn.
    updates, opt_state = optimizer.update(
      state.params, state.opt_state, state.params, value_fn=value_fn
    )
    model_state = state.model_state
    forward_state = _forward_state(opt_state)
    if forward_state is None:
      raise ValueError(
        "optimizer: adaptation needs an estimating link (fgjax.forward_gradient or an m "
        "schedule) in the chain; see make_optimizer."
      )
    metrics = {
      "loss": forward_state.value,
      "zero_difference_fraction": forward_state.metrics["zero_difference_fraction"],
    }
    if "num_directions" in forward_state.metrics:  # An m schedule: the m this step used.
      metrics["num_directions"] = forward_state.metrics["num_directions"]
  integer_state = _find_state(opt_state, fgjax.IntegerUpdatesState)
  if integer_state is not None:
    metrics["changed_fraction"] = integer_state.changed_fraction
  params = fgjax.apply_integer_updates(state.params, updates)
  new_state = state.replace(
    step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state
  )
  return new_state, metrics


def make_train_step(model, optimizer, **kwargs) -> Callable:
  """`train_step` jitted with the state donated: `step(state, batch) -> (state, metrics)`."""

  def step(state, batch):
    return train_step(state, batch, model=model, optimizer=optimizer, **kwargs)

  return jax.jit(step, donate_argnums=0)


@functools.lru_cache(maxsize=16)
def make_eval_step(model) -> Callable:
  """Jitted `eval_step(params, model_state, x, y, weight) -> (correct, loss sum)`, both weighted."""

  @jax.jit
  def eval_step(params, model_state, x, y, weight):
    logits = model.apply({"params": params, **model_state}, x, train=False)
    correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
    return jnp.sum(correct * weight), jnp.sum(loss * weight)

  return eval_step


def evaluate(eval_step, params, model_state, x, y, batch_size: int = 256) -> dict[str, float]:
  """Accuracy and mean loss over all of (x, y), in batches of `batch_size`; the last (or only)
  batch is padded with weight-0 examples, so every call has one shape and compiles once."""
  num = len(y)
  if num == 0:
    return {"accuracy": float("nan"), "loss": float("nan")}
  correct = total_loss = 0.0
  for start in range(0, num, batch_size):
    xb, yb = x[start : start + batch_size], y[start : start + batch_size]
    weight = np.ones(len(yb), np.float32)
    missing = batch_size - len(yb)
    if missing:
      xb = np.concatenate([xb, np.repeat(xb[:1], missing, 0)])
      yb = np.concatenate([yb, np.repeat(yb[:1], missing, 0)])
      weight = np.concatenate([weight, np.zeros(missing, np.float32)])
    c, s = eval_step(params, model_state, xb, yb, weight)
    correct += float(c)
    total_loss += float(s)
  return {"accuracy": correct / num, "loss": total_loss / num}


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """The example indices of batch `step`: a function of (seed, step) only, so a resumed run sees
  the same data as an uninterrupted one. Epoch e is a permutation seeded by (seed, e); the
  remainder of each epoch is dropped."""
  batch_size = min(batch_size, num_examples)
  per_epoch = num_examples // batch_size
  epoch, index = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return order[index * batch_size : (index + 1) * batch_size]


def compile_with_memory(step_fn: Callable, *args) -> tuple[Callable, dict[str, int]]:
  """Compiles a jitted step ahead of time for `args` and reads its estimated peak memory.

  Returns `(compiled, stats)`: `compiled` runs the step (reuse it, so the step compiles once), and
  `stats` is XLA's `memory_analysis()` in bytes: `temp`, and `total` = argument + output + temp −
  alias (donated buffers counted once), plus `argument` and `output`; -1 where XLA gives none.
  """
  compiled = step_fn.lower(*args).compile()
  analysis = compiled.memory_analysis()
  if analysis is None:
    return compiled, {"temp": -1, "total": -1, "argument": -1, "output": -1}
  arg = int(analysis.argument_size_in_bytes)
  out = int(analysis.output_size_in_bytes)
  temp = int(analysis.temp_size_in_bytes)
  alias = int(analysis.alias_size_in_bytes)
  return compiled, {"temp": temp, "total": arg + out + temp - alias, "argument": arg, "output": out}


def memory_stats(step_fn: Callable, *args) -> dict[str, int]:
  """The `stats` of `compile_with_memory` alone (see there)."""
  return compile_with_memory(step_fn, *args)[1]


def num_params(params: PyTree, mask: PyTree | None = None) -> int:
  """Number of scalars in `params` (only the masked-in leaves when `mask` is given)."""
  leaves = jax.tree.leaves(params)
  flags = [True] * len(leaves) if mask is None else jax.tree.leaves(mask)
  return int(sum(math.prod(np.shape(p)) for p, on in zip(leaves, flags, strict=True) if on))
