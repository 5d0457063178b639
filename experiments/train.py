"""`train_and_evaluate(config, workdir)`: backprop pretraining, or last-mile adaptation.

`config.mode == "pretrain"`: float backprop on the source domain; orbax checkpoints in
`workdir/checkpoints`. `config.mode == "adapt"`: loads the pretrained checkpoint of
`config.adapt.pretrained` (a pretraining workdir), converts it to `config.adapt.precision`
(integer kernels with `weight_storage="integer"`), and adapts on the few target examples with
`config.adapt.method` (backprop, jvp, spsa, sign_spsa).

Everything is validated (flags, names, data folder, checkpoint shapes) before anything is written
into the workdir; a problem raises `ConfigError` with a one-line message. Both modes resume from
the workdir's latest checkpoint and then end exactly as an uninterrupted run: the data order is a
function of (seed, step) and all randomness lives in the checkpointed state.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from experiments import tasks
from fgjax import training

MODES = ("pretrain", "adapt")
# Forward-gradient methods perturb integer kernels on their grid; backprop and jvp need float ones.
FLOAT_ONLY_METHODS = ("backprop", "jvp")


class ConfigError(ValueError):
  """A problem with the flags, the data or a checkpoint, found before anything is written."""


@dataclasses.dataclass
class Plan:
  """Everything prepared and validated before the workdir is touched."""

  config: Any
  workdir: pathlib.Path
  task: tasks.Task
  model: Any
  state: training.TrainState
  optimizer: Any
  step_kwargs: dict
  train_data: Any
  resume_step: int | None
  info: dict


# ----------------------------------------------------------------------------- checkpoints


def _savable(state: training.TrainState) -> dict:
  """The state as nested dicts of arrays; typed keys as key data; opt_state as indexed leaves."""

  def plain(x):
    return jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x

  opt_leaves = jax.tree.leaves(state.opt_state)
  out = {
    "step": state.step,
    "params": state.params,
    "rng": plain(state.rng),
    # Orbax refuses empty arrays (e.g. backprop's (0,) directional derivatives); the template
    # supplies them on restore.
    "opt_state": {f"{i:04d}": plain(x) for i, x in enumerate(opt_leaves) if np.size(x) > 0},
  }
  if state.model_state:
    out["model_state"] = state.model_state
  return out


def _from_savable(tree: dict, template: training.TrainState) -> training.TrainState:
  def typed(x, like):
    if jnp.issubdtype(like.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(jnp.asarray(x), impl=jax.random.key_impl(like))
    return jnp.asarray(x)

  opt_leaves, opt_def = jax.tree.flatten(template.opt_state)
  saved = tree["opt_state"]
  restored = [
    typed(saved[f"{i:04d}"], like) if f"{i:04d}" in saved else like
    for i, like in enumerate(opt_leaves)
  ]
  return training.TrainState(
    step=jnp.asarray(tree["step"]),
    params=jax.tree.map(jnp.asarray, tree["params"]),
    model_state=jax.tree.map(jnp.asarray, tree.get("model_state", {})),
    opt_state=jax.tree.unflatten(opt_def, restored),
    rng=typed(tree["rng"], template.rng),
  )


def _manager(directory: pathlib.Path, create: bool, keep: int = 2) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
  return ocp.CheckpointManager(directory.absolute(), options=options)


def _latest_step(directory: pathlib.Path) -> int | None:
  if not directory.is_dir():
    return None
  return _manager(directory, create=False).latest_step()


def _restore_raw(directory: pathlib.Path, step: int) -> tuple[dict, dict]:
  manager = _manager(directory, create=False)
  restored = manager.restore(
    step,
    args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()),
  )
  return dict(restored["state"]), dict(restored["meta"])


def _check_like(what: str, found, expected) -> None:
  """Raises ConfigError naming the first leaf whose path, shape or dtype differ."""
  found_flat = {
    jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(found)[0]
  }
  want_flat = {
    jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]
  }
  for path, want in want_flat.items():
    if path not in found_flat:
      raise ConfigError(f"{what}: it has no {path}; is it a checkpoint of another model?")
    got, want = tuple(np.shape(found_flat[path])), tuple(want.shape)
    if got != want:
      raise ConfigError(
        f"{what}: {path} has shape {got} but the model expects {want}; "
        "is it a checkpoint of another model?"
      )
  extra = sorted(set(found_flat) - set(want_flat))
  if extra:
    raise ConfigError(f"{what}: unexpected {extra[0]}; is it a checkpoint of another model?")


# ----------------------------------------------------------------------------- preparation


def _model(config, quant):
  from fgjax import models

  kwargs = dict(config.model.kwargs or {})
  return models.get_model(config.model.name, num_classes=10, quant=quant, **kwargs)


def _init_variables(model, x, seed: int, *, shapes_only: bool = False) -> dict:
  init = jax.jit(lambda key, x: model.init(key, x, train=False))
  if shapes_only:
    init = functools.partial(jax.eval_shape, init)
  return dict(init(jax.random.key(seed), jnp.asarray(x[:1])))


def _quant(adapt):
  from fgjax import quant

  if adapt.precision == "float32":
    if adapt.weight_storage != "float":
      raise ConfigError("adapt.weight_storage='integer' needs an integer precision, e.g. w16a8.")
    return None
  return quant.preset(adapt.precision, weight_storage=adapt.weight_storage)


def _to_precision(variables: dict, quant, like=None) -> dict:
  """Pretrained float variables in the adapt precision: integer kernels + scales if asked; `like`
  (the integer model's variable shapes) sets each layer's calibration axes."""
  if quant is None or quant.weight_storage != "integer":
    return dict(variables)
  from fgjax import quant as fq

  return dict(fq.quantize_params(variables, quant, like=like))


def prepare(config, workdir) -> Plan:
  """Validates the config, loads data and checkpoints; writes nothing. Raises ConfigError."""
  workdir = pathlib.Path(workdir)
  if config.mode not in MODES:
    raise ConfigError(f"mode: unknown {config.mode!r}; valid: {', '.join(MODES)}.")
  if workdir.exists() and not workdir.is_dir():
    raise ConfigError(f"workdir: {str(workdir)!r} exists and is not a directory.")
  from fgjax import models

  if models._factory._normalize(config.model.name) not in {
    models._factory._normalize(n) for n in models.model_names()
  }:
    raise ConfigError(
      f"model.name: unknown model {config.model.name!r}; valid: {', '.join(models.model_names())}."
    )
  adapt = config.adapt
  if config.mode == "adapt":
    if adapt.method not in training.METHODS:
      raise ConfigError(
        f"adapt.method: unknown {adapt.method!r}; valid: {', '.join(training.METHODS)}."
      )
    from fgjax.quant import _config as quant_config

    if adapt.precision not in quant_config.PRESET_NAMES:
      raise ConfigError(
        f"adapt.precision: unknown preset {adapt.precision!r}; "
        f"valid: {', '.join(quant_config.PRESET_NAMES)}."
      )
    if adapt.weight_storage == "integer" and adapt.method in FLOAT_ONLY_METHODS:
      raise ConfigError(
        f"adapt.method={adapt.method!r} needs float weights; use weight_storage='float' "
        "(fake quantization) or a forward-only method (spsa, sign_spsa)."
      )
    if adapt.rounding not in training.ROUNDINGS:
      raise ConfigError(
        f"adapt.rounding: unknown {adapt.rounding!r}; valid: {', '.join(training.ROUNDINGS)}."
      )
    if not adapt.pretrained:
      raise ConfigError("adapt.pretrained: the pretraining workdir is required in mode 'adapt'.")
    pretrained_dir = pathlib.Path(adapt.pretrained) / "checkpoints"
    pretrained_step = _latest_step(pretrained_dir)
    if pretrained_step is None:
      raise ConfigError(f"adapt.pretrained: no checkpoint in {str(pretrained_dir)!r}.")
  try:
    task = tasks.build_task(config.data, config.seed)
  except (FileNotFoundError, ValueError) as error:
    raise ConfigError(str(error)) from None
  for name, data in task._asdict().items():
    if len(data) == 0:
      raise ConfigError(f"data: the {name} split is empty; use more data or fewer shots.")

  info = {"mode": config.mode, "task": config.data.name, "model": config.model.name}
  if config.mode == "pretrain":
    try:
      model = _model(config, None)
      variables = _init_variables(model, task.source_train.x, config.seed)
    except (TypeError, ValueError) as error:
      raise ConfigError(f"model: {error}") from None
    params = variables.pop("params")
    section = config.pretrain
    try:
      optimizer = training.make_optimizer(section, forward=False)
    except ValueError as error:
      raise ConfigError(f"pretrain.{error}") from None
    state = training.TrainState.create(params, variables, optimizer, jax.random.key(config.seed))
    step_kwargs = {"update_batch_stats": True}
    train_data = task.source_train
  else:
    quant = _quant(adapt)
    try:
      float_model = _model(config, None)
      model = _model(config, quant)
      expected = _init_variables(float_model, task.target_train.x, config.seed, shapes_only=True)
    except (TypeError, ValueError) as error:
      raise ConfigError(f"model: {error}") from None
    raw, meta = _restore_raw(pretrained_dir, pretrained_step)
    pretrained = {"params": raw["params"], **raw.get("model_state", {})}
    _check_like(f"adapt.pretrained checkpoint {str(pretrained_dir)!r}", pretrained, expected)
    pretrained = jax.tree.map(jnp.asarray, pretrained)
    info["pretrained_model"] = meta.get("model")
    integer = quant is not None and quant.weight_storage == "integer"
    like = _init_variables(model, task.target_train.x, config.seed, shapes_only=True)
    variables = _to_precision(pretrained, quant, like if integer else None)
    params = variables.pop("params")
    try:
      mask = training.trainable_mask(params, adapt.trainable, last_k=int(adapt.last_k))
      # Integer kernels and float biases train together: epsilon and the learning rate are in
      # weight units for both (integer leaves through their grid steps, `leaf_scales`).
      from fgjax import quant as fq

      scales = fq.leaf_scales(params, variables) if integer else None
      optimizer = training.make_optimizer(
        adapt,
        mask=mask,
        forward=True,
        seed=config.seed,
        integer_weights=integer,
        scales=scales,
      )
    except ValueError as error:
      raise ConfigError(f"adapt.{error}") from None
    state = training.TrainState.create(params, variables, optimizer, jax.random.key(config.seed))
    step_kwargs = {"update_batch_stats": False}
    train_data = task.target_train
    info.update(
      method=adapt.method,
      precision=adapt.precision,
      weight_storage=adapt.weight_storage,
      trainable=adapt.trainable,
      trainable_params=training.num_params(params, mask),
      total_params=training.num_params(params),
      pretrained_float_variables=pretrained,
    )
    info["mask"] = mask

  # A checkpoint already in the workdir: resume from it, if it fits this run.
  checkpoints = workdir / "checkpoints"
  resume_step = _latest_step(checkpoints)
  if resume_step is not None:
    raw, _ = _restore_raw(checkpoints, resume_step)
    expected = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), _savable(state))
    _check_like(f"workdir checkpoint {str(checkpoints)!r}", raw, expected)
  return Plan(
    config, workdir, task, model, state, optimizer, step_kwargs, train_data, resume_step, info
  )


# ----------------------------------------------------------------------------- logging


class Progress:
  """Dependency-free text progress on stderr: step, steps/s, ETA, the last loss."""

  def __init__(self, total: int, start: int, label: str, stream=None):
    self.total, self.start, self.label = total, start, label
    self.stream = stream or sys.stderr
    self.tty = getattr(self.stream, "isatty", lambda: False)()
    self.begin = time.time()

  def update(self, step: int, loss: float) -> None:
    done = step - self.start
    elapsed = max(time.time() - self.begin, 1e-9)
    rate = done / elapsed
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    width = 24
    filled = int(width * step / max(self.total, 1))
    line = (
      f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {step}/{self.total} "
      f"{rate:.1f} steps/s ETA {eta:.0f}s loss {loss:.4f}"
    )
    self.stream.write(("\r" + line) if self.tty else line + "\n")
    self.stream.flush()

  def close(self) -> None:
    if self.tty:
      self.stream.write("\n")
      self.stream.flush()


class MetricWriter:
  """JSON lines in `workdir/metrics.jsonl` and TensorBoard events in `workdir/tensorboard`."""

  def __init__(self, workdir: pathlib.Path, resume_step: int | None):
    self.path = workdir / "metrics.jsonl"
    if self.path.exists():
      # After an interruption, drop what the lost steps logged: they are recomputed.
      keep = []
      for line in self.path.read_text().splitlines():
        record = json.loads(line)
        if resume_step is not None and record.get("step", 0) <= resume_step:
          keep.append(line)
      self.path.write_text("".join(line + "\n" for line in keep))
    from tensorboardX import SummaryWriter

    self.tensorboard = SummaryWriter(str(workdir / "tensorboard"), purge_step=resume_step)

  def write(self, step: int, scalars: dict) -> None:
    record = {"step": step, **{k: float(v) for k, v in scalars.items()}}
    with self.path.open("a") as file:
      file.write(json.dumps(record) + "\n")
    for name, value in scalars.items():
      self.tensorboard.add_scalar(name, float(value), step)

  def close(self) -> None:
    self.tensorboard.flush()
    self.tensorboard.close()


# ----------------------------------------------------------------------------- running


def _batch(data, batch_size: int, seed: int, step: int):
  from fgjax.data import Batch

  index = training.batch_indices(len(data), batch_size, seed, step)
  return Batch(x=data.x[index], y=data.y[index])


def _evaluate(model, params, model_state, data, batch_size) -> dict:
  return training.evaluate(
    training.make_eval_step(model), params, model_state, data.x, data.y, batch_size
  )


def _backprop_reference_memory(plan: Plan, batch) -> dict | None:
  """Peak memory of a backprop step on the same model, trainable subset and precision (float
  weights, fake quantization, when the run itself stores integer weights)."""
  config = plan.config
  adapt = config.adapt.copy_and_resolve_references()
  adapt.method = "backprop"
  quant = None
  if adapt.precision != "float32":
    from fgjax import quant as fq

    quant = fq.preset(adapt.precision)
  model = _model(config, quant)
  variables = dict(plan.info["pretrained_float_variables"])
  params = variables.pop("params")
  mask = training.trainable_mask(params, adapt.trainable, last_k=int(adapt.last_k))
  optimizer = training.make_optimizer(adapt, mask=mask, forward=True, seed=config.seed)
  # Shapes only: nothing is computed, and the run's (donated) buffers are never touched.
  state = jax.eval_shape(
    lambda p, v: training.TrainState.create(p, v, optimizer, jax.random.key(0)), params, variables
  )
  step = training.make_train_step(model, optimizer, update_batch_stats=False)
  return training.memory_stats(step, state, batch)


def run(plan: Plan) -> dict:
  """Trains, checkpoints, logs, evaluates; returns the summary (also written to the workdir)."""
  config, workdir = plan.config, plan.workdir
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
  section = config.pretrain if config.mode == "pretrain" else config.adapt
  total_steps = int(section.steps)
  batch_size = int(section.batch_size)
  eval_batch = int(config.eval_batch_size)
  task, model = plan.task, plan.model
  manager = _manager(workdir / "checkpoints", create=True)

  state = plan.state
  if plan.resume_step is not None:
    raw, _ = _restore_raw(workdir / "checkpoints", plan.resume_step)
    state = _from_savable(raw, plan.state)
    print(f"Resuming from the checkpoint of step {plan.resume_step}.", file=sys.stderr)
  start = int(state.step)

  if config.mode == "adapt":
    float_model = _model(config, None)
    pre = dict(plan.info["pretrained_float_variables"])
    pre_params = pre.pop("params")
    zero_shot_float = _evaluate(float_model, pre_params, pre, task.target_test, eval_batch)
    zero_shot = _evaluate(
      model, plan.state.params, plan.state.model_state, task.target_test, eval_batch
    )
  step_fn = training.make_train_step(model, plan.optimizer, **plan.step_kwargs)
  first_batch = _batch(plan.train_data, batch_size, config.seed, 0)
  # Compiled once, ahead of time: the same executable gives the memory estimate and runs the steps.
  step_fn, memory = training.compile_with_memory(step_fn, state, first_batch)

  meta = {"model": config.model.name, "model_kwargs": dict(config.model.kwargs or {})}
  writer = MetricWriter(workdir, plan.resume_step)
  progress = Progress(total_steps, start, config.mode)
  stop_at = int(config.get("stop_after", 0) or 0)
  begin = time.time()
  metrics = None
  for step in range(start, total_steps):
    if stop_at and step >= stop_at:
      # Simulated interruption (tests): leave without saving, as a killed process would.
      manager.wait_until_finished()
      writer.close()
      raise KeyboardInterrupt(f"stopped at step {step} (config.stop_after)")
    batch = _batch(plan.train_data, batch_size, config.seed, step)
    state, metrics = step_fn(state, batch)
    done = step + 1
    if done % int(config.log_every) == 0 or done == total_steps:
      scalars = jax.device_get(metrics)
      writer.write(done, scalars)
      progress.update(done, float(scalars["loss"]))
    if done % int(config.checkpoint_every) == 0 or done == total_steps:
      manager.save(
        done,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(_savable(state)), meta=ocp.args.JsonSave(meta)
        ),
      )
  progress.close()
  manager.wait_until_finished()
  seconds = time.time() - begin

  summary = {
    **{k: v for k, v in plan.info.items() if k not in ("pretrained_float_variables", "mask")}
  }
  summary.update(
    steps=total_steps,
    batch_size=batch_size,
    train_examples=len(plan.train_data),
    seconds_this_run=round(seconds, 2),
    memory_bytes=memory,
  )
  source = _evaluate(model, state.params, state.model_state, task.source_test, eval_batch)
  target = _evaluate(model, state.params, state.model_state, task.target_test, eval_batch)
  if config.mode == "pretrain":
    summary.update(source_accuracy=source["accuracy"], target_zero_shot_accuracy=target["accuracy"])
  else:
    passes = training.forward_passes_per_step(config.adapt)
    summary.update(
      zero_shot_accuracy_float32=zero_shot_float["accuracy"],
      zero_shot_accuracy=zero_shot["accuracy"],
      adapted_accuracy=target["accuracy"],
      source_accuracy_after=source["accuracy"],
      passes_per_step=passes,
      total_passes={k: v * total_steps for k, v in passes.items()},
      num_directions=int(config.adapt.num_directions),
    )
    if config.adapt.get("compare_backprop_memory", True):
      summary["backprop_memory_bytes"] = _backprop_reference_memory(plan, first_batch)
  (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
  table = summary_table([summary])
  (workdir / "summary.md").write_text(table + "\n")
  writer.close()
  manager.close()
  return summary


def _kib(nbytes) -> str:
  return "-" if nbytes is None or nbytes < 0 else f"{nbytes / 1024:.0f}"


def _pct(value) -> str:
  return "-" if value is None else f"{100 * value:.1f}"


def summary_table(summaries: list[dict]) -> str:
  """A Markdown table, one row per run (pretraining or adaptation)."""
  header = (
    "| run | method | precision | trainable | zero-shot acc % | adapted acc % | steps "
    "| passes (fwd/bwd/jvp) | step temp KiB | step total KiB | backprop temp / total KiB |"
  )
  lines = [header, "|" + "---|" * 11]
  for s in summaries:
    if s["mode"] == "pretrain":
      row = [
        "pretrain",
        "backprop",
        "float32",
        "full",
        _pct(s.get("target_zero_shot_accuracy")),
        f"source {_pct(s.get('source_accuracy'))}",
        str(s["steps"]),
        f"{s['steps']}/{s['steps']}/0",
        _kib(s["memory_bytes"]["temp"]),
        _kib(s["memory_bytes"]["total"]),
        "-",
      ]
    else:
      total = s["total_passes"]
      ref = s.get("backprop_memory_bytes") or {}
      precision = s["precision"] + (" int" if s["weight_storage"] == "integer" else "")
      row = [
        s.get("name", "adapt"),
        s["method"] + (f" K={s['num_directions']}" if s["method"] != "backprop" else ""),
        precision,
        f"{s['trainable']} ({s['trainable_params']}/{s['total_params']})",
        f"{_pct(s['zero_shot_accuracy'])} (float {_pct(s['zero_shot_accuracy_float32'])})",
        _pct(s["adapted_accuracy"]),
        str(s["steps"]),
        f"{total['forward']}/{total['backward']}/{total['jvp']}",
        _kib(s["memory_bytes"]["temp"]),
        _kib(s["memory_bytes"]["total"]),
        f"{_kib(ref.get('temp'))} / {_kib(ref.get('total'))}" if ref else "-",
      ]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def train_and_evaluate(config, workdir: str) -> dict:
  """Validates (`prepare`, raises ConfigError before writing anything), then `run`s."""
  return run(prepare(config, workdir))
