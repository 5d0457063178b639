"""`prepare(config, workdir) -> Plan`: everything a run needs, validated, with nothing written.

Order: the config values and the workdir (`experiments.validation`), the data (a loader error is
one line naming the file), the model, the pretrained checkpoint (adapt: checksum, finite values,
shapes, written by a pretraining run), then the workdir's own checkpoints: a corrupt latest step
falls back to the previous good one, a resume whose config changes the result is refused with the
differences listed (unless `--config.force_resume`), and a finished run is reported complete.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import sys
import traceback
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments import checkpoints as ckpt
from experiments import tasks
from experiments.validation import ConfigError, validate
from fgjax import training


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
  # (step, state tree, newer corrupt steps) of the workdir's latest good checkpoint.
  resume: tuple[int, dict, list[int]] | None
  info: dict
  complete: dict | None = None  # The summary of a finished run in this workdir.
  notes: list = dataclasses.field(default_factory=list)  # Lines said before the run starts.


def _warn(line: str) -> None:
  print(line, file=sys.stderr)


def _file_in_traceback(error: BaseException) -> str | None:
  """The file a data loader was reading when it failed (its `path` local), if any."""
  found = None
  for frame, _ in traceback.walk_tb(error.__traceback__):
    path = frame.f_locals.get("path")
    if isinstance(path, (str, pathlib.Path)):
      found = str(path)
  return found


def _load_task(config) -> tasks.Task:
  import wave
  import zlib

  try:
    task = tasks.build_task(config.data, config.seed)
  except FileNotFoundError as error:
    raise ConfigError(" ".join(str(error).split())) from None
  except (OSError, EOFError, ValueError, wave.Error, zlib.error) as error:
    where = _file_in_traceback(error)
    message = " ".join(str(error).split()) or type(error).__name__
    if where is None:  # Not a file's fault: a value that doesn't fit the data.
      raise ConfigError(f"data ({config.data.name}): {message}") from None
    if where not in message:
      message = f"{where!r}: {message}"
    raise ConfigError(f"data ({config.data.name}): can't read {message}") from None
  for name, data in task._asdict().items():
    if len(data) == 0:
      raise ConfigError(f"data: the {name} split is empty; use more data or fewer shots.")
  return task


def _model(config, quant):
  from fgjax import models

  kwargs = dict(config.model.kwargs or {})
  return models.get_model(config.model.name, num_classes=10, quant=quant, **kwargs)


def _init_variables(model, x, seed: int, *, shapes_only: bool = False) -> dict:
  init = jax.jit(lambda key, x: model.init(key, x, train=False))
  if shapes_only:
    init = functools.partial(jax.eval_shape, init)
  return dict(init(jax.random.key(seed), jnp.asarray(x[:1])))


def quant_config(adapt):
  """The fgjax quantization of `adapt.precision` (None for float32)."""
  from fgjax import quant

  if adapt.precision == "float32":
    return None
  return quant.preset(adapt.precision, weight_storage=adapt.weight_storage)


def _to_precision(variables: dict, quant, like=None) -> dict:
  """Pretrained float variables in the adapt precision: integer kernels + scales if asked; `like`
  (the integer model's variable shapes) sets each layer's calibration axes."""
  if quant is None or quant.weight_storage != "integer":
    return dict(variables)
  from fgjax import quant as fq

  return dict(fq.quantize_params(variables, quant, like=like))


def _pretrained(config, expected, notes) -> tuple[dict, dict]:
  """The pretrained float variables (checked) and their checkpoint record."""
  directory = pathlib.Path(config.adapt.pretrained) / "checkpoints"
  where = f"--config.adapt.pretrained: {str(directory)!r}"
  store = ckpt.Checkpoints(directory)
  try:
    steps = store.steps()
    if not steps:
      raise ConfigError(f"{where}: no checkpoint; is it a pretraining workdir?")
    raw, record = store.restore(steps[0])
  except ckpt.CorruptCheckpoint as error:
    raise ConfigError(
      f"{where}: step {steps[0]} is corrupt: {error}; rerun the pretraining."
    ) from None
  except ConfigError:
    raise
  except Exception as error:  # noqa: BLE001  (an unreadable folder is a bad flag value)
    raise ConfigError(f"{where}: unreadable ({' '.join(str(error).split())[:200]}).") from None
  finally:
    store.close()
  saved_mode = record.get("config", {}).get("mode", "pretrain")
  if saved_mode != "pretrain":
    raise ConfigError(f"{where}: written by a {saved_mode!r} run, not by a pretraining run.")
  planned = record.get("config", {}).get("pretrain", {}).get("steps")
  if isinstance(planned, int) and steps[0] < planned:
    notes.append(
      f"warning: {where} holds step {steps[0]} of a pretraining planned for {planned} steps "
      "(unfinished); adapting from it."
    )
  pretrained = {"params": raw["params"], **raw.get("model_state", {})}
  ckpt.check_like(where, pretrained, expected)
  return jax.tree.map(jnp.asarray, pretrained), {"step": steps[0], **record}


def _pretrain_plan(config, task):
  try:
    model = _model(config, None)
    variables = _init_variables(model, task.source_train.x, config.seed)
  except (TypeError, ValueError) as error:
    raise ConfigError(f"--config.model: {' '.join(str(error).split())}") from None
  params = variables.pop("params")
  try:
    optimizer = training.make_optimizer(config.pretrain, forward=False)
  except ValueError as error:
    raise ConfigError(f"--config.pretrain.{error}") from None
  state = training.TrainState.create(params, variables, optimizer, jax.random.key(config.seed))
  info = {"mode": "pretrain", "task": config.data.name, "model": config.model.name}
  return model, state, optimizer, {"update_batch_stats": True}, task.source_train, info


def _adapt_plan(config, task, notes):
  adapt = config.adapt
  quant = quant_config(adapt)
  try:
    float_model = _model(config, None)
    model = _model(config, quant)
    expected = _init_variables(float_model, task.target_train.x, config.seed, shapes_only=True)
  except (TypeError, ValueError) as error:
    raise ConfigError(f"--config.model: {' '.join(str(error).split())}") from None
  pretrained, record = _pretrained(config, expected, notes)
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
      mesh=config.get("mesh", ""),
    )
  except ValueError as error:
    raise ConfigError(f"--config.adapt.{error}") from None
  state = training.TrainState.create(params, variables, optimizer, jax.random.key(config.seed))
  info = {
    "mode": "adapt",
    "task": config.data.name,
    "model": config.model.name,
    "pretrained_model": record.get("model"),
    "pretrained_step": record["step"],
    "method": adapt.method,
    "precision": adapt.precision,
    "weight_storage": adapt.weight_storage,
    "trainable": adapt.trainable,
    "trainable_params": training.num_params(params, mask),
    "total_params": training.num_params(params),
    "pretrained_float_variables": pretrained,
    "mask": mask,
  }
  return model, state, optimizer, {"update_batch_stats": False}, task.target_train, info


def _resume(config, workdir: pathlib.Path, state, notes) -> tuple[tuple | None, dict | None]:
  """The workdir's latest good checkpoint, if it fits this run: (step, tree) and, when the run is
  finished and summarized, its summary."""
  store = ckpt.Checkpoints(workdir / "checkpoints")
  try:
    found = store.latest_good(notes.append)
  except ConfigError:
    raise
  except Exception as error:  # noqa: BLE001  (Orbax and OS errors on the folder itself)
    raise ConfigError(
      f"--workdir: {str(store.directory)!r} unreadable ({' '.join(str(error).split())[:200]})."
    ) from None
  finally:
    store.close()
  if found is None:
    return None, None
  step, tree, record, corrupt = found
  where = f"--workdir: checkpoint step {step} in {str(store.directory)!r}"
  if "config" not in record:
    raise ConfigError(f"{where} was written by an older fgjax (no config); remove it to rerun.")
  section = config.pretrain if config.mode == "pretrain" else config.adapt
  steps = int(section.steps)
  if step > steps:
    raise ConfigError(
      f"{where} is beyond --config.{config.mode}.steps={steps}; use another workdir "
      "(this one holds a longer run)."
    )
  differences = ckpt.config_differences(record["config"], ckpt.config_record(config))
  if differences:
    listed = "; ".join(differences)
    if not config.force_resume:
      raise ConfigError(
        f"--workdir holds a run with another config ({listed}); use another workdir or "
        "--config.force_resume=True."
      )
    notes.append(f"warning: resuming despite config changes ({listed}).")
  expected = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), ckpt.to_savable(state)
  )
  ckpt.check_like(where, tree, expected)
  summary_path = workdir / "summary.json"
  complete = None
  if step == steps and summary_path.is_file():
    try:
      complete = json.loads(summary_path.read_text())
    except (OSError, ValueError):
      complete = None  # Summarized again below.
  if corrupt:
    complete = None  # The final step is lost: recompute it.
  return (step, tree, corrupt), complete


def _finished_summary(config, workdir: pathlib.Path) -> dict | None:
  """The summary of this very run if the workdir holds it finished (final step checkpointed with
  the same config, summary written): a rerun then loads no data and compiles nothing."""
  summary_path = workdir / "summary.json"
  if not summary_path.is_file():
    return None
  section = config.pretrain if config.mode == "pretrain" else config.adapt
  store = ckpt.Checkpoints(workdir / "checkpoints")
  try:
    steps = store.steps()
    if not steps or steps[0] != int(section.steps):
      return None
    _, record = store.restore(steps[0])
    if ckpt.config_differences(record.get("config", {}), ckpt.config_record(config)):
      return None
    return json.loads(summary_path.read_text())
  except Exception:  # noqa: BLE001  (anything odd: take the full, checked path)
    return None
  finally:
    store.close()


def prepare(config, workdir, phase=None) -> Plan:
  """Validates the config, loads data and checkpoints; writes nothing. Raises ConfigError.

  `phase(text)`, if given, hears what is being done (for a progress line)."""
  phase = phase or (lambda text: None)
  validate(config, workdir)
  workdir = pathlib.Path(workdir)
  summary = _finished_summary(config, workdir)
  if summary is not None:
    return Plan(config, workdir, *(None,) * 6, resume=None, info={}, complete=summary)
  phase("loading data")
  task = _load_task(config)
  phase(
    "building the model"
    + (" and reading the pretrained checkpoint" if config.mode == "adapt" else "")
  )
  notes = []
  if config.mode == "pretrain":
    model, state, optimizer, step_kwargs, train_data, info = _pretrain_plan(config, task)
  else:
    model, state, optimizer, step_kwargs, train_data, info = _adapt_plan(config, task, notes)
  phase("reading the workdir's checkpoints")
  resume, complete = _resume(config, workdir, state, notes)
  return Plan(
    config,
    workdir,
    task,
    model,
    state,
    optimizer,
    step_kwargs,
    train_data,
    resume,
    info,
    complete,
    notes,
  )
