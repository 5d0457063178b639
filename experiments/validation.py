"""Checks every config value and the workdir before anything is loaded, compiled or written.

`validate(config, workdir)` raises `ConfigError` with one line that names the flag
(`--config.pretrain.batch_size`) or the file at fault. It only reads the config and probes the
filesystem; data folders and checkpoints are checked where they are opened (`experiments.build`),
still before the workdir is touched. Issue 10: 29 of 92 bad inputs used to end in a traceback or
finish silently (batch size 0, learning rate NaN, an unwritable workdir, ...).
"""

from __future__ import annotations

import math
import numbers
import os
import pathlib
import tempfile

MODES = ("pretrain", "adapt")
# Forward-gradient methods perturb integer kernels on their grid; backprop and jvp need float ones.
FLOAT_ONLY_METHODS = ("backprop", "jvp")
NONFINITE_POLICIES = ("stop", "skip")


class ConfigError(ValueError):
  """A problem with the flags, the data, the workdir or a checkpoint, found before writing."""


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _int(config, name: str, *, minimum: int) -> None:
  value = _get(config, name)
  if not _is_int(value) or value < minimum:
    raise ConfigError(f"--config.{name}={value!r}: must be an integer >= {minimum}.")


def _real(config, name: str, *, minimum: float | None = None, positive: bool = False) -> None:
  value = _get(config, name)
  if not _is_real(value) or not math.isfinite(value):
    raise ConfigError(f"--config.{name}={value!r}: must be a finite number.")
  if positive and value <= 0:
    raise ConfigError(f"--config.{name}={value!r}: must be > 0.")
  if minimum is not None and value < minimum:
    raise ConfigError(f"--config.{name}={value!r}: must be >= {minimum}.")


def _choice(config, name: str, valid) -> None:
  value = _get(config, name)
  if value not in valid:
    raise ConfigError(f"--config.{name}={value!r}: unknown; valid: {', '.join(map(str, valid))}.")


def _get(config, dotted: str):
  value = config
  for part in dotted.split("."):
    try:
      value = value[part]
    except (KeyError, TypeError):
      raise ConfigError(f"--config.{dotted}: missing from the config.") from None
  return value


def _optimizer(config, section: str) -> None:
  import optax

  from fgjax import training

  _choice(config, f"{section}.schedule", training.SCHEDULES)
  name = _get(config, f"{section}.optimizer")
  factory = getattr(optax, name, None) if isinstance(name, str) and name[:1] != "_" else None
  if not callable(factory):
    raise ConfigError(
      f"--config.{section}.optimizer={name!r}: not an optax optimizer (e.g. sgd, adam, adamw)."
    )
  kwargs = _get(config, f"{section}.optimizer_kwargs") or {}
  for key, value in dict(kwargs).items():
    if _is_real(value) and not math.isfinite(value):
      raise ConfigError(f"--config.{section}.optimizer_kwargs.{key}={value!r}: must be finite.")
  if "learning_rate" in kwargs:
    # NaN, inf or a negative rate used to train silently (issue 10): NaN weights, or integer
    # weights pinned at the int16 limit, or gradient ascent.
    _real(config, f"{section}.optimizer_kwargs.learning_rate", positive=True)


def _m_schedule(config) -> None:
  """`adapt.m_schedule` reads, fits its transform's rules, and has directions to schedule."""
  from fgjax import estimators, training, transforms

  text = _get(config, "adapt.m_schedule")
  if text is not None and not isinstance(text, str):
    raise ConfigError(f"--config.adapt.m_schedule={text!r}: must be a string such as '0:1,200:3'.")
  try:
    schedule = training.parse_m_schedule(text)
  except ValueError as error:
    raise ConfigError(f"--config.adapt.{error}") from None
  if schedule is None:
    return
  if _get(config, "adapt.method") == "backprop":
    raise ConfigError(
      "--config.adapt.m_schedule: backprop has no directions to schedule; use jvp, spsa or "
      "sign_spsa (or --config.adapt.m_schedule='')."
    )
  _int(config, "adapt.m_patience", minimum=1)
  kind, values = schedule
  try:  # The transforms' own checks (steps from 0 and increasing, m >= 1), on a stand-in.
    if kind == "plateau":
      transforms.num_directions_on_plateau(estimators.spsa(1), values)
    else:
      transforms.num_directions_schedule(estimators.spsa(1), values)
  except ValueError as error:
    raise ConfigError(f"--config.adapt.m_schedule={text!r}: {error}") from None


def _writable_workdir(workdir: pathlib.Path) -> None:
  """The workdir, or the folder that will hold it, accepts new files (probed, as root ignores
  permission bits): a temporary folder is made and removed there."""
  if workdir.exists() and not workdir.is_dir():
    raise ConfigError(f"--workdir={str(workdir)!r}: exists and is not a directory.")
  probe_in = workdir
  while not probe_in.exists():
    if probe_in.parent == probe_in:
      break
    probe_in = probe_in.parent
  if not probe_in.is_dir():
    raise ConfigError(
      f"--workdir={str(workdir)!r}: {str(probe_in)!r} is a file, so the workdir can't be made."
    )
  try:
    os.rmdir(tempfile.mkdtemp(prefix=".fgjax_probe_", dir=probe_in))
  except OSError as error:
    where = "the workdir" if probe_in == workdir else f"its parent {str(probe_in)!r}"
    raise ConfigError(
      f"--workdir={str(workdir)!r}: can't write into {where} ({error.strerror or error})."
    ) from None


def validate(config, workdir) -> None:
  """Raises ConfigError (one line naming the flag) for the first bad value of `config`.

  Checks names against the registries (modes, tasks, models, methods, presets, optimizers),
  integer ranges (steps, batch sizes, intervals >= 1), finiteness and sign of real values
  (learning rates, epsilon, noise), and that `workdir` can be written. Reads no data.
  """
  from experiments import tasks
  from fgjax import models, training
  from fgjax.estimators import DISTRIBUTIONS
  from fgjax.quant import _config as quant_config

  if not workdir:
    raise ConfigError("--workdir: required.")
  _choice(config, "mode", MODES)
  _int(config, "seed", minimum=0)
  for name in ("log_every", "checkpoint_every", "eval_batch_size"):
    _int(config, name, minimum=1)
  for name in ("eval_every", "stop_after"):
    _int(config, name, minimum=0)
  _choice(config, "nonfinite", NONFINITE_POLICIES)
  _real(config, "saturation_warning", minimum=0.0)

  _choice(config, "data.name", tasks.TASKS)
  _choice(config, "data.shift", tasks.SHIFTS)
  _real(config, "data.rotate_degrees")
  _real(config, "data.noise_std", minimum=0.0)
  for name in ("num_source", "limit", "takes"):
    _int(config, f"data.{name}", minimum=0)
  for name in ("shots", "num_samples", "num_mels"):
    _int(config, f"data.{name}", minimum=1)
  folder = _get(config, "data.folder")
  if folder and not pathlib.Path(folder).is_dir():
    raise ConfigError(f"--config.data.folder={folder!r}: no such directory.")

  model = _get(config, "model.name")
  known = {models._factory._normalize(n) for n in models.model_names()}
  if not isinstance(model, str) or models._factory._normalize(model) not in known:
    raise ConfigError(
      f"--config.model.name={model!r}: unknown model; valid: {', '.join(models.model_names())}."
    )

  section = _get(config, "mode")
  _int(config, f"{section}.steps", minimum=1)
  _int(config, f"{section}.batch_size", minimum=1)
  _optimizer(config, section)
  if section == "adapt":
    adapt = _get(config, "adapt")
    _choice(config, "adapt.method", training.METHODS)
    _choice(config, "adapt.precision", quant_config.PRESET_NAMES)
    _choice(config, "adapt.weight_storage", quant_config.WEIGHT_STORAGES)
    _choice(config, "adapt.rounding", training.ROUNDINGS)
    _choice(config, "adapt.trainable", training.TRAINABLE_SUBSETS)
    _choice(config, "adapt.distribution", DISTRIBUTIONS)
    _int(config, "adapt.last_k", minimum=1)
    _int(config, "adapt.num_directions", minimum=1)
    _real(config, "adapt.epsilon", positive=True)
    _m_schedule(config)
    _real(config, "adapt.sign_scale", positive=True)
    chunk = adapt.chunk_size
    if chunk not in ("auto", None) and not (_is_int(chunk) and chunk >= 1):
      raise ConfigError(f"--config.adapt.chunk_size={chunk!r}: must be 'auto' or an integer >= 1.")
    if adapt.weight_storage == "integer" and adapt.precision == "float32":
      raise ConfigError(
        "--config.adapt.weight_storage='integer' needs an integer precision (e.g. w16a8), "
        "not float32."
      )
    if adapt.weight_storage == "integer" and adapt.method in FLOAT_ONLY_METHODS:
      raise ConfigError(
        f"--config.adapt.method={adapt.method!r} needs float weights; use "
        "--config.adapt.weight_storage=float (fake quantization) or a forward-only method "
        "(spsa, sign_spsa)."
      )
    if not adapt.pretrained:
      raise ConfigError("--config.adapt.pretrained: the pretraining workdir is required.")
    if not pathlib.Path(adapt.pretrained).is_dir():
      raise ConfigError(f"--config.adapt.pretrained={adapt.pretrained!r}: no such directory.")
    if pathlib.Path(adapt.pretrained).resolve() == pathlib.Path(workdir).resolve():
      raise ConfigError("--config.adapt.pretrained: must not be the workdir itself.")
  _writable_workdir(pathlib.Path(workdir))
