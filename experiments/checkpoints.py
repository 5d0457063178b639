"""Checkpoints you can trust: Orbax steps stored with the run's config and a checksum.

Each step holds the state (step, params, model state, optimizer state, key) and a JSON record:
the run's config, the SHA-256 of every array (path, dtype, shape and bytes) and the format
version. `Checkpoints.restore` recomputes the checksum and checks that every float is finite, so
a truncated file, a missing Orbax metadata file, an empty step folder, a same-size byte flip or a
NaN parameter is a `CorruptCheckpoint` rather than weights of 2.3e26 (issue 10).
`Checkpoints.latest_good` walks back from the latest step to the newest one that passes.

The optimizer state is stored by tree path (`"0.inner_states.train.inner_state.0.mu.Conv_0.
kernel"`), not by leaf position, so a different optimizer chain whose leaves happen to have the
same shapes is refused instead of restored into the wrong slots.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from experiments.validation import ConfigError
from fgjax import training

FORMAT_VERSION = 2
# Config fields that don't change what a run computes: a resume may change them freely.
RESUME_SAFE_FIELDS = (
  "log_every",
  "checkpoint_every",
  "eval_every",
  "eval_batch_size",
  "stop_after",
  "force_resume",
  "nonfinite",
  "saturation_warning",
  "data.folder",
  "adapt.compare_backprop_memory",
  "reference",
)


class CorruptCheckpoint(Exception):
  """A checkpoint step that can't be read, fails its checksum or holds non-finite values."""


class NonFiniteState(ValueError):
  """`Checkpoints.save` refused a state holding NaN or infinity."""


def _path_key(path) -> str:
  """A tree path as a flat Orbax-safe key: `[0].mu['Conv_0']` -> `0.mu.Conv_0`."""
  return re.sub(r"[^A-Za-z0-9_]+", ".", jax.tree_util.keystr(path)).strip(".")


def _plain(x):
  return jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x


def to_savable(state: training.TrainState) -> dict:
  """The state as nested dicts of arrays: typed keys as key data, the optimizer state keyed by
  tree path. Orbax refuses empty arrays (e.g. backprop's (0,) directional derivatives); the
  template supplies them on restore."""
  opt_state = {
    _path_key(path): _plain(x)
    for path, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
    if np.size(x) > 0
  }
  out = {"step": state.step, "params": state.params, "rng": _plain(state.rng)}
  out["opt_state"] = opt_state
  if state.model_state:
    out["model_state"] = state.model_state
  return out


def from_savable(tree: dict, template: training.TrainState) -> training.TrainState:
  """The inverse of `to_savable`, with `template` (a fresh state of this run) giving structure."""

  def typed(x, like):
    if jnp.issubdtype(like.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(jnp.asarray(x), impl=jax.random.key_impl(like))
    return jnp.asarray(x, like.dtype)

  saved = tree["opt_state"]
  paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(template.opt_state)
  restored = []
  for path, like in paths_and_leaves:
    key = _path_key(path)
    restored.append(typed(saved[key], like) if key in saved else like)
  return training.TrainState(
    step=jnp.asarray(tree["step"]),
    params=jax.tree.map(jnp.asarray, tree["params"]),
    model_state=jax.tree.map(jnp.asarray, tree.get("model_state", {})),
    opt_state=jax.tree.unflatten(treedef, restored),
    rng=typed(tree["rng"], template.rng),
  )


def _flat(tree) -> dict[str, Any]:
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def checksum(tree) -> str:
  """SHA-256 over every leaf's path, dtype, shape and bytes, in path order."""
  digest = hashlib.sha256()
  for path, leaf in sorted(_flat(tree).items()):
    array = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{path}|{array.dtype.str}|{array.shape}|".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def nonfinite_leaves(tree) -> list[str]:
  """Paths of the float leaves that hold a NaN or an infinity."""
  bad = []
  for path, leaf in _flat(tree).items():
    array = np.asarray(leaf)
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
      bad.append(path)
  return bad


def check_like(what: str, found, expected) -> None:
  """Raises ConfigError naming the first leaf whose path or shape differ."""
  found_flat, want_flat = _flat(found), _flat(expected)
  for path, want in want_flat.items():
    if path not in found_flat:
      raise ConfigError(f"{what}: it has no {path}; is it a checkpoint of another model?")
    got, shape = tuple(np.shape(found_flat[path])), tuple(np.shape(want))
    if got != shape:
      raise ConfigError(
        f"{what}: {path} has shape {got} but the model expects {shape}; "
        "is it a checkpoint of another model?"
      )
  extra = sorted(set(found_flat) - set(want_flat))
  if extra:
    raise ConfigError(f"{what}: unexpected {extra[0]}; is it a checkpoint of another model?")


def _flat_config(config: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(_flat_config(value, name + "."))
    else:
      out[name] = list(value) if isinstance(value, tuple) else value
  return out


def config_record(config) -> dict:
  """The config as plain JSON (what a checkpoint stores)."""
  return json.loads(config.to_json_best_effort())


def config_differences(saved: dict, current: dict) -> list[str]:
  """`field: saved -> current` for every field that changes the result (see
  `RESUME_SAFE_FIELDS`); the section of the other mode (pretrain/adapt) is ignored."""
  mode = current.get("mode")
  ignore = set(RESUME_SAFE_FIELDS) | {"adapt" if mode == "pretrain" else "pretrain"}
  saved_flat, current_flat = _flat_config(saved), _flat_config(current)
  out = []
  for name in sorted(set(saved_flat) | set(current_flat)):
    if name in ignore or name.split(".")[0] in ignore or name.rsplit(".", 1)[0] in ignore:
      continue
    a, b = saved_flat.get(name, "<absent>"), current_flat.get(name, "<absent>")
    if a != b:
      out.append(f"{name}: {a!r} -> {b!r}")
  return out


class Checkpoints:
  """The checkpoint steps of one folder (Orbax `CheckpointManager`, the last `keep` kept)."""

  def __init__(self, directory: pathlib.Path, *, create: bool = False, keep: int = 2):
    self.directory = pathlib.Path(directory).absolute()
    self._manager = None
    self._create, self._keep = create, keep

  @property
  def manager(self) -> ocp.CheckpointManager:
    if self._manager is None:
      options = ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=self._create)
      self._manager = ocp.CheckpointManager(self.directory, options=options)
    return self._manager

  def steps(self) -> list[int]:
    """Finished steps, newest first (an interrupted save is not listed)."""
    if not self.directory.is_dir():
      return []
    return sorted(self.manager.all_steps(), reverse=True)

  def save(self, step: int, state: training.TrainState, config) -> None:
    """Saves `state` with the config and its checksum; refuses (ValueError) a non-finite one."""
    tree = jax.device_get(to_savable(state))
    bad = nonfinite_leaves(tree)
    if bad:
      raise NonFiniteState(f"refused to save the non-finite state of step {step} ({bad[0]})")
    record = {
      "format": FORMAT_VERSION,
      "step": int(step),
      "model": config.model.name,
      "config": config_record(config),
      "checksum": checksum(tree),
    }
    self.manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(record)),
    )

  def restore(self, step: int) -> tuple[dict, dict]:
    """(state tree, record) of `step`; raises CorruptCheckpoint when it can't be trusted."""
    try:
      restored = self.manager.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()),
      )
      tree, record = dict(restored["state"]), dict(restored["meta"])
    except Exception as error:  # Orbax, tensorstore and OS errors alike: the step is unreadable.
      reason = " ".join(str(error).split())[:200] or type(error).__name__
      raise CorruptCheckpoint(f"unreadable ({type(error).__name__}: {reason})") from None
    if "checksum" in record and checksum(tree) != record["checksum"]:
      raise CorruptCheckpoint("checksum mismatch (the bytes changed after saving)")
    bad = nonfinite_leaves(tree)
    if bad:
      raise CorruptCheckpoint(f"non-finite values in {bad[0]}")
    return tree, record

  def latest_good(self, warn) -> tuple[int, dict, dict, list[int]] | None:
    """The newest step that restores and passes its checks, as (step, tree, record, the newer
    corrupt steps skipped); `warn` receives one line per step skipped. None when there is no step
    at all."""
    steps = self.steps()
    problems = []
    for step in steps:
      try:
        tree, record = self.restore(step)
      except CorruptCheckpoint as error:
        problems.append(f"step {step}: {error}")
        warn(f"warning: checkpoint step {step} in {str(self.directory)!r} is corrupt ({error}).")
        continue
      skipped = [s for s in steps if s > step]
      if skipped:
        warn(f"warning: falling back to checkpoint step {step}.")
      return step, tree, record, skipped
    if problems:
      raise ConfigError(
        f"{str(self.directory)!r}: no usable checkpoint ({'; '.join(problems)}); "
        "remove the folder to start over."
      )
    return None

  def set_aside(self, steps: list[int], folder: pathlib.Path) -> None:
    """Moves corrupt steps out of the way (Orbax would not save a step number again) into
    `folder`, for inspection."""
    folder.mkdir(parents=True, exist_ok=True)
    for step in steps:
      source = self.directory / str(step)
      if source.exists():
        source.rename(folder / f"{step}.{int(time.time())}")
    self._manager = None  # Re-read the steps.

  def wait(self) -> None:
    if self._manager is not None:
      self._manager.wait_until_finished()

  def close(self) -> None:
    if self._manager is not None:
      self._manager.wait_until_finished()
      self._manager.close()
      self._manager = None
